"""Attention for CPU sessions: torch's SDPA with grouped-query heads handled
inside the kernel.

transformers' "sdpa" copies every cached key and value head `num_key_value_groups`
times (`repeat_kv`) whenever it passes a mask, which it does for every prefill
that follows cached tokens: a new user turn, an edit. On CPU, torch's kernel
takes the grouped heads and the mask directly (`enable_gqa=True`): a 55-token
turn over 1,166 cached tokens went from 3.1 to 2.2 ms per layer, same values.
On CUDA, a mask with `enable_gqa` falls back to the slow math kernel, so CUDA
keeps "sdpa".
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

NAME = "sdpa_gqa"


_NOT_HANDLED = ("softcap", "s_aux", "sinks", "position_bias", "output_attentions")


def sdpa_gqa_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                     **kwargs):
    if query.device.type != "cpu" or any(kwargs.get(k) for k in _NOT_HANDLED):  # e.g. the model moved to CUDA
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    is_causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    # Without a mask, a multi-token query is the whole sequence (transformers drops the mask only then).
    is_causal = bool(query.shape[2] > 1 and attention_mask is None and is_causal)
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, is_causal=is_causal,
        enable_gqa=query.shape[1] != key.shape[1],
    )
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(NAME, sdpa_gqa_forward)
ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)


def use_sdpa_gqa(model) -> bool:
    """Switch a CPU model from "sdpa" to this attention when it has nothing this
    simple kernel call would drop (soft-capping, a sliding window, chunked attention;
    the forward also hands anything unusual back to transformers' "sdpa").
    Returns whether it switched. Called once, while the engine loads."""
    config = model.config
    plain = (config.get_text_config() is config  # one plain decoder, not a composite multimodal model
             and getattr(config, "_attn_implementation", None) == "sdpa"
             and not getattr(config, "attn_logit_softcapping", None)
             and not getattr(config, "sliding_window", None)
             and not getattr(config, "attention_chunk_size", None)
             and all(t == "full_attention" for t in getattr(config, "layer_types", None) or ())
             and getattr(config, "num_key_value_heads", None) not in (None, config.num_attention_heads))
    if not plain or model.device.type != "cpu":
        return False
    model.set_attn_implementation(NAME)
    return model.config._attn_implementation == NAME
