"""Run the benchmark suite on the default model; print a table and write JSON.

    python -m benchmarks.run [--quick] [--out benchmarks/out/results.json] [--only decode,regen,...]

Sections: decode (a), multiturn (b), regen (c), startup (d), ui (e), memory (f),
llamacpp (g), and compiled (h), which runs only when named in --only. Peers
inside a section run interleaved, repetition by repetition, after a warm-up, so they share the machine's background load; the table shows
medians (and mins) and same-run ratios. `--quick` is the CI smoke mode:
one repetition, few tokens, small histories.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

SECTIONS = ("decode", "regen", "multiturn", "ui", "memory", "llamacpp", "startup")
OPTIONAL = ("compiled",)  # compiles for a minute or more


def params(quick: bool) -> dict:
    if quick:
        return dict(reps=1, tokens=6, turns=2, reply=6, lengths=(128,), ui_tokens=6, warm_reps=1, cold_reps=0,
                    mem_context=128, compiled_caps=(512,))  # one compile, the shape tests/test_compiled.py has
    return dict(reps=5, tokens=64, turns=10, reply=64, lengths=(256, 1024, 2048), ui_tokens=64, warm_reps=5,
                cold_reps=2, mem_context=1024, compiled_caps=None)


def run_section(name: str, engine, p: dict) -> dict:
    """One section. The conversation sections run in a fresh worker thread, as
    Gradio runs a handler (see RESULTS.md on OpenMP threads in the main thread)."""
    import torch

    from .decode import in_worker

    if name == "decode":
        from . import decode
        return decode.run(engine, p["reps"], p["tokens"])
    if name == "memory":
        from . import memory
        return in_worker(lambda: memory.run(engine, context_tokens=p["mem_context"]))
    if name == "regen":
        from . import chat
        return in_worker(lambda: chat.run_regen(engine, p["reps"], p["lengths"]))
    if name == "multiturn":
        from . import chat
        return in_worker(lambda: chat.run_multiturn(engine, p["reps"], p["turns"], p["reply"]))
    if name == "llamacpp":
        from . import llamacpp
        return llamacpp.run(engine, p["reps"], p["tokens"], threads=getattr(engine, "num_threads", None)
                            or torch.get_num_threads())
    if name == "ui":
        from . import ui_stream
        return ui_stream.run(p["reps"], p["ui_tokens"])
    if name == "compiled":
        from . import compiled
        return compiled.run(engine, p["reps"], p["tokens"], history=max(p["lengths"]) // 2,
                            caps=p["compiled_caps"])
    if name == "startup":
        from . import startup
        return startup.run(p["warm_reps"], p["cold_reps"])
    raise ValueError(name)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 repetition, few tokens (CI smoke mode)")
    ap.add_argument("--out", default="benchmarks/out/results.json")
    ap.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections")
    ap.add_argument("--reps", type=int, default=None, help="override the repetitions")
    args = ap.parse_args(argv)
    sections = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = [s for s in sections if s not in SECTIONS + OPTIONAL]
    if bad:
        ap.error(f"unknown sections {bad}; choose from {', '.join(SECTIONS + OPTIONAL)}")
    p = params(args.quick)
    if args.reps:
        p["reps"] = p["warm_reps"] = args.reps

    from engines import load_engine

    from . import common
    from .common import machine

    common.WARMUP = not args.quick
    from .report import table

    t0 = time.time()
    engine = load_engine("smollm2", backend="transformers")
    results = {"machine": machine(), "quick": args.quick, "params": {k: list(v) if isinstance(v, tuple) else v
                                                                     for k, v in p.items()},
               "engine": {"name": engine.name, "dtype": str(engine.dtype), "device": str(engine.device),
                          "num_threads": getattr(engine, "num_threads", None)},
               "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t0))}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    failed = []
    for name in sections:
        ts = time.time()
        print(f"[benchmarks] {name} ...", file=sys.stderr, flush=True)
        try:
            results[name] = run_section(name, engine, p)
        except Exception as e:  # noqa: BLE001 - one broken section must not hide the others
            traceback.print_exc()
            results[name] = {"error": f"{type(e).__name__}: {e}"}
            failed.append(name)
        results.setdefault("section_seconds", {})[name] = round(time.time() - ts, 1)
        results["total_seconds"] = round(time.time() - t0, 1)
        results["machine"]["load_avg_at_end"] = [round(x, 2) for x in os.getloadavg()]
        out.write_text(json.dumps(results, indent=1))  # after every section: a cut-short run keeps its results
    print(table(results))
    print(f"\nJSON: {out}  ({results['total_seconds']} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
