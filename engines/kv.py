"""Small helpers over transformers' DynamicCache that report what they did."""

from __future__ import annotations

from transformers import DynamicCache


def new_cache(config) -> DynamicCache:
    """A DynamicCache whose sliding-window layers keep their past until cropped,
    so a rewind after the window filled up can still be served."""
    cache = DynamicCache(config=config)
    if any(getattr(layer, "is_sliding", False) for layer in cache.layers):
        cache.activate_past_recording()
    return cache


def seek_floor(cache: DynamicCache | None) -> int:
    """The lowest position the cache can be cropped back to.

    A sliding-window layer keeps `window - 1` tokens once it has been cropped;
    a cut must leave a full window of keys behind it, so it cannot go lower
    than `dropped + window - 1`, where `dropped` tokens are already gone.
    """
    if cache is None:
        return 0
    floor = 0
    for layer in cache.layers:
        window = getattr(layer, "sliding_window", None)
        if not window or not getattr(layer, "is_initialized", False):
            continue
        dropped = layer.get_seq_length() - layer.keys.shape[-2]
        if dropped > 0:
            floor = max(floor, dropped + window - 1)
    return floor


def crop_to(cache: DynamicCache, length: int) -> int:
    """Crop the cache to `length` tokens; returns how many were removed."""
    removed = cache.get_seq_length() - length
    if removed > 0:
        cache.crop(-removed)  # a positive argument raises in transformers 5
    return max(removed, 0)
