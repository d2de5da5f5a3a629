"""Two checkouts of this repository, paired: did a change make anything slower?

    python -m benchmarks.trees BEFORE_DIR [AFTER_DIR (default: this checkout)] [--rounds 3]

Each round runs `benchmarks.run --only decode,multiturn,ui --reps 1` once in each
checkout, in turn (the order alternates between rounds), with the same Python,
so both share the machine's background load. It reports, per figure, the median
over rounds of each checkout and the median of the per-round ratios (after /
before). Figures: `decode_one` tok/s, the last turn's first-token time of a
10-turn chat, and the tok/s a `gradio_client` receives from the launched UI.
The transformers backend: `benchmarks.run` measures it. Not run in CI.

Make a BEFORE_DIR with `git worktree add /tmp/before <commit>`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

FIGURES = {  # name -> (path in benchmarks.run's JSON, higher is better)
    "decode_one tok/s": (("decode", "session_decode_one", "tok_s", "median"), True),
    "turn-10 first token, s": (("multiturn", "per_turn", -1, "playground_ttft_s", "median"), False),
    "gradio_client tok/s": (("ui", "playground_ui", "client_tok_s", "median"), True),
}


def measure(tree: Path, out: Path, quick: bool = False) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.run", "--only", "decode,multiturn,ui", "--reps", "1", "--out", str(out)]
    cmd += ["--quick"] if quick else []
    subprocess.run(cmd, cwd=tree, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env={**os.environ, "PYTHONPATH": str(tree)})
    data = json.loads(out.read_text())
    got = {}
    for name, (path, _) in FIGURES.items():
        x = data
        for key in path:
            x = x[key]
        got[name] = x
    return got


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("before", type=Path)
    ap.add_argument("after", type=Path, nargs="?", default=Path(__file__).resolve().parent.parent)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="benchmarks.run's smoke mode (checks the plumbing)")
    ap.add_argument("--out", default=None, help="write the per-round figures as JSON here")
    args = ap.parse_args(argv)
    trees = {"before": args.before.resolve(), "after": args.after.resolve()}
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            order = ["before", "after"] if r % 2 == 0 else ["after", "before"]
            rounds.append({k: measure(trees[k], Path(tmp) / f"{k}-{r}.json", args.quick) for k in order})
            print(f"round {r + 1}: {rounds[-1]}", flush=True)
    print(f"\n| figure | before | after | after / before, paired | better is |")
    print("|---|---|---|---|---|")
    for name, (_, higher) in FIGURES.items():
        b = statistics.median(x["before"][name] for x in rounds)
        a = statistics.median(x["after"][name] for x in rounds)
        ratio = statistics.median(x["after"][name] / x["before"][name] for x in rounds)
        print(f"| {name} | {b:.3f} | {a:.3f} | ×{ratio:.3f} | {'higher' if higher else 'lower'} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"trees": {k: str(v) for k, v in trees.items()}, "rounds": rounds}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
