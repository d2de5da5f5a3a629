"""Opt-in compiled decoding: a fixed-size cache per session and a
`torch.compile`d one-token step.

A decode step on a `StaticCache` has the same shapes at every position, so it
compiles once and is reused by every session and after every seek or reset:
the cache tensors are graph inputs with no identity guard, so a new session's
cache does not recompile. The graph is guarded on torch's thread count, so the
step always runs with the count it was compiled with. Prefills have varying
lengths and run eagerly on the same cache.

Seek still works (`kv.crop_to`): a `StaticCache` writes each token at its
position and the causal mask hides every slot past the query, so a rewind only
moves the layers' length counters; the next forward overwrites stale slots.

CUDA graphs (`mode="reduce-overhead"`) are not used: their trees keep
thread-local state and assert when called from another thread
(pytorch/pytorch#123177), and Gradio runs handlers in worker threads.

Every step attends over every slot of the cache, masked or not, so the cache
size (the engine's `max_context`) sets a step's cost. Measured on the 2-core
CPU here (SmolLM2, fp32, benchmarks/RESULTS.md "(h)"): compiling takes 47-67 s,
and decoding runs at x0.44 the eager rate with the full 8,192-token cache and
x0.87 with a 2,048-token one, so CPU engines leave this off.
"""

from __future__ import annotations

import sys
import time

import torch
from transformers import StaticCache
from transformers.cache_utils import StaticLayer


def why_not_compilable(model) -> str | None:
    """Why `model` cannot use the compiled path, or None when it can."""
    config = model.config
    if config.get_text_config() is not config:
        return "it is a composite (multimodal) model"
    types = set(getattr(config, "layer_types", None) or ("full_attention",))
    if types != {"full_attention"}:
        return f"its layer types are {', '.join(sorted(types))}, not only full_attention"
    if getattr(config, "sliding_window", None):
        return f"it has a sliding window of {config.sliding_window} tokens"
    return None


class CompiledStep:
    """The compiled one-token forward and the caches it runs on."""

    def __init__(self, model, max_len: int):
        """`model` must pass `why_not_compilable()`; the engine checks that first."""
        self.model = model
        self.max_len = max_len
        self.graph = torch.compile(model.forward, fullgraph=True, dynamic=False)  # the compiled forward
        self.compile_s = None  # seconds the first step took, set by warm_up
        self.threads = None  # torch threads the graph was compiled with, set by warm_up

    def new_cache(self) -> StaticCache:
        cache = StaticCache(config=self.model.config, max_cache_len=self.max_len)
        assert all(type(layer) is StaticLayer for layer in cache.layers)  # why_not_compilable() ruled the others out
        return cache

    def __call__(self, token: int, cache: StaticCache) -> torch.Tensor:
        """Forward one token; returns its next-token logits (a fresh tensor)."""
        input_ids = torch.tensor([[token]], dtype=torch.long, device=self.model.device)
        # A cache's first forward allocates its buffers, which must happen outside the graph.
        step = self.graph if cache.layers[0].is_initialized else self.model.forward
        if self.threads and torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)  # another count would recompile (a guard)
        out = step(input_ids=input_ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        return out.logits[0, -1].clone()  # not a view the next call could write over

    def warm_up(self, threads: int) -> None:
        """Compile now, at load, rather than on the first user's first token,
        for steps run with `threads` torch threads; the caller's count is kept."""
        print(f"compiling the decode step for {self.model.device.type} (one-off; about a minute on CPU)...",
              file=sys.stderr)
        before, self.threads = torch.get_num_threads(), threads
        t0 = time.perf_counter()
        with torch.inference_mode():
            cache = self.new_cache()
            self(0, cache)  # eager: allocates the cache
            self(0, cache)  # compiles
        self.compile_s = time.perf_counter() - t0
        torch.set_num_threads(before)
