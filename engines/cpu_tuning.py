"""CPU tuning of a transformers engine: torch threads per forward, and the weight
layout of one-row matrix products.

Knows nothing of sessions, caches or inputs: each function reads only the
engine's `model`, `device`, `dtype` and `num_threads`. Measurements are in
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import os

import torch

DECODE_THREADS_ENV = "PLAYGROUND_DECODE_THREADS"
GEMV_LAYOUT_ENV = "PLAYGROUND_GEMV_LAYOUT"


def decode_threads(engine) -> int:
    """Threads for a one-token step: 1 on CPU, unless $PLAYGROUND_DECODE_THREADS says otherwise.

    Why (benchmarks/RESULTS.md): a CPU decode step is almost all fp32 matrix-vector
    products, which torch's BLAS runs on one thread whatever the setting; extra
    OpenMP threads only add a barrier per op, and that barrier stalls for a whole
    scheduler slice whenever another process holds a core (a shared Space).
    """
    env = os.environ.get(DECODE_THREADS_ENV)
    if env:
        return max(1, int(env))
    return 1 if engine.device.type == "cpu" else engine.num_threads


def use_threads(engine, n_tokens: int) -> None:
    """Set this thread's torch thread count for a forward of `n_tokens`: prefill
    (a real matrix multiply) uses `engine.num_threads`, a decode step `decode_threads`.
    torch's setting is per OS thread, and Gradio runs handlers in worker threads."""
    want = decode_threads(engine) if n_tokens == 1 else engine.num_threads
    if torch.get_num_threads() != want:
        torch.set_num_threads(want)


def use_gemv_layout(engine) -> int:
    """Once per engine, on CPU in fp32: keep each `nn.Linear` weight in column-major
    memory (same module, shape, values and tying; `w.t().contiguous().t()`).

    Why (benchmarks/RESULTS.md): a decode step is one-row matrix products, and
    torch's fp32 one-row `linear` is ~1.8x faster on this layout (the 49,152x576 LM
    head: 10 ms -> 5.5 ms); a whole decode step 18 % faster, prefill unchanged, same
    greedy tokens. $PLAYGROUND_GEMV_LAYOUT=0 turns it
    off. Returns how many weights it re-laid. Called once, while the engine loads.
    """
    if (os.environ.get(GEMV_LAYOUT_ENV, "1") == "0" or engine.device.type != "cpu"
            or engine.dtype != torch.float32):
        return 0
    n = 0
    with torch.inference_mode(False), torch.no_grad():  # plain tensors, usable outside inference mode too
        for module in engine.model.modules():
            w = getattr(module, "weight", None)
            if isinstance(module, torch.nn.Linear) and w is not None and w.dim() == 2 and w.is_contiguous():
                w.data = w.data.t().contiguous().t()
                n += 1
    return n
