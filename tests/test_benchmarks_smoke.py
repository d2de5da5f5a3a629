"""The benchmark suite's quick mode runs end to end and reports every section.

Structure and positivity only: no timing is asserted (timings belong in
benchmarks/RESULTS.md, not in CI).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = ("decode", "regen", "multiturn", "ui", "memory", "llamacpp", "startup")


def positive(x) -> bool:
    return isinstance(x, (int, float)) and x > 0


@pytest.mark.bench  # runs every section of the transformers suite; CI keeps tests/test_benchmarks_backends.py
def test_quick_benchmarks_report_every_section(tmp_path):
    out = tmp_path / "results.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False")
    p = subprocess.run([sys.executable, "-m", "benchmarks.run", "--quick", "--out", str(out)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["quick"] is True
    for name in SECTIONS:
        assert name in r and "error" not in r[name], (name, r.get(name))
    m = r["machine"]
    assert m["torch"] and m["transformers"] and positive(m["logical_cpus"])

    d = r["decode"]
    for case in ("session_decode_one", "raw_forward_loop", "generate_streamer"):
        assert positive(d[case]["tok_s"]["median"]) and positive(d[case]["ttft_s"]["median"]), case
        assert d[case]["tok_s"]["n"] == 1
    assert all(positive(v) for v in d["ratios"].values())

    for row in r["regen"].values():
        for k in ("regenerate_ttft_s", "edit_ttft_s", "generate_reprefill_ttft_s", "session_reprefill_ttft_s"):
            assert positive(row[k]["median"]), k
        assert positive(row["history_tokens"])

    mt = r["multiturn"]["per_turn"]
    assert len(mt) == r["params"]["turns"]
    assert all(positive(t["playground_ttft_s"]["median"]) and positive(t["generate_resend_ttft_s"]["median"])
               for t in mt)
    assert mt[-1]["context_tokens"] > mt[0]["context_tokens"]

    u = r["ui"]
    for case in ("playground_ui", "demo_generate_streamer_stock", "demo_generate_streamer_engine_model"):
        assert positive(u[case]["client_tok_s"]["median"]) and positive(u[case]["tokens"]["median"]), case
    assert all(positive(v) for v in u["ratios"].values())

    mem = r["memory"]
    assert positive(mem["kv_bytes_per_token_measured"]) and positive(mem["kv_bytes_per_token_computed"])
    assert positive(mem["rss_per_extra_session_bytes"])

    assert positive(r["startup"]["warm"]["first_token_s"]["median"])
    g = r["llamacpp"]
    assert "skipped" in g or positive(g["llama_cpp_q4_1"]["tok_s"]["median"])


@pytest.mark.bench  # compiles for minutes on a CPU, where the compiled path is not meant to be used
def test_quick_compiled_section_reports_compiled_against_eager(tmp_path):
    """(h) is opt-in (it compiles); quick mode compiles one 512-token cache."""
    out = tmp_path / "compiled.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    p = subprocess.run([sys.executable, "-m", "benchmarks.run", "--quick", "--only", "compiled", "--out", str(out)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    c = json.loads(out.read_text())["compiled"]
    assert c["cache_tokens"] == {"eager": c["cache_tokens"]["eager"], "compiled_ctx512": 512}
    for case in ("eager_decode_one", "compiled_ctx512_decode_one"):
        assert positive(c[case]["tok_s"]["median"]) and positive(c[case]["ttft_s"]["median"]), case
    assert positive(c["compiled_ctx512_regenerate_at_64"]["ttft_s"]["median"])
    assert positive(c["compile_s"]["compiled_ctx512"]) and all(positive(v) for v in c["ratios"].values())
    assert "(h) compile=True" in p.stdout  # the table prints it
