"""The transformers text engine on the real SmolLM2: against generate(), a no-cache
forward, real EOS, streaming text, and the context limit."""

from __future__ import annotations

import pytest
import torch

from engines import ContextFull, MultimodalInput as MI, SamplingConfig, load_engine
from engines.detok import StreamDecoder
from tests.cases import greedy_ids

GREEDY = SamplingConfig()
PROMPTS = ["What is the capital of France?", "Write a short poem about autumn.", "Explain what a CPU does."]

@pytest.mark.parametrize("question", PROMPTS)
def test_greedy_decode_one_loop_equals_generate(smol, question):
    prompt = smol.render([{"role": "user", "content": question}])
    ids = smol.tokenize(prompt)
    with smol.create_session() as s:
        s.prefill(prompt)
        got = greedy_ids(s, 32)
    with torch.inference_mode():
        out = smol.model.generate(
            torch.tensor([ids], device=smol.device), max_new_tokens=32, do_sample=False,
            eos_token_id=sorted(smol.eos_token_ids), pad_token_id=min(smol.eos_token_ids),
        )
    want = [t for t in out[0, len(ids):].tolist()]
    if want and want[-1] in smol.eos_token_ids:
        want = want[:-1]  # EOS is returned by decode_one but never made resident
    assert got == want

def test_pending_logits_equal_a_no_cache_forward(smol):
    prompt = smol.render([{"role": "user", "content": PROMPTS[0]}])
    with smol.create_session() as s:
        s.prefill(prompt)
        greedy_ids(s, 16)
        with torch.inference_mode():
            ref = smol.model(torch.tensor([s.tokens], device=smol.device), use_cache=False).logits[0, -1]
        err = (ref.float() - s.pending_logits.float()).abs().max().item()
        assert err < 2e-3, f"cached decode drifts from a no-cache forward by {err}"

def test_a_real_eos_is_returned_and_not_made_resident(smol):
    prompt = smol.render([{"role": "user", "content": "Reply with only the word: yes"}])
    with smol.create_session() as s:
        s.prefill(prompt)
        for _ in range(40):
            before = s.tokens
            r = s.decode_one(GREEDY)
            if r.is_eos:
                break
        assert r.is_eos and r.is_terminal and r.text_piece == ""
        assert r.token_id in smol.eos_token_ids
        assert s.tokens == before and r.token_id not in s.tokens[len(smol.tokenize(prompt)):]

SPLIT_TEXTS = [
    "Hi 👋🏽! Family: 👨‍👩‍👧‍👦 and 🤖.",
    "日本語のテキスト、中文字符和한국어.",
    "naïve café — “quotes” ≠ ascii ✓",
]

class _NoBackend:
    """The same tokenizer seen through `decode` only: exercises the fallback path."""

    def __init__(self, tok):
        self._tok = tok

    def decode(self, ids, skip_special_tokens=False):
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

@pytest.mark.parametrize("backend", ["decode_stream", "offsets"])
@pytest.mark.parametrize("text", SPLIT_TEXTS)
def test_streamed_pieces_never_break_a_character(smol, text, backend):
    tok = smol.tokenizer
    ids = tok.encode(text, add_special_tokens=False)
    assert any("\ufffd" in tok.decode([i]) for i in ids), "the text should split characters across tokens"
    dec = StreamDecoder(tok if backend == "decode_stream" else _NoBackend(tok))
    shown = ""
    for k, t in enumerate(ids, 1):
        piece = dec.step(t)
        assert "\ufffd" not in piece
        shown += piece
        full = tok.decode(ids[:k])
        # Held back: only the token(s) of an unfinished character; caught up once it completes.
        assert full.startswith(shown), f"after {k} ids"
        if not full.endswith("\ufffd"):
            assert shown == full, f"after {k} ids"
    assert shown == text

def test_a_real_replys_pieces_concatenate_to_its_decoded_ids(smol):
    prompt = smol.render([{"role": "user", "content": "Write two emoji and a Chinese word."}])
    with smol.create_session() as s:
        s.prefill(prompt)
        ids, text = [], ""
        for _ in range(24):
            r = s.decode_one(GREEDY)
            if r.is_terminal:
                break
            ids.append(r.token_id)
            text += r.text_piece
    assert "\ufffd" not in text
    assert text == smol.tokenizer.decode(ids).rstrip("\ufffd")

def test_context_full_is_detected_up_front_with_the_numbers():
    small = load_engine("smollm2", max_context=24)
    assert small.capacity.max_context_len == 24
    with small.create_session() as s:
        s.prefill([MI.text("one two three four five six seven eight")])
        n = s.position
        with pytest.raises(ContextFull, match=rf"position {n} \+ \d+ new tokens exceeds the context of 24"):
            s.prefill([MI.text(" nine ten" * 10)])
        assert s.position == n
        while s.position < 24:
            if s.decode_one(GREEDY).is_eos:
                s.prefill([MI.text(" and")])
        before = s.tokens
        with pytest.raises(ContextFull, match="reached the context of 24"):
            s.decode_one(GREEDY)
        assert s.tokens == before
        s.seek(20)  # room again after a rewind
        r = s.decode_one(GREEDY)
        assert s.position == 20 + (0 if r.is_eos else 1)

def test_render_splices_exact_reply_ids(smol):
    odd = smol.tokenize([MI.text(" Hello")]) + smol.tokenize([MI.text("world")])  # not how "Hello world" tokenizes
    inputs = smol.render(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ignored", "token_ids": odd}],
        add_generation_prompt=False,
    )
    spliced = [i for i in inputs if i.kind == "tokens"]
    assert len(spliced) == 1 and list(spliced[0].value) == odd
    assert "ignored" not in "".join(i.value for i in inputs if i.kind == "text")

def test_top_logprobs_describe_the_last_step(smol):
    with smol.create_session() as s:
        assert s.top_logprobs(3) == []
        s.prefill(smol.render([{"role": "user", "content": "Hi"}]))
        r = s.decode_one(GREEDY)
        top = s.top_logprobs(3)
        assert top[0][0] == r.token_id and top[0][1] == smol.decode([r.token_id])
        assert top[0][2] >= top[1][2] >= top[2][2] and s.logprob(r.token_id) == pytest.approx(top[0][2])
        assert sum(torch.tensor([t[2] for t in s.top_logprobs(50)]).exp()) <= 1.0 + 1e-5

@pytest.mark.parametrize("error", [KeyboardInterrupt("mid-step"), RuntimeError("device lost")], ids=["interrupt", "error"])
@pytest.mark.parametrize("where", ["forward", "crop"])
def test_a_failure_while_state_changes_poisons_the_session(smol, monkeypatch, error, where):
    """An interrupt (not an Exception) propagates as it is, an error as SessionPoisoned;
    either way the half-updated session refuses every call but reset."""
    from engines import SessionPoisoned, kv

    def fail(*args, **kwargs):
        raise error

    with smol.create_session() as s:
        s.prefill([MI.text("One two three four five")])
        if where == "forward":
            monkeypatch.setattr(smol, "forward", fail)
            call = lambda: s.decode_one(GREEDY)  # noqa: E731
        else:
            monkeypatch.setattr(kv, "crop_to", fail)
            call = lambda: s.seek(2)  # noqa: E731
        with pytest.raises(SessionPoisoned if isinstance(error, Exception) else KeyboardInterrupt) as raised:
            call()
        assert raised.value is error or raised.value.__cause__ is error
        monkeypatch.undo()
        for again in (lambda: s.decode_one(GREEDY), lambda: s.prefill([MI.text("x")]), lambda: s.seek(0)):
            with pytest.raises(SessionPoisoned, match="reset"):
                again()
        assert not s.can_seek(0)
        s.reset()
        s.prefill([MI.text("Again")])
        assert s.tokens == smol.tokenize([MI.text("Again")])
