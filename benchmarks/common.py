"""Timing helpers, summary statistics and a description of the machine."""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from typing import Callable

import psutil


def now() -> float:
    return time.perf_counter()


def summary(values: list[float]) -> dict:
    """min, median, max and the raw values (rounded for the JSON)."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return {"min": None, "median": None, "max": None, "n": 0, "values": []}
    return {"min": min(vals), "median": statistics.median(vals), "max": max(vals), "n": len(vals),
            "values": [round(v, 5) for v in vals]}


WARMUP = True  # run.py turns warm-up rounds off in --quick mode


def interleaved(reps: int, cases: dict[str, Callable[[], dict]], warmup: bool | None = None) -> dict[str, list[dict]]:
    """Run every case once per repetition, in turn, so that peers share the same
    background load. A warm-up round (not recorded) comes first. Returns each
    case's list of result dicts."""
    if WARMUP if warmup is None else warmup:
        for fn in cases.values():
            fn()
    out: dict[str, list[dict]] = {k: [] for k in cases}
    for _ in range(reps):
        for name, fn in cases.items():
            out[name].append(fn())
    return out


def summarise(runs: dict[str, list[dict]]) -> dict[str, dict]:
    """{case: {metric: summary}} from `interleaved`'s lists of metric dicts."""
    res = {}
    for case, items in runs.items():
        keys = [k for k in items[0] if isinstance(items[0][k], (int, float))]
        res[case] = {k: summary([it[k] for it in items]) for k in keys}
    return res


def cpu_seconds(proc: psutil.Process | None = None) -> float:
    t = (proc or psutil.Process()).cpu_times()
    return t.user + t.system


def machine() -> dict:
    """CPU, memory, load and library versions, for the JSON and the table."""
    import torch
    import transformers

    info = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "transformers": transformers.__version__,
        "torch_parallel": torch.__config__.parallel_info().splitlines()[-1].strip(),
    }
    for name in ("gradio", "gradio_client", "tokenizers", "numpy", "llama_cpp"):
        try:
            mod = __import__(name)
            info[name] = getattr(mod, "__version__", "?")
        except Exception:  # noqa: BLE001 - optional peers
            info[name] = None
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def erase_slot(engine, session) -> None:
    """Empty a server slot's KV before a stateless peer uses it: a closed session's slot
    keeps its KV (engines/llama_server.py), and a peer must not find its prompt cached."""
    post = getattr(engine, "post", None)
    if post is not None and hasattr(session, "slot"):
        post(f"/slots/{session.slot}?action=erase", {})
