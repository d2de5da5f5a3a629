"""The contract suite (engines/base.py states it), run over every engine in tests/cases.py.

Oracles: a fresh session prefilled with the same tokens in one call, and the
same session's own state before a rejected call.
"""

from __future__ import annotations

import threading

import pytest

from engines import (
    Busy,
    ContextFull,
    DecodeResult,
    EngineError,
    InvalidArgument,
    MultimodalInput as MI,
    NotSupported,
    SamplingConfig,
    SessionPoisoned,
)

GREEDY = SamplingConfig()


def decode(s, n, sampling=GREEDY):
    """Up to `n` steps; stops after a terminal step. Returns the results."""
    out = []
    for _ in range(n):
        r = s.decode_one(sampling)
        out.append(r)
        if r.is_terminal:
            break
    return out


def ids(results):
    return [r.token_id for r in results if not r.is_terminal]


def snapshot(s):
    """What must not change after a rejected call: ids and the pending distribution."""
    return s.tokens, s.position, s.next_logprobs(5)


def assert_same_state(before, s):
    tokens, position, pending = before
    assert s.tokens == tokens
    assert s.position == position
    assert s.next_logprobs(5) == pending


def assert_next_close(ref, s, atol):
    """The pending distributions agree: same top token where its margin is clear,
    and the log-probabilities of the top 5 within `atol`."""
    a, b = ref.next_logprobs(5), s.next_logprobs(5)
    if a[0][1] - a[1][1] > 2 * atol:
        assert b[0][0] == a[0][0], f"top token {b[0][0]} != {a[0][0]}"
    lb = dict(b)
    err = max(abs(lp - lb[i]) for i, lp in a if i in lb)
    assert err <= atol, f"log-probabilities differ by {err:.2e} (tolerance {atol:.0e})"


@pytest.fixture
def session(case):
    c, engine = case
    s = engine.create_session()
    yield s
    s.close()


def fresh(engine, inputs):
    s = engine.create_session()
    s.prefill(inputs)
    return s


def test_prefill_makes_exactly_tokenize_resident(case, session):
    c, engine = case
    prompt = c.prompts(engine)[0]
    next_id = session.prefill(prompt)
    assert session.tokens == engine.tokenize(prompt)
    assert session.position == len(session.tokens)
    assert next_id == session.next_logprobs(1)[0][0]
    assert session.decode_one(GREEDY).token_id == next_id


def test_step_by_step_decode_equals_one_shot_prefill(case, session):
    c, engine = case
    prompt = c.prompts(engine)[0]
    session.prefill(prompt)
    gen = ids(decode(session, 12))
    assert session.tokens == engine.tokenize(prompt) + gen
    with fresh(engine, prompt + [MI.tokens(gen)]) if gen else fresh(engine, prompt) as ref:
        assert ref.tokens == session.tokens
        assert_next_close(ref, session, c.atol)


def test_seek_then_new_input_equals_fresh_session(case, session):
    c, engine = case
    a, b, cc = MI.text(" Part B, which will be dropped."), MI.text(" Part C instead."), None
    prompt = c.prompts(engine)[0]
    session.prefill(prompt)
    cut = session.position
    session.prefill([a])
    decode(session, 8)
    session.seek(cut)
    assert session.tokens == engine.tokenize(prompt)
    session.prefill([b])
    got = ids(decode(session, 16))
    with fresh(engine, prompt + [b]) as ref:
        want = ids(decode(ref, 16))
        assert got == want
        assert_next_close(ref, session, c.atol)


def test_seek_into_generated_tokens_equals_fresh_session(case, session):
    c, engine = case
    prompt = c.prompts(engine)[1]
    session.prefill(prompt)
    gen = ids(decode(session, 12))
    keep = min(5, len(gen))
    session.seek(len(engine.tokenize(prompt)) + keep)
    with fresh(engine, prompt + ([MI.tokens(gen[:keep])] if keep else [])) as ref:
        assert_next_close(ref, session, c.atol)
        assert ids(decode(session, 8)) == ids(decode(ref, 8))


def test_seek_to_current_position_keeps_logits_and_seek_to_zero_empties(case, session):
    c, engine = case
    session.prefill(c.prompts(engine)[0])
    before = snapshot(session)
    assert session.can_seek(session.position)
    session.seek(session.position)
    assert_same_state(before, session)
    assert session.can_seek(0)
    session.seek(0)
    assert session.tokens == [] and session.position == 0
    assert session.next_logprobs(5) == []
    with pytest.raises(InvalidArgument, match="prefill first"):
        session.decode_one(GREEDY)


@pytest.mark.parametrize("pos", [-1, "+1", 1.5, "3", True])
def test_seek_out_of_range_is_rejected_and_changes_nothing(case, session, pos):
    c, engine = case
    session.prefill(c.prompts(engine)[0])
    if pos == "+1":
        pos = session.position + 1
    before = snapshot(session)
    assert not session.can_seek(pos)
    with pytest.raises(InvalidArgument, match="outside 0.."):
        session.seek(pos)
    assert_same_state(before, session)


def test_stop_from_another_thread_gives_a_terminal_step(case, session):
    c, engine = case
    session.prefill(c.prompts(engine)[2])
    decode(session, 3)
    stopped = threading.Event()
    worker = threading.Thread(target=lambda: (session.stop(), stopped.set()))
    worker.start()
    assert stopped.wait(10)
    before = snapshot(session)
    r = session.decode_one(GREEDY)
    assert r == DecodeResult(0, "", False, True)
    assert_same_state(before, session)
    # The request was consumed: decoding goes on from the same logits.
    r = session.decode_one(GREEDY)
    assert not r.is_terminal and r.token_id == before[2][0][0]
    assert session.position == before[1] + 1
    worker.join()


def test_stop_request_is_consumed_once_and_continues_exactly(case, session):
    c, engine = case
    prompt = c.prompts(engine)[2]
    session.prefill(prompt)
    first = ids(decode(session, 4))
    session.stop()
    assert session.decode_one(GREEDY).is_terminal
    rest = ids(decode(session, 4))
    with fresh(engine, prompt) as ref:
        assert ids(decode(ref, len(first) + len(rest))) == first + rest


def test_pause_changes_nothing_resident_and_greedy_continues_exactly(case, session):
    c, engine = case
    prompt = c.prompts(engine)[2]
    session.prefill(prompt)
    first = ids(decode(session, 4))
    before = session.tokens
    session.pause()
    assert session.tokens == before
    rest = ids(decode(session, 4))
    with fresh(engine, prompt) as ref:
        assert ids(decode(ref, len(first) + len(rest))) == first + rest


def test_stop_while_decoding_in_a_loop_from_another_thread(case, session):
    c, engine = case
    session.prefill(c.prompts(engine)[2])
    started = threading.Event()
    timer = threading.Thread(target=lambda: (started.wait(10), session.stop()))
    timer.start()
    results = []
    for _ in range(500):
        r = session.decode_one(SamplingConfig(temperature=1.0, seed=3))
        results.append(r)
        started.set()
        if r.is_terminal and not r.is_eos:
            break
        if r.is_eos:  # a reply may end on its own first; keep the session going
            session.prefill([MI.text(" and")])
    timer.join()
    assert results[-1] == DecodeResult(0, "", False, True)


@pytest.mark.parametrize("clear", ["prefill", "seek", "reset"])
def test_prefill_seek_and_reset_clear_a_pending_stop(case, session, clear):
    c, engine = case
    prompt = c.prompts(engine)[0]
    session.prefill(prompt)
    session.stop()
    if clear == "prefill":
        session.prefill([MI.text(" Hello")])
    elif clear == "seek":
        session.seek(session.position)
    else:
        session.reset()
        session.prefill(prompt)
    assert not session.decode_one(GREEDY).is_terminal


def test_eos_is_returned_but_not_made_resident(case, session, monkeypatch):
    c, engine = case
    nxt = session.prefill(c.prompts(engine)[0])
    # Make the greedy next token an EOS id for this test.
    monkeypatch.setattr(engine, "eos_token_ids", frozenset(engine.eos_token_ids | {nxt}))
    before = snapshot(session)
    assert session.decode_one(GREEDY) == DecodeResult(nxt, "", True, True)
    assert_same_state(before, session)


def test_bos_only_at_position_zero_and_eos_after_the_last_input(case, session):
    c, engine = case
    bos = getattr(engine, "bos_token_id", None)
    prompt = c.prompts(engine)[0]
    if bos is not None:
        session.prefill(prompt, num_bos=1)
        assert session.tokens == [bos] + engine.tokenize(prompt)
    else:
        with pytest.raises(InvalidArgument, match="no BOS"):
            session.prefill(prompt, num_bos=1)
        session.prefill(prompt)
    n = session.position
    extra = [MI.text(" more")]
    session.prefill(extra, num_bos=1)
    assert session.tokens[n:] == engine.tokenize(extra)
    m = session.position
    session.prefill(extra, num_eos=2)
    eos = min(engine.eos_token_ids)
    assert session.tokens[m:] == engine.tokenize(extra) + [eos, eos]


def test_same_seed_same_tokens_and_different_seeds_differ(case):
    c, engine = case
    hot = lambda seed: SamplingConfig(temperature=0.8, seed=seed)  # noqa: E731
    differs = False
    for prompt in c.prompts(engine):  # stop at the first prompt where the seeds differ
        runs = []
        for seed in (7, 7, 8):
            with fresh(engine, prompt) as s:
                runs.append(ids(decode(s, 8, hot(seed))))
        assert runs[0] == runs[1]
        if runs[0] != runs[2]:
            differs = True
            break
    assert differs, "seeds 7 and 8 gave the same tokens on every prompt"


def test_two_sessions_interleaved_equal_their_solo_runs(case):
    c, engine = case
    p0, p1 = c.prompts(engine)[:2]
    solo = []
    for p in (p0, p1):
        with fresh(engine, p) as s:
            solo.append(ids(decode(s, 10)))
    a, b = fresh(engine, p0), fresh(engine, p1)
    got = [[], []]
    for _ in range(10):
        for k, s in enumerate((a, b)):
            r = s.decode_one(GREEDY)
            if not r.is_terminal and len(got[k]) < len(solo[k]):
                got[k].append(r.token_id)
    a.close(), b.close()
    assert got == solo


def _bad_calls(engine):
    yield "empty list", lambda s: s.prefill([]), InvalidArgument, "empty"
    yield "empty text", lambda s: s.prefill([MI.text("")]), InvalidArgument, "empty text"
    yield "not a list", lambda s: s.prefill("hello"), InvalidArgument, "list of MultimodalInput"
    yield "not an input", lambda s: s.prefill(["hello"]), InvalidArgument, "not a MultimodalInput"
    big = engine.capacity.max_context_len
    vocab = engine.tokenize([MI.text("a")])  # any id; the real bound is the embedding size
    yield "id past vocab", lambda s: s.prefill([MI.tokens([10**9])]), InvalidArgument, "outside the vocabulary"
    yield "overflow", lambda s: s.prefill([MI.tokens(vocab * (big + 1))]), ContextFull, f"exceeds the context of {big}"
    yield "bad sampling", lambda s: s.decode_one({"temperature": 1}), InvalidArgument, "SamplingConfig"
    yield "bad num_bos", lambda s: s.prefill([MI.text("x")], num_bos=-1), InvalidArgument, "num_bos"
    for kind in ("image", "audio"):
        if kind not in engine.modalities:
            inp = MI.image(b"\x89PNG") if kind == "image" else MI.audio(b"RIFF")
            yield f"{kind} on a text engine", lambda s, inp=inp: s.prefill([inp]), NotSupported, kind


def test_bad_input_raises_a_named_error_and_changes_nothing(case, session):
    c, engine = case
    session.prefill(c.prompts(engine)[0])
    for name, call, error, message in _bad_calls(engine):
        before = snapshot(session)
        with pytest.raises(error, match=message):
            call(session)
        assert_same_state(before, session)
    assert not session.decode_one(GREEDY).is_terminal


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"seed": -3}, "seed"),
        ({"seed": 1.0}, "seed"),
        ({"temperature": float("nan")}, "temperature"),
    ],
)
def test_invalid_sampling_is_rejected_at_construction(kwargs, message):
    with pytest.raises(InvalidArgument, match=message):
        SamplingConfig(**kwargs)


def test_sessions_beyond_capacity_are_busy_until_one_closes(case):
    c, engine = case
    free = engine.capacity.max_sessions - engine.open_sessions
    opened = [engine.create_session() for _ in range(free)]
    try:
        with pytest.raises(EngineError, match="busy") as refused:
            engine.create_session()
        assert isinstance(refused.value, Busy), "the contract's typed capacity error"
        opened.pop().close()
        opened.append(engine.create_session())
    finally:
        for s in opened:
            s.close()


def test_a_failed_forward_poisons_only_that_session(case, monkeypatch):
    c, engine = case
    prompt = c.prompts(engine)[0]
    healthy, sick = fresh(engine, prompt), fresh(engine, prompt)
    c.break_session(engine, monkeypatch, sick)
    with pytest.raises(SessionPoisoned, match="simulated device failure"):
        sick.decode_one(GREEDY)
    for call in (lambda: sick.decode_one(GREEDY), lambda: sick.prefill(prompt), lambda: sick.seek(0)):
        with pytest.raises(SessionPoisoned, match="reset"):
            call()
    assert not healthy.decode_one(GREEDY).is_terminal
    monkeypatch.undo()
    sick.reset()
    sick.prefill(prompt)
    assert sick.tokens == engine.tokenize(prompt)
    healthy.close(), sick.close()


def test_capacity_matches_the_measured_kv_cache(case, session):
    c, engine = case
    session.prefill(c.prompts(engine)[0])
    held, tokens = c.kv_held(engine, session)
    cap = engine.capacity
    per_token = held / tokens
    assert per_token == pytest.approx(cap.kv_bytes_per_token, rel=0.5)
    assert held <= cap.kv_bytes_per_token * tokens * 1.05  # a slot file adds a small header
    assert cap.estimated_bytes_per_session == cap.kv_bytes_per_token * cap.max_context_len


def test_closed_session_frees_its_slot_and_refuses_calls(case):
    c, engine = case
    n = engine.open_sessions
    s = engine.create_session()
    assert engine.open_sessions == n + 1
    s.close()
    s.close()  # idempotent
    assert engine.open_sessions == n
    with pytest.raises(EngineError, match="closed"):
        s.prefill(c.prompts(engine)[0])
