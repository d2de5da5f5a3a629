"""Tiny multimodal models on this CPU: each family's prefill (processor run and media
memoized) and decode times, best and median of a few runs.

    python -m benchmarks.multimodal

The models are tests/tiny_models.py's (built offline, a few hundred KB, float64),
so the figures measure the adapter's overhead, not model speed (docs/multimodal.md).
"""

from __future__ import annotations

import statistics
import time

from engines import SamplingConfig
from tests.tiny_models import BUILDERS, media_prompts, tiny_engine


def time_families(runs: int = 7, new_tokens: int = 32) -> None:
    """Print each family's prefill and decode times on this machine (best and median of `runs`)."""
    for fam, (_, kind) in BUILDERS.items():
        engine = tiny_engine(fam)
        prompt = media_prompts(kind)(engine)[0]
        cold, warm, step = [], [], []
        for _ in range(runs):
            engine._memo.clear()  # cold: the processor runs on the medium (the engine's media memo)
            with engine.create_session() as s:
                t = time.perf_counter()
                s.prefill(prompt)
                cold.append(time.perf_counter() - t)
                s.reset()
                t = time.perf_counter()
                s.prefill(prompt)
                warm.append(time.perf_counter() - t)
                n = s.position
                t = time.perf_counter()
                for _ in range(new_tokens):
                    s.decode_one(SamplingConfig())
                step.append((time.perf_counter() - t) / new_tokens)
        ms = lambda xs: f"{min(xs) * 1e3:5.1f} / {statistics.median(xs) * 1e3:5.1f}"  # noqa: E731
        print(f"{fam:14s} {kind:5s} {n:4d} ids | prefill ms, processor run: {ms(cold)} | media memoized: "
              f"{ms(warm)} | decode ms/token: {ms(step)}")


if __name__ == "__main__":
    time_families()
