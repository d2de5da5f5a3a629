"""compile=True: a fixed-size cache per session and a torch.compile'd decode step
(engines/compiled.py). The whole contract suite also runs on a compiled tiny
Llama (tests/cases.py); these tests check what is particular to it, and the
real SmolLM2 against the default engine."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

from app import parse_args
from engines import ContextFull, InvalidArgument, MultimodalInput as MI, load_engine
from engines.cpu_tuning import DECODE_THREADS_ENV
from engines.hf_text import HFTextEngine
from tests.cases import greedy_ids, hf_kv_held
from tests.tiny_models import _built, compiled_engine, make_tokenizer


def _no_cache_logits(engine, ids) -> torch.Tensor:
    with torch.inference_mode():
        return engine.model(torch.tensor([ids], device=engine.device), use_cache=False).logits[0, -1]


def _count_steps(engine, monkeypatch) -> list[int]:
    """Record each call of the compiled step (the position it ran at)."""
    calls, step = [], engine.compiled.graph

    def counted(**kw):
        calls.append(int(kw["past_key_values"].get_seq_length()))
        return step(**kw)

    monkeypatch.setattr(engine.compiled, "graph", counted)
    return calls


def test_one_graph_serves_every_step_across_sessions_seeks_and_resets(monkeypatch):
    engine = compiled_engine()
    calls = _count_steps(engine, monkeypatch)
    graphs = counters["stats"]["unique_graphs"]
    prompt = engine.render([{"role": "user", "content": "What is the capital of France?"}])
    with engine.create_session() as a, engine.create_session() as b:
        a.prefill(prompt)
        b.prefill(engine.render([{"role": "user", "content": "Write a haiku about the sea."}]))
        start = a.position
        first = [greedy_ids(a, 3), greedy_ids(b, 3), greedy_ids(a, 3)]  # interleaved: two caches, one graph
        a.seek(start + 2)  # crop, then the kept last token re-runs through the step
        a.prefill([MI.text(" Paris")])
        greedy_ids(a, 4)
        assert torch.allclose(a.pending_logits, _no_cache_logits(engine, a.tokens), atol=1e-5)
        b.reset()
        b.prefill(prompt)
        assert greedy_ids(b, 6) == (first[0] + first[2])[:6]  # a reset session repeats itself
        cap = engine.capacity
        for s in (a, b):  # each on its own fixed-size cache, allocated whole
            assert hf_kv_held(engine, s) == (cap.estimated_bytes_per_session, cap.max_context_len)
    assert counters["stats"]["unique_graphs"] == graphs, "a step recompiled"
    assert len(calls) >= 20 and all(n > 0 for n in calls)  # every decode step went through the graph


def test_the_fixed_size_cache_ends_at_the_context_and_can_rewind_from_there():
    engine = compiled_engine()
    limit = engine.max_context
    with engine.create_session() as s:
        s.prefill([MI.tokens([5] * (limit - 2))])
        greedy_ids(s, 2)
        assert s.position == limit
        with pytest.raises(ContextFull, match=f"reached the context of {limit}"):
            greedy_ids(s, 1)
        s.seek(10)
        s.prefill([MI.tokens([7, 8, 9])])
        assert torch.allclose(s.pending_logits, _no_cache_logits(engine, s.tokens), atol=1e-5)
        greedy_ids(s, 3)  # compiled steps, with hundreds of stale slots past the position
        assert torch.allclose(s.pending_logits, _no_cache_logits(engine, s.tokens), atol=1e-5)


def test_steps_run_with_the_thread_count_they_were_compiled_for(monkeypatch):
    engine = compiled_engine()
    graphs = counters["stats"]["unique_graphs"]
    seen = []
    step = engine.compiled.graph
    monkeypatch.setattr(engine.compiled, "graph", lambda **kw: seen.append(torch.get_num_threads()) or step(**kw))
    monkeypatch.setenv(DECODE_THREADS_ENV, str(engine.compiled.threads + 1))  # changed after load
    with engine.create_session() as s:
        s.prefill([MI.tokens([5, 6, 7])])
        greedy_ids(s, 3)
    assert seen and set(seen) == {engine.compiled.threads}
    assert counters["stats"]["unique_graphs"] == graphs


def _tiny(cls, config_cls, **kw):
    tok = make_tokenizer([])
    config = config_cls(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, **kw)
    return cls(config).eval(), tok


def test_compile_is_refused_with_a_reason_where_the_model_cannot_take_it():
    model, tok = _tiny(MistralForCausalLM, MistralConfig, sliding_window=16)
    with pytest.raises(InvalidArgument, match="full attention on every layer.*sliding window of 16 tokens"):
        HFTextEngine(model, tok, name="tiny-mistral", compile=True)
    model, tok = _tiny(LlamaForCausalLM, LlamaConfig)
    with pytest.raises(InvalidArgument, match="compile must be True or False, got 'yes'"):
        HFTextEngine(model, tok, name="tiny-llama", compile="yes")
    with pytest.raises(InvalidArgument, match="text models only, and .* is multimodal"):
        load_engine(str(_built("llava")), device="cpu", compile=True)


def test_the_app_flag_and_its_environment_variable(monkeypatch):
    assert parse_args([]).compile is False
    assert parse_args(["--compile"]).compile is True
    monkeypatch.setenv("PLAYGROUND_COMPILE", "1")
    assert parse_args([]).compile is True
    monkeypatch.setenv("PLAYGROUND_COMPILE", "0")
    assert parse_args([]).compile is False


def test_compiled_smollm2_replies_and_regenerates_like_the_default_engine(smol, monkeypatch):
    """The real default model, compiled (about a minute and a half on a 2-core CPU)."""
    threads = torch.get_num_threads()
    engine = load_engine("smollm2", device=smol.device.type, dtype=smol.dtype, max_context=512, compile=True)
    assert torch.get_num_threads() == threads  # compiling for the decode step's count left the caller's alone
    calls = _count_steps(engine, monkeypatch)
    prompt = smol.render([{"role": "user", "content": "Name three colours."}])
    with smol.create_session() as ref, engine.create_session() as s:
        ref.prefill(prompt)
        s.prefill(prompt)
        want = greedy_ids(ref, 24)
        assert greedy_ids(s, 24) == want
        err = (s.pending_logits - _no_cache_logits(engine, s.tokens)).abs().max().item()
        assert err < 2e-3, f"compiled-step logits drift from a no-cache forward by {err}"
        s.seek(len(smol.tokenize(prompt)))  # regenerate
        assert greedy_ids(s, 24) == want
    assert len(calls) >= 2 * 24
