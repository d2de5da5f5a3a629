"""Small helpers over transformers' caches (DynamicCache, and the StaticCache
of compiled engines) that report what they did, a full-attention cache
layer that grows without a copy per token, and a config's KV bytes per token."""

from __future__ import annotations

import torch
from transformers import DynamicCache, StaticCache
from transformers.cache_utils import DynamicLayer

GROW_TOKENS = 256  # capacity is added in steps of this many tokens


class GrowingLayer(DynamicLayer):
    """A DynamicLayer that writes into a buffer with spare room.

    DynamicLayer appends with `torch.cat`, which copies the whole layer every
    step; at 2,011 cached tokens a CPU decode step here takes ×0.89 the time
    (benchmarks/RESULTS.md, "Run 4 changes").
    Here `keys`/`values` are views of the first `length` rows of a buffer that
    grows by GROW_TOKENS rows when full, so a step writes one row and a crop
    only moves `length`. Same values, same shapes, as DynamicLayer. For one
    sequence under `torch.inference_mode()` (as sessions run): no beams, no
    offloading.
    """

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self._kbuf = self._vbuf = None
        self._length = 0

    def _grow(self, need: int, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        cap = -(-need // GROW_TOKENS) * GROW_TOKENS
        kbuf = key_states.new_empty(*key_states.shape[:-2], cap, key_states.shape[-1])
        vbuf = value_states.new_empty(*value_states.shape[:-2], cap, value_states.shape[-1])
        if self._length:
            kbuf[..., : self._length, :] = self.keys
            vbuf[..., : self._length, :] = self.values
        self._kbuf, self._vbuf = kbuf, vbuf

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start, end = self._length, self._length + key_states.shape[-2]
        if self._kbuf is None or end > self._kbuf.shape[-2]:
            self._grow(end, key_states, value_states)
        self._kbuf[..., start:end, :] = key_states
        self._vbuf[..., start:end, :] = value_states
        self._set_length(end)
        return self.keys, self.values

    def _set_length(self, n: int) -> None:
        self._length = n
        self.keys = self._kbuf[..., :n, :]
        self.values = self._vbuf[..., :n, :]

    def get_seq_length(self) -> int:
        return self._length if self.is_initialized else 0

    @property
    def capacity(self) -> int:
        """Tokens the buffer holds before it must grow (0 before the first update)."""
        return 0 if getattr(self, "_kbuf", None) is None else self._kbuf.shape[-2]

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative count of tokens to remove, got {tokens_to_remove}")
        if tokens_to_remove and self.is_initialized:
            self._set_length(max(0, self._length + tokens_to_remove))

    def reset(self) -> None:
        self._kbuf = self._vbuf = None
        self._length = 0
        super().reset()

    def _one_sequence(self, *args, **kwargs):
        raise NotImplementedError("a session cache holds one sequence on one device")

    batch_repeat_interleave = batch_select_indices = reorder_cache = offload = prefetch = _one_sequence


def bytes_per_token(cfg, dtype) -> int:
    """KV bytes one token takes in every layer of a text config, at `dtype`."""
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    itemsize = torch.empty(0, dtype=dtype).element_size()
    return 2 * cfg.num_hidden_layers * kv_heads * head_dim * itemsize


def new_cache(config) -> DynamicCache:
    """A DynamicCache whose full-attention layers are GrowingLayers, and whose
    sliding-window layers keep their past until cropped, so a rewind after the
    window filled up can still be served."""
    cache = DynamicCache(config=config)
    cache.layers = [GrowingLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    if cache.layer_class_to_replicate is DynamicLayer:  # a config without layer types
        cache.layer_class_to_replicate = GrowingLayer
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


def crop_to(cache: DynamicCache | StaticCache, length: int) -> int:
    """Crop the cache to `length` tokens; returns how many were removed."""
    removed = int(cache.get_seq_length()) - length
    if removed <= 0:
        return 0
    if isinstance(cache, StaticCache):
        # No crop(): move each layer's length back. The causal mask hides the
        # slots past it, and the next forward overwrites them.
        with torch.inference_mode():  # its tensors were made under inference_mode
            for layer in cache.layers:
                layer.cumulative_length.fill_(length)
    else:
        cache.crop(-removed)  # a positive argument raises in transformers 5
    return removed


def copy_cache(cache):
    """An independent copy of a session's cache (for `Session.fork`). Views stay
    views of their own copied buffer (deepcopy keeps storage sharing)."""
    import copy

    with torch.inference_mode():  # the cache's tensors were made under inference_mode
        return copy.deepcopy(cache)
