"""The session cache's GrowingLayer and the CPU attention `sdpa_gqa`, each against
the transformers class it replaces, and on the real SmolLM2 against a no-cache forward."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import Gemma3TextConfig, LlamaConfig, LlamaForCausalLM, LlavaConfig
from transformers.cache_utils import DynamicLayer

from engines import MultimodalInput as MI
from engines import kv
from engines.attention import NAME, use_sdpa_gqa
from tests.cases import greedy_ids


def _kv(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 3, n, 8, generator=g), torch.randn(1, 3, n, 8, generator=g)


# Chunks that cross the GROW_TOKENS boundary, with crops in between (negative = crop).
SCRIPT = [5, 1, 1, kv.GROW_TOKENS - 10, 30, -7, 1, -100, kv.GROW_TOKENS + 84, 1, -1, 1]  # regrows after a crop


def test_growing_layer_matches_dynamic_layer_through_updates_and_crops():
    ours, ref = kv.GrowingLayer(), DynamicLayer()
    for i, step in enumerate(SCRIPT):
        if step < 0:
            ours.crop(step)
            ref.crop(step)
        else:
            k, v = _kv(step, seed=i)
            got, want = ours.update(k, v), ref.update(k, v)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        assert ours.get_seq_length() == ref.get_seq_length()
        assert torch.equal(ours.keys, ref.keys) and torch.equal(ours.values, ref.values)
    assert ours.capacity == 3 * kv.GROW_TOKENS  # the last growth copied a cropped layer
    ours.reset()
    assert ours.get_seq_length() == 0 and not ours.is_initialized
    with pytest.raises(ValueError, match="negative"):
        ours.crop(3)


def test_growing_layer_writes_in_place_until_full():
    layer = kv.GrowingLayer()
    layer.update(*_kv(10, 0))
    buf = layer.keys.data_ptr()  # keys are a view of the start of the buffer
    for i in range(kv.GROW_TOKENS - 10):
        layer.update(*_kv(1, i + 1))
    assert layer.keys.data_ptr() == buf and layer.capacity == kv.GROW_TOKENS  # no copy while there was room
    layer.update(*_kv(1, 999))
    assert layer.keys.data_ptr() != buf and layer.capacity == 2 * kv.GROW_TOKENS


def test_new_cache_uses_growing_layers_for_full_attention(smol):
    cache = kv.new_cache(smol.model.config)
    assert cache.layers and all(type(layer) is kv.GrowingLayer for layer in cache.layers)


def test_new_cache_keeps_sliding_window_layers_and_their_past():
    config = Gemma3TextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=16,
                              layer_types=["sliding_attention", "sliding_attention", "sliding_attention",
                                           "full_attention"])
    cache = kv.new_cache(config)
    kinds = [type(layer).__name__ for layer in cache.layers]
    assert kinds == ["DynamicSlidingWindowLayer"] * 3 + ["GrowingLayer"]
    assert all(cache.is_recording_past(i) for i in range(3))
    assert not use_sdpa_gqa(SimpleNamespace(config=config, device=torch.device("cpu")))


def test_session_across_the_grow_boundary_equals_a_no_cache_forward(smol):
    """Prefill to just under a buffer step, decode across it, rewind below it and decode again."""
    text = "The quick brown fox jumps over the lazy dog. " * 40
    ids = smol.tokenize([MI.text(text)])[: kv.GROW_TOKENS - 3]
    with smol.create_session() as s:
        s.prefill([MI.tokens(ids)])
        greedy_ids(s, 8)
        assert s.position > kv.GROW_TOKENS
        s.seek(kv.GROW_TOKENS - 20)
        s.prefill([MI.tokens(ids[:5])])
        greedy_ids(s, 4)
        with torch.inference_mode():
            ref = smol.model(torch.tensor([s.tokens], device=smol.device), use_cache=False).logits[0, -1]
        err = (ref.float() - s.pending_logits.float()).abs().max().item()
        assert err < 2e-3, f"cached logits drift from a no-cache forward by {err}"


def _tiny_llama(**kw) -> LlamaForCausalLM:
    torch.manual_seed(0)
    shape = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    config = LlamaConfig(**{**shape, **kw})
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config).eval()


def test_sdpa_gqa_equals_sdpa_for_prefill_after_cached_tokens_and_decode():
    model = _tiny_llama()
    ids = torch.randint(0, 64, (1, 40), generator=torch.Generator().manual_seed(1))

    def run():  # a whole prompt, a chunk over cached tokens, then one step
        cache = kv.new_cache(model.config)
        with torch.inference_mode():
            outs = [model(input_ids=ids[:, a:b], past_key_values=cache, use_cache=True).logits
                    for a, b in ((0, 20), (20, 39), (39, 40))]
        return torch.cat(outs, dim=1)

    want = run()
    assert use_sdpa_gqa(model) and model.config._attn_implementation == NAME
    got = run()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_sdpa_gqa_is_only_used_on_a_plain_grouped_head_decoder():
    assert not use_sdpa_gqa(_tiny_llama(num_key_value_heads=4))  # no grouped heads: nothing to gain
    soft = _tiny_llama()
    soft.config.attn_logit_softcapping = 30.0  # a kernel call with no soft-capping would drop it
    assert not use_sdpa_gqa(soft) and soft.config._attn_implementation == "sdpa"
    composite = LlavaConfig(text_config=_tiny_llama().config.to_dict())
    assert not use_sdpa_gqa(SimpleNamespace(config=composite, device=torch.device("cpu")))


def test_sdpa_gqa_hands_what_it_does_not_handle_back_to_transformers(monkeypatch):
    import engines.attention as attention

    seen = []
    monkeypatch.setattr(attention, "sdpa_attention_forward", lambda *a, **k: seen.append(k) or ("stock", None))
    q, k = torch.randn(1, 4, 3, 8), torch.randn(1, 2, 3, 8)
    module = SimpleNamespace(is_causal=True, num_key_value_groups=2)
    assert attention.sdpa_gqa_forward(module, q, k, k, None, softcap=30.0)[0] == "stock"
    out, _ = attention.sdpa_gqa_forward(module, q, k, k, None)
    assert out.shape == (1, 3, 4, 8) and len(seen) == 1


def test_the_default_engine_uses_sdpa_gqa_on_cpu_and_a_turn_after_cached_tokens_is_exact(smol):
    """A prefill after cached tokens is the masked path sdpa_gqa changes; its logits
    must equal a no-cache forward of the whole sequence (the unmasked causal path)."""
    if smol.device.type != "cpu":
        pytest.skip("sdpa_gqa is for CPU")
    assert smol.model.config._attn_implementation == NAME
    first = smol.render([{"role": "user", "content": "Name three colours."}])
    with smol.create_session() as s:
        s.prefill(first)
        greedy_ids(s, 6)
        s.prefill([MI.text("<|im_end|>\n<|im_start|>user\nAnd three fruits?<|im_end|>\n<|im_start|>assistant\n")])
        with torch.inference_mode():
            ref = smol.model(torch.tensor([s.tokens]), use_cache=False).logits[0, -1]
        err = (ref - s.pending_logits).abs().max().item()
        assert err < 2e-3, f"a prefill after cached tokens drifts from a no-cache forward by {err}"
