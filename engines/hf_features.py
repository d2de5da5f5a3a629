"""Media features as a transformers multimodal model takes them: one prefill's
per-block tensors merged, and what a processor or config says about media
(the marker a template writes, the placeholder ids).

Knows nothing of sessions, caches or loading: plain functions over tensors,
processors and configs.
"""

from __future__ import annotations

import torch

from .base import EngineError

IDEFICS_FAMILIES = ("idefics2", "idefics3", "smolvlm")  # pixel tensors batch images on dim 1
TEXT_KEYS = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids")  # a processor's, not features


def features(processed) -> dict:
    """The feature tensors of a processor's output (pixel values, mel features, grids)."""
    return {k: v for k, v in processed.items() if torch.is_tensor(v) and k not in TEXT_KEYS}


def merge(feats: list[dict], family: str) -> dict:
    """One prefill's features: each block's tensors concatenated in order."""
    if not feats:
        return {}
    dim1 = family in IDEFICS_FAMILIES
    out = {}
    for k in feats[0]:
        parts = [f[k] for f in feats]
        d = 1 if dim1 and k in ("pixel_values", "pixel_attention_mask") else 0
        out[k] = parts[0] if len(parts) == 1 else torch.cat(pad_dims(parts, d), dim=d)
    return out


def pad_dims(parts, dim):
    """Blocks may differ in other sizes (Idefics tiles, Gemma 3n audio frames): zero-pad
    them; the masks that come with them mark the padding invalid."""
    shape = [max(p.shape[i] for p in parts) for i in range(parts[0].dim())]
    out = []
    for p in parts:
        pad = []
        for i in reversed(range(p.dim())):
            pad += [0, 0 if i == dim else shape[i] - p.shape[i]]
        out.append(torch.nn.functional.pad(p, pad) if any(pad) else p)
    return out


def to_model(v, device, dtype):
    """A feature tensor on the model's device; floating ones in its dtype too."""
    return v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device)


def marker(processor, kind: str) -> str:
    """The text a chat template writes for one image/audio part; the processor expands it
    (Gemma 3: `<start_of_image>`; Gemma 3n: `<audio_soft_token>`; Qwen: wrapped pads)."""
    tok = getattr(processor, f"{kind}_token", None)
    if tok is None:
        raise EngineError(f"the processor has no {kind} token")
    if kind == "image" and "<|vision_start|>" in processor.tokenizer.get_vocab():
        return f"<|vision_start|>{tok}<|vision_end|>"
    bos, eos = getattr(processor, f"{kind}_bos_token", None), getattr(processor, f"{kind}_eos_token", None)
    if bos and eos:
        return f"{bos}{tok}{eos}"
    return tok


def placeholder_ids(cfg) -> set[int]:
    """Every media placeholder id the config names (image, audio, video)."""
    ids = set()
    for c in (cfg, cfg.get_text_config()):
        for k in ("image_token_id", "image_token_index", "audio_token_id", "audio_token_index", "video_token_id"):
            v = getattr(c, k, None)
            if isinstance(v, int):
                ids.add(v)
    return ids


def first_attr(obj, *names):
    return next((getattr(obj, n) for n in names if getattr(obj, n, None) is not None), None)
