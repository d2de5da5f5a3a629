"""(f) Memory: KV bytes per token measured on a live cache against the engine's
computed `capacity.kv_bytes_per_token`, and resident memory per extra session."""

from __future__ import annotations

import ctypes
import gc

import psutil

from engines import MultimodalInput, SamplingConfig


def _trim() -> None:
    gc.collect()
    try:  # hand freed heap pages back, so RSS reflects what is live
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def cache_bytes(session) -> tuple[int, int]:
    """(bytes of the resident keys/values, bytes allocated for them). The session's
    GrowingLayers hold views of buffers with up to 255 spare token rows."""
    cache = getattr(session, "_cache", None)
    live, storages = 0, {}
    for layer in getattr(cache, "layers", []) or []:
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if t is not None and hasattr(t, "numel"):
                live += t.numel() * t.element_size()
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return live, sum(storages.values())


def run(engine, context_tokens: int = 1024, sessions: int = 3) -> dict:
    from .decode import prompt_ids

    base = prompt_ids(engine)
    ids = (base * (context_tokens // len(base) + 1))[:context_tokens]
    proc = psutil.Process()
    # Warm the allocator with one throwaway session so the first measured one is not special.
    s = engine.create_session()
    s.prefill([MultimodalInput.tokens(ids)])
    s.decode_one(SamplingConfig())
    live, allocated = cache_bytes(s)
    kv_measured, kv_allocated = live / s.position, allocated / s.position
    s.close()
    del s
    _trim()
    rss = [proc.memory_info().rss]
    empty_rss = []
    live = []
    try:
        for _ in range(sessions):
            s = engine.create_session()
            live.append(s)
            _trim()
            empty_rss.append(proc.memory_info().rss)
            s.prefill([MultimodalInput.tokens(ids)])
            _trim()
            rss.append(proc.memory_info().rss)
    finally:
        for s in live:
            s.close()
    deltas = [b - a for a, b in zip(rss, rss[1:])]
    computed = engine.capacity.kv_bytes_per_token
    return {
        "kv_bytes_per_token_measured": kv_measured,
        "kv_bytes_per_token_computed": computed,
        "kv_measured_over_computed": kv_measured / computed,
        "kv_allocated_bytes_per_token": kv_allocated,
        "kv_allocated_over_measured": kv_allocated / kv_measured,
        "context_tokens": context_tokens,
        "kv_bytes_at_context_computed": computed * context_tokens,
        "rss_per_extra_session_bytes": sorted(deltas)[len(deltas) // 2],
        "rss_per_extra_session_all": deltas,
        "rss_empty_session_bytes": (empty_rss[0] - rss[0]) if empty_rss else None,
        "rss_over_kv": sorted(deltas)[len(deltas) // 2] / (computed * context_tokens),
        "estimated_bytes_per_session_full_context": engine.capacity.estimated_bytes_per_session,
    }
