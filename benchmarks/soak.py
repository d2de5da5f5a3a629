"""Soak: does the server's memory come back after tabs come and go?

    python -m benchmarks.soak [--model smollm2] [--backend auto] [--tabs 6] [--cycles 5]
                              [--turns 3] [--max-new 24] [--tracemalloc] [--json FILE]

Each cycle, N gradio_client tabs open, chat (with an image or a sound in the first
message when the model takes one) and go idle; the server frees them after its idle
timeout, as it frees a closed browser tab. After each cycle the server reports its
resident memory (RSS, after `gc.collect()`), then again after `malloc_trim(0)`, which
hands pages glibc keeps for reuse back to the system. If RSS grows but the trimmed
figure stays flat, the growth is the allocator keeping freed pages, not a leak.
With --tracemalloc the server also compares Python allocations after the last
cycle with those after the first, by source line: live growth shows there.

The server runs in a child process (the app as `app.py` builds it), so the tabs'
client objects do not count. Not run in CI: a run takes minutes. `--model tiny:llava`
(or another family of tests/tiny_models.py) soaks a tiny multimodal model.

Plateau target (issue 14): after cycle 2, RSS grows at most 10 MiB per cycle.
"""

from __future__ import annotations

import argparse
import ctypes
from collections import Counter
import gc
import json
import multiprocessing as mp
import os
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PLATEAU_MIB = 10.0


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def malloc_trim() -> bool:
    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except OSError:
        return False


# --------------------------------------------------------------------------- the server (child process)


def load(spec: str, backend: str, sessions: int):
    if spec.startswith("tiny:"):
        sys.path.insert(0, str(ROOT))
        from tests.tiny_models import tiny_engine

        return tiny_engine(spec.split(":", 1)[1], max_sessions=sessions)
    from engines import load_engine

    return load_engine(spec, backend=backend, max_sessions=sessions)


def serve(conn, args: dict) -> None:
    """Build and launch the app, then answer the parent's commands over `conn`."""
    import tracemalloc

    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from playground.ui import build_ui, launch
    from tests.ui_harness import free_port

    engine = load(args["model"], args["backend"], args["tabs"] + 1)
    demo = build_ui(engine, max_sessions=args["tabs"], idle_timeout_s=args["idle"],
                    max_new_tokens_cap=args["max_new"])
    port = free_port()
    launch(demo, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    if args["tracemalloc"]:  # from here on: tracing imports and loading would take minutes
        tracemalloc.start(10)
    conn.send({"url": f"http://127.0.0.1:{port}", "modalities": sorted(engine.modalities), "name": engine.name,
               "backend": getattr(engine, "backend", "?"), "rss": rss_mib()})
    base = base_objects = None
    while True:
        cmd = conn.recv()
        if cmd == "measure":
            gc.collect()
            before = rss_mib()
            trimmed = malloc_trim()
            conn.send({"rss": before, "rss_trimmed": rss_mib(), "trim_worked": trimmed, "tabs": len(demo.sessions),
                       "open_sessions": getattr(engine, "open_sessions", None),
                       "gradio_states": len(demo.state_holder.session_data) if hasattr(demo, "state_holder") else None,
                       "python_mib": (tracemalloc.get_traced_memory()[0] / 2**20) if tracemalloc.is_tracing()
                       else None})
        elif cmd == "objects":  # live Python objects by type: what grows shows here, cheaply
            gc.collect()
            counts = Counter(type(o).__name__ for o in gc.get_objects())
            if base_objects is None:
                base_objects = counts
                conn.send([])
            else:
                diff = sorted(((n - base_objects.get(t, 0), t) for t, n in counts.items()), reverse=True)
                conn.send([f"{d:+7d} {t}" for d, t in diff[:10] if d > 0])
        elif cmd == "tabs":  # tabs still held, engine sessions still open
            conn.send(len(demo.sessions) + (getattr(engine, "open_sessions", 0) or 0))
        elif cmd == "snapshot":
            gc.collect()
            if not tracemalloc.is_tracing():
                conn.send([])
                continue
            snap = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(False, tracemalloc.__file__)])
            if base is None:
                base = snap
                conn.send([])
            else:
                conn.send([f"{s.size_diff / 1024:+9.1f} KiB {s.count_diff:+6d} blocks  {s.traceback}"
                           for s in snap.compare_to(base, "lineno")[:12]])
        elif cmd == "stop":
            demo.sessions.shutdown()
            demo.close()
            conn.send("bye")
            return


# --------------------------------------------------------------------------- the tabs (parent process)


def media_files(modalities: list[str], tmp: Path) -> list[str]:
    """A small image or sound for models that take one."""
    import numpy as np

    files = []
    if "image" in modalities:
        from PIL import Image

        rng = np.random.default_rng(0)
        path = tmp / "soak.png"
        Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)).save(path)
        files.append(str(path))
    elif "audio" in modalities:
        import soundfile as sf

        t = np.arange(16000) / 16000
        path = tmp / "soak.wav"
        sf.write(path, (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 16000)
        files.append(str(path))
    return files


def run_tab(url: str, k: int, cycle: int, turns: int, max_new: int, files: list[str], errors: list) -> None:
    from gradio_client import Client, handle_file

    knobs = dict(temperature=0.7, top_p=0.95, top_k=0, rep=1.0, seed=k + 100 * cycle, stops="", system_prompt="",
                 raw=False, stored={"messages": []})
    try:
        c = Client(url, verbose=False, download_files=False, httpx_kwargs={"timeout": 120})
        for turn in range(turns):
            box = {"text": f"Tab {k}, cycle {cycle}, turn {turn}: tell me something about the number {k + turn}.",
                   "files": [handle_file(f) for f in files] if turn == 0 else []}
            out = c.predict(box, api_name="/send", max_new=max_new, **knobs)
            if str(out[2]).startswith("⚠"):
                errors.append(out[2])
        out = c.predict(api_name="/regenerate", max_new=max_new, **knobs)
        if str(out[2]).startswith("⚠"):
            errors.append(out[2])
    except Exception as e:  # noqa: BLE001 - reported, the soak goes on
        errors.append(f"tab {k}: {type(e).__name__}: {e}")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--backend", default="auto")
    p.add_argument("--tabs", type=int, default=6)
    p.add_argument("--cycles", type=int, default=5)
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--max-new", type=int, default=24)
    p.add_argument("--idle", type=float, default=2.0, help="the server's idle timeout, seconds")
    p.add_argument("--tracemalloc", action="store_true", help="trace Python allocations in the server (slower)")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=serve, args=(child, vars(args)), daemon=True)
    proc.start()
    info = parent.recv()
    url = info["url"]
    print(f"server: {info['name']} ({info['backend']}), takes {', '.join(info['modalities'])}; "
          f"RSS at start {info['rss']:.0f} MiB", flush=True)
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"soak-{os.getpid()}"
    tmp.mkdir(exist_ok=True)
    files = media_files(info["modalities"], tmp)
    parent.send("measure")
    rows = [{"cycle": 0, **parent.recv()}]
    errors: list = []
    for cycle in range(1, args.cycles + 1):
        t0 = time.perf_counter()
        threads = [threading.Thread(target=run_tab, args=(url, k, cycle, args.turns, args.max_new, files, errors))
                   for k in range(args.tabs)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        busy = time.perf_counter() - t0
        deadline, t_idle = time.monotonic() + 10 * args.idle + 30, time.perf_counter()
        while time.monotonic() < deadline:  # the reaper frees idle tabs, as unload frees closed ones
            parent.send("tabs")
            if parent.recv() == 0:  # and their engine sessions are closed
                break
            time.sleep(0.5)
        freed_s = time.perf_counter() - t_idle
        parent.send("measure")
        row = {"cycle": cycle, "seconds": round(busy, 1), "freed_after_s": round(freed_s, 1), **parent.recv()}
        rows.append(row)
        if cycle == 1 or cycle == args.cycles:
            parent.send("snapshot")
            growth = parent.recv()
            if growth:
                row["python_growth_since_cycle_1"] = growth
            parent.send("objects")
            objects = parent.recv()
            if objects:
                row["objects_since_cycle_1"] = objects
        print(f"cycle {cycle}: {args.tabs} tabs x {args.turns + 1} actions in {busy:.0f} s, all freed "
              f"{freed_s:.1f} s later; tabs left {row['tabs']}, "
              f"engine sessions open {row['open_sessions']}, gradio session states {row['gradio_states']}; "
              f"RSS {row['rss']:.1f} MiB, after malloc_trim {row['rss_trimmed']:.1f} MiB"
              + (f"; Python heap {row['python_mib']:.1f} MiB" if row["python_mib"] is not None else ""), flush=True)
    parent.send("stop")
    parent.recv()
    proc.join(30)

    def per_cycle(key):
        later = [r[key] for r in rows if r["cycle"] >= 2]
        return (later[-1] - later[0]) / max(1, len(later) - 1) if len(later) > 1 else 0.0

    result = {
        "args": vars(args), "server": info, "cycles": rows, "errors": errors,
        "growth_per_cycle_after_2_mib": round(per_cycle("rss"), 2),
        "trimmed_growth_per_cycle_after_2_mib": round(per_cycle("rss_trimmed"), 2),
    }
    result["plateau"] = result["trimmed_growth_per_cycle_after_2_mib"] <= PLATEAU_MIB
    print(f"growth per cycle after cycle 2: {result['growth_per_cycle_after_2_mib']:+.1f} MiB "
          f"(after malloc_trim {result['trimmed_growth_per_cycle_after_2_mib']:+.1f} MiB; target <= {PLATEAU_MIB:g}); "
          f"{len(errors)} errors")
    for row in rows:
        for key in ("python_growth_since_cycle_1", "objects_since_cycle_1"):
            if row.get(key):
                print(f"{key.replace('_', ' ')}:")
            for line in row.get(key, []):
                print("  ", line)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, default=str))
    return result


if __name__ == "__main__":
    main()
