"""Conversation on the real default model: fidelity, reuse, every action, export/import.

Oracles: the full chat-template render of the conversation (assistant content
spliced in as its exact ids), a fresh session prefilled with the same ids,
and the uninterrupted greedy reply.
"""

from __future__ import annotations

import json
import threading

import pytest

from engines import ContextFull, EngineError, InvalidArgument, MultimodalInput as MI, NotSupported, SamplingConfig
from engines import load_engine
from playground import Conversation
from playground.prefix import common_prefix
from tests.cases import ENGINES, break_engine, greedy_ids

GREEDY = SamplingConfig()
N = 6  # tokens per reply: enough to be a reply, cheap on 2 cores

TEMPLATES = {
    "own": None,
    "llama3": (
        "{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n'"
        " + m['content'] | trim + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
        "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
    "mistral": (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
        "{% elif m['role'] == 'assistant' %}{{ m['content'] + eos_token }}{% else %}{{ m['content'] + '\n\n' }}"
        "{% endif %}{% endfor %}"
    ),
    "gemma": (
        "{{ bos_token }}{% for m in messages %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
        "{{ '<start_of_turn>' + role + '\n' + m['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
    ),
    "phi3": (
        "{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
    ),
    "qwen2.5": (
        "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}{{ '<|im_start|>system\nYou are"
        " Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}{% endif %}"
        "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
}


@pytest.fixture(scope="module", params=list(ENGINES))
def smol(request):
    """The default model on each backend: the conversation relies only on the contract."""
    return ENGINES[request.param]()


def say(conv, text, **kw):
    return "".join(conv.send([MI.text(text)], kw.pop("sampling", GREEDY), kw.pop("max_new_tokens", N), **kw))


def oracle_tokens(engine, conv, template=None):
    """What the contract says must be resident: the render of the turns before the
    last reply (generation prompt on), then that reply's exact ids."""
    turns = conv.turns
    reply = turns[-1] if turns and turns[-1].role == "assistant" else None
    before = turns[:-1] if reply else turns
    messages = []
    for t in before:
        m = {"role": t.role, "content": t.text}
        if t.role == "assistant":
            m["token_ids"] = t.token_ids
        messages.append(m)
    ids = engine.tokenize(engine.render(messages, add_generation_prompt=True, chat_template=template))
    return ids + (reply.token_ids if reply else [])


def assert_fidelity(engine, conv, template=None):
    assert conv.session.tokens == oracle_tokens(engine, conv, template)


def greedy_from(engine, ids, n):
    """A fresh session's greedy tokens after prefilling `ids`."""
    with engine.create_session() as s:
        s.prefill([MI.tokens(ids)])
        return greedy_ids(s, n)


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_session_tokens_match_the_full_render_after_every_action(smol, name):
    template = TEMPLATES[name]
    conv = Conversation(smol, system_prompt="You are terse.", chat_template=template)
    say(conv, "Name a fruit.")
    assert_fidelity(smol, conv, template)
    say(conv, "Name a colour.")
    assert_fidelity(smol, conv, template)
    "".join(conv.regenerate(GREEDY, N))
    assert_fidelity(smol, conv, template)
    "".join(conv.edit(1, [MI.text("Name a planet.")], GREEDY, N))
    assert_fidelity(smol, conv, template)
    conv.rewind(2, 2)
    assert_fidelity(smol, conv, template)
    "".join(conv.continue_reply(GREEDY, 3))
    assert_fidelity(smol, conv, template)
    conv.step(GREEDY)
    assert_fidelity(smol, conv, template)


@pytest.mark.parametrize("name", ["own", "mistral", "phi3"])
def test_each_turn_prefills_only_what_is_new(smol, name):
    template = TEMPLATES[name]
    conv = Conversation(smol, chat_template=template)
    for k, q in enumerate(["Hi!", "What is 1+1?", "Thanks."]):
        before = conv.session.tokens if k else []
        say(conv, q)
        after = conv.session.tokens[: len(conv.session.tokens) - len(conv.turns[-1].token_ids)]
        stats = conv.last_stats
        assert stats.reused == common_prefix(before, after)
        assert stats.prefilled == len(after) - stats.reused
        assert not stats.fallback
        if name == "own":  # SmolLM2's template rewrites nothing already said
            assert stats.reused == len(before)


def test_regenerate_reuses_up_to_the_reply_and_greedy_reproduces_it(smol):
    conv = Conversation(smol)
    say(conv, "Tell me a fact about owls.", max_new_tokens=12)
    reply = conv.turns[-1]
    first = list(reply.token_ids)
    start = conv.position - len(first)  # where the reply's ids begin (after its header)
    "".join(conv.regenerate(GREEDY, 12))
    assert conv.last_stats.reused == start and conv.last_stats.prefilled == 0
    assert conv.turns[-1].token_ids == first
    assert len(conv.turns) == 2


def test_regenerate_with_other_seeds_gives_other_replies_and_the_seed_replays(smol):
    conv = Conversation(smol)
    hot = SamplingConfig(temperature=1.0, top_p=0.95)
    say(conv, "Invent a name for a cat.", sampling=hot, max_new_tokens=10)
    seed = conv.turns[-1].sampling["seed"]
    assert isinstance(seed, int)
    replies = {tuple(conv.turns[-1].token_ids)}
    for s in (11, 12, 13):
        "".join(conv.regenerate(SamplingConfig(temperature=1.0, top_p=0.95, seed=s), 10))
        replies.add(tuple(conv.turns[-1].token_ids))
    assert len(replies) > 1
    "".join(conv.regenerate(SamplingConfig(temperature=1.0, top_p=0.95, seed=12), 10))
    again = tuple(conv.turns[-1].token_ids)
    "".join(conv.regenerate(SamplingConfig(temperature=1.0, top_p=0.95, seed=12), 10))
    assert tuple(conv.turns[-1].token_ids) == again


def test_edit_prefills_only_from_the_edited_turn(smol):
    conv = Conversation(smol, system_prompt="Be brief.")
    say(conv, "First question?")
    say(conv, "Second question?")
    old = conv.session.tokens
    start = conv.turns[3].span[0]
    "".join(conv.edit(3, [MI.text("A different second question?")], GREEDY, N))
    assert [t.role for t in conv.turns] == ["system", "user", "assistant", "user", "assistant"]
    assert conv.turns[3].text == "A different second question?"
    assert conv.last_stats.reused >= start
    assert conv.last_stats.reused == common_prefix(old, conv.session.tokens)
    assert_fidelity(smol, conv)


def test_continue_after_a_stop_equals_the_uninterrupted_reply(smol):
    whole = Conversation(smol)
    say(whole, "Describe the moon.", max_new_tokens=20)
    want = whole.turns[-1].token_ids

    conv = Conversation(smol)
    gen = conv.send([MI.text("Describe the moon.")], GREEDY, 20)
    got_pieces = 0
    for _ in gen:
        got_pieces += 1
        if got_pieces == 5:
            conv.stop()  # as from another thread: ends at the next token
    assert conv.last_stats.finish_reason == "stopped"
    partial = len(conv.turns[-1].token_ids)
    assert 0 < partial < len(want)
    "".join(conv.continue_reply(GREEDY, 20 - partial))
    assert conv.last_stats.prefilled == 0
    assert conv.turns[-1].token_ids == want[: len(conv.turns[-1].token_ids)]
    assert len(conv.turns[-1].token_ids) == len(want)


def test_stop_from_another_thread_keeps_the_partial_reply(smol):
    conv = Conversation(smol)
    gen = conv.send([MI.text("Count from one to fifty in words.")], GREEDY, 200)
    next(gen)
    t = threading.Thread(target=conv.stop)
    t.start()
    t.join()
    rest = list(gen)
    assert len(rest) <= 1  # the stop lands on the very next step
    assert conv.last_stats.finish_reason == "stopped"
    assert conv.turns[-1].token_ids and conv.session.tokens == oracle_tokens(smol, conv)


def test_closing_the_stream_early_records_the_reply_and_leaves_no_stop(smol):
    conv = Conversation(smol)
    gen = conv.send([MI.text("Write a long story.")], GREEDY, 100)
    next(gen), next(gen)
    conv.stop()
    gen.close()
    assert conv.last_stats.finish_reason == "stopped"
    assert len(conv.turns[-1].token_ids) >= 2
    assert_fidelity(smol, conv)
    assert conv.step(GREEDY) is not None and conv.last_stats.new_tokens == 1


def test_rewind_then_greedy_continue_equals_a_fresh_session_from_that_prefix(smol):
    conv = Conversation(smol)
    say(conv, "Explain rain in one sentence.", max_new_tokens=14)
    conv.rewind(1, 4)
    assert len(conv.turns[-1].token_ids) == 4
    prefix = conv.session.tokens
    assert prefix == oracle_tokens(smol, conv) and conv.position == len(prefix)
    want = greedy_from(smol, prefix, 6)
    "".join(conv.continue_reply(GREEDY, 6))
    assert conv.turns[-1].token_ids[4:] == want


def test_step_decodes_exactly_one_token(smol):
    conv = Conversation(smol)
    say(conv, "Say hello.", max_new_tokens=2)
    n = len(conv.turns[-1].token_ids)
    if conv.last_stats.finish_reason != "eos":
        conv.step(GREEDY)
        assert len(conv.turns[-1].token_ids) == n + 1
        assert conv.last_stats.new_tokens == 1


def test_stop_strings_end_the_reply_and_stay_out_of_view(smol):
    conv = Conversation(smol)
    text = say(conv, "List three animals, one per line.", max_new_tokens=40, stop_strings=["\n"])
    assert conv.last_stats.finish_reason == "stop_string"
    assert "\n" not in text and text == conv.turns[-1].text
    assert "\n" in smol.decode(conv.turns[-1].token_ids)  # the ids stay exact


def test_raw_mode_prefills_text_as_is_and_continues(smol):
    conv = Conversation(smol, raw=True)
    say(conv, "Once upon a time", max_new_tokens=6)
    ids = smol.tokenize([MI.text("Once upon a time")])
    assert conv.session.tokens == ids + conv.turns[-1].token_ids
    "".join(conv.continue_reply(GREEDY, 4))
    assert conv.session.tokens == ids + conv.turns[-1].token_ids
    assert conv.turns[-1].token_ids == greedy_from(smol, ids, len(conv.turns[-1].token_ids))


def test_export_import_restores_the_kv_and_the_next_reply(smol):
    conv = Conversation(smol, system_prompt="You like cats.")
    say(conv, "Hi!")
    say(conv, "Favourite animal?")
    messages = json.loads(json.dumps(conv.to_messages()))
    assert messages[-1]["token_ids"] == conv.turns[-1].token_ids
    assert messages[-1]["model"]["tokenizer"] == smol.fingerprint
    assert messages[-1]["sampling"]["seed"] is not None
    back = Conversation.from_messages(smol, messages)
    assert back.session.tokens == conv.session.tokens
    assert back.import_notes == []
    assert say(back, "Why?") == say(conv, "Why?")
    assert back.session.tokens == conv.session.tokens
    back.close()


def test_import_from_another_tokenizer_falls_back_to_text_and_says_so(smol):
    conv = Conversation(smol)
    say(conv, "Hi!")
    messages = conv.to_messages()
    messages[-1]["model"] = {"name": "other-model", "tokenizer": "0123abcd"}
    messages[-1]["token_ids"] = [1, 2, 3]
    back = Conversation.from_messages(smol, messages, prefill=False)
    assert "other-model" in back.import_notes[0]
    assert back.turns[-1].token_ids == smol.tokenize([MI.text(messages[-1]["content"])])


@pytest.mark.parametrize("part", [{"type": "image", "path": "/etc/passwd"}, {"type": "audio", "url": "http://x/a.wav"}])
def test_import_never_reads_paths_named_in_the_file(smol, part):
    messages = [{"role": "user", "content": [{"type": "text", "text": "look"}, part]}]
    with pytest.raises(InvalidArgument, match="never reads file paths"):
        Conversation.from_messages(smol, messages)


def _bad_actions(conv):
    yield "empty message", lambda: conv.send([MI.text("   ")], GREEDY, N), InvalidArgument, "empty"
    yield "no parts", lambda: conv.send([], GREEDY, N), InvalidArgument, "at least one part"
    yield "image on text", lambda: conv.send([MI.image(b"x")], GREEDY, N), NotSupported, "image"
    yield "edit missing turn", lambda: conv.edit(9, [MI.text("x")], GREEDY, N), InvalidArgument, "outside"
    yield "rewind past end", lambda: conv.rewind(1, 10**6), InvalidArgument, "outside 0.."
    yield "rewind a user turn", lambda: conv.rewind(0, 0), InvalidArgument, "assistant"
    yield "bad max tokens", lambda: conv.send([MI.text("x")], GREEDY, 0), InvalidArgument, "max_new_tokens"
    yield "bad sampling", lambda: conv.send([MI.text("x")], {"temperature": 1}, N), InvalidArgument, "SamplingConfig"
    yield "bad stop strings", lambda: conv.send([MI.text("x")], GREEDY, N, stop_strings=[""]), InvalidArgument, "stop"


def test_bad_actions_raise_clearly_and_change_nothing(smol):
    conv = Conversation(smol)
    say(conv, "Hello")
    for name, call, error, message in _bad_actions(conv):
        turns, tokens = [(t.role, t.text, list(t.token_ids or [])) for t in conv.turns], conv.session.tokens
        with pytest.raises(error, match=message):
            call()
        assert [(t.role, t.text, list(t.token_ids or [])) for t in conv.turns] == turns, name
        assert conv.session.tokens == tokens, name


def test_continue_or_regenerate_with_no_reply_is_rejected(smol):
    conv = Conversation(smol)
    with pytest.raises(InvalidArgument, match="no reply to continue"):
        conv.continue_reply(GREEDY, N)
    with pytest.raises(InvalidArgument, match="nothing to regenerate"):
        conv.regenerate(GREEDY, N)
    assert conv.turns == [] and conv.last_stats is None


def test_a_template_that_fails_to_render_is_a_clear_error(smol):
    conv = Conversation(smol, chat_template="{{ raise_exception('this template wants a system turn') }}")
    with pytest.raises(InvalidArgument, match="chat template failed to render.*system turn"):
        conv.send([MI.text("hi")], GREEDY, N)
    assert conv.turns == [] and conv.position == 0


def test_only_one_action_at_a_time(smol):
    conv = Conversation(smol)
    gen = conv.send([MI.text("Hello there")], GREEDY, 30)
    next(gen)
    with pytest.raises(EngineError, match="another action is running"):
        "".join(conv.regenerate(GREEDY, N))
    gen.close()
    "".join(conv.regenerate(GREEDY, 2))


@pytest.fixture(scope="module")
def small(smol):
    return load_engine("smollm2", backend=smol.backend, max_context=80, max_sessions=2)


def test_a_turn_that_cannot_fit_raises_context_full_before_any_change(small):
    conv = Conversation(small)
    with pytest.raises(ContextFull, match=r"needs \d+ tokens .* context is 80: rewind, edit"):
        conv.send([MI.text("word " * 100)], GREEDY, N)
    assert conv.turns == [] and conv.position == 0


def test_a_reply_that_reaches_the_limit_ends_with_context_full(small):
    conv = Conversation(small, raw=True)  # a completion that keeps counting, so no EOS comes first
    text = say(conv, "1, 2, 3, 4, 5, 6, 7, 8,", max_new_tokens=200)
    assert conv.last_stats.finish_reason == "context_full"
    assert conv.position == 80 and text == conv.turns[-1].text and text
    with pytest.raises(ContextFull, match="rewind, edit"):
        conv.continue_reply(GREEDY, N)
    conv.rewind(1, 2)
    "".join(conv.continue_reply(GREEDY, 3))
    assert conv.last_stats.finish_reason in ("length", "eos")


def test_stats_report_timing_and_spans_cover_the_session(smol):
    conv = Conversation(smol, system_prompt="Be brief.")
    assert conv.last_stats is None
    say(conv, "Hi", max_new_tokens=6)
    st = conv.last_stats
    assert st.ttft_s > 0 and st.new_tokens == len(conv.turns[-1].token_ids)
    if st.new_tokens > 1:
        assert st.decode_tok_s > 0
    spans = [t.span for t in conv.turns]
    assert spans[0][0] == 0 and spans[-1][1] == conv.position
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    info = conv.turns[-1].token_info
    assert [i.id for i in info] == conv.turns[-1].token_ids
    assert all(i.logprob <= 0 and len(i.top) == 5 for i in info)
    assert all(i.top[0][2] >= i.logprob - 1e-6 for i in info)  # greedy picks the top token


def _spans(conv):
    return [(t.span, list(t.media_spans)) for t in conv.turns]


def _spans_from_scratch(conv):
    """The spans a fresh conversation computes for the same transcript, its KV rebuilt."""
    fresh = Conversation.from_messages(conv.engine, conv.to_messages(), chat_template=conv.chat_template)
    try:
        assert fresh.position == conv.position
        return _spans(fresh)
    finally:
        fresh.close()


@pytest.mark.parametrize("name", ["own", "phi3"])
def test_remembered_spans_equal_a_pass_from_scratch_after_every_action(smol, name, monkeypatch):
    conv = Conversation(smol, system_prompt="Be brief.", chat_template=TEMPLATES[name])
    actions = [lambda: say(conv, "Hi"), lambda: say(conv, "Name a colour."), lambda: say(conv, "And a fruit?"),
               lambda: "".join(conv.regenerate(GREEDY, N)),
               lambda: "".join(conv.edit(3, [MI.text("Name a planet.")], GREEDY, N)),
               lambda: conv.rewind(4, 2), lambda: "".join(conv.continue_reply(GREEDY, 2))]
    for act in actions:
        act()
        got = _spans(conv)
        assert got == _spans_from_scratch(conv)
        assert got[-1][0][1] == conv.position
    renders = []
    real = smol.render
    monkeypatch.setattr(smol, "render", lambda *a, **k: renders.append(a[0]) or real(*a, **k))
    say(conv, "One more.")
    # Only the new user turn's prefix and the last reply's target are rendered for spans
    # (plus the send's own plan), not every prefix of the conversation.
    assert len(renders) <= 4 and _spans(conv) == _spans_from_scratch(conv)


def test_a_stop_asked_before_the_stream_starts_is_honoured(smol):
    conv = Conversation(smol)
    gen = conv.send([MI.text("Tell me about rivers.")], GREEDY, 30)
    conv.stop()  # the prefill that follows must not swallow it
    assert "".join(gen) == ""
    assert conv.last_stats.finish_reason == "stopped" and conv.turns[-1].token_ids == []
    say(conv, "Hello")  # and nothing is left behind for the next action
    assert conv.last_stats.finish_reason in ("eos", "length")


def test_a_failed_forward_is_recovered_from_the_transcript(smol, monkeypatch):
    conv = Conversation(smol)
    say(conv, "Hi")
    break_engine(smol, monkeypatch, "device lost")
    with pytest.raises(EngineError, match="device lost"):
        say(conv, "Still there?")
    monkeypatch.undo()
    turns = [(t.role, t.text) for t in conv.turns]
    say(conv, "Still there?")
    assert conv.last_stats.fallback and conv.last_stats.reused == 0  # rebuilt, nothing lost
    assert [(t.role, t.text) for t in conv.turns][: len(turns)] == turns
    assert_fidelity(smol, conv)


def test_step_by_step_reply_replays_from_its_recorded_seed(smol):
    conv = Conversation(smol)
    hot = SamplingConfig(temperature=1.0)
    "".join(conv.send([MI.text("Pick a random word.")], hot, 1))  # start a reply, then step it
    for _ in range(4):
        conv.step(hot)
        if conv.last_stats.finish_reason == "eos":
            # A further step would draw past the EOS, which a replay, stopping there, cannot repeat
            # (about 1 seed in 13 here).
            break
    reply = conv.turns[-1]
    assert reply.sampling["seed"] is not None and reply.token_ids
    replay = SamplingConfig.from_dict(reply.sampling)
    "".join(conv.regenerate(replay, len(reply.token_ids)))
    assert conv.turns[-1].token_ids == reply.token_ids


def test_token_info_stays_aligned_after_editing_a_reply(smol):
    conv = Conversation(smol)
    say(conv, "Say something.")
    "".join(conv.edit(1, [MI.text("Well, I think")], GREEDY, 3))
    reply = conv.turns[-1]
    assert [i.id for i in reply.token_info] == reply.token_ids
    assert reply.token_info[0].logprob is None and reply.token_info[-1].logprob is not None


def test_a_template_that_cannot_render_a_lone_system_turn_does_not_lock_the_conversation(smol):
    strict = (
        "{% if messages | selectattr('role', 'equalto', 'user') | list | length == 0 %}"
        "{{ raise_exception('No user query found in messages.') }}{% endif %}" + TEMPLATES["qwen2.5"]
    )
    conv = Conversation(smol, system_prompt="Be brief.", chat_template=strict)
    say(conv, "Hi")
    say(conv, "Again")  # the first action's span bookkeeping must not leave it locked
    assert [t.role for t in conv.turns] == ["system", "user", "assistant", "user", "assistant"]
    assert_fidelity(smol, conv, strict)
