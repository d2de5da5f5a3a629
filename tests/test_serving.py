"""Serving engines by URL (engines/serving.py, engines/llama_server.py, engines/openai_server.py).

Live, against a real llama-server (xllamacpp's, in a child process:
tests/servers.py) on 127.0.0.1: the shared contract suite runs over it through
tests/cases.py; here, part of the conversation suite and of the gradio_client
UI suite over HTTP, `python -m engines.check`, and what a remote server can do
to a session: die mid-stream, restart with its cache gone, come back as another
model, answer HTTP 500 or nonsense, drop the connection, stall, or want a key.
Each must give a clear error or UI message and never a wrong token in the tape,
a hang, or a lost user message.

vLLM and SGLang were NOT run here. Their dialects are checked against the
request and response shapes of their own sources (cited in
engines/vllm_dialect.py and engines/sglang_dialect.py), replayed over HTTP by
`tests.servers.StubOpenAIServer`, including the shared contract suite on the
stub's arithmetic "model".
"""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time

import pytest
from gradio_client import Client

from engines import EngineError, InvalidArgument, MultimodalInput as MI, SamplingConfig, SessionPoisoned, load_engine
from playground import Conversation
from tests import test_contract as contract_suite
from tests import test_conversation as conversation_suite
from tests import test_ui as ui_suite
from tests.cases import EngineCase, chat_prompts, greedy_ids, llama_server_engine
from tests.servers import FaultProxy, LlamaServerProcess, StubOpenAIServer, free_port
from tests.ui_harness import GREEDY as UI_GREEDY, reply_text, running_app, stats_text

GREEDY = SamplingConfig()
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.fixture(scope="module")
def smol():
    """SmolLM2 behind the shared test llama-server, by URL (the conversation and UI suites' fixture)."""
    return llama_server_engine()


@pytest.fixture(scope="module")
def small(smol):
    return load_engine(smol.url, max_context=80, max_sessions=2)


def say(conv, text, n=6, sampling=GREEDY):
    return "".join(conv.send([MI.text(text)], sampling, n))


# --------------------------------------------------------------------------- shared suites over HTTP

# The whole conversation suite takes about 70 s over HTTP here (2 shared cores); these
# cover every action, stop, rewind, import, the context limit and recovery (about 20 s).
CONVERSATION = [
    "test_session_tokens_match_the_full_render_after_every_action", "test_each_turn_prefills_only_what_is_new",
    "test_regenerate_reuses_up_to_the_reply_and_greedy_reproduces_it",
    "test_continue_after_a_stop_equals_the_uninterrupted_reply",
    "test_stop_from_another_thread_keeps_the_partial_reply",
    "test_rewind_then_greedy_continue_equals_a_fresh_session_from_that_prefix", "test_step_decodes_exactly_one_token",
    "test_export_import_restores_the_kv_and_the_next_reply",
    "test_a_reply_that_reaches_the_limit_ends_with_context_full",
    "test_a_failed_forward_is_recovered_from_the_transcript", "test_stats_report_timing_and_spans_cover_the_session",
]
for _name in CONVERSATION[2:]:
    globals()[_name] = getattr(conversation_suite, _name)


def test_session_tokens_match_the_full_render_after_every_action(smol):
    conversation_suite.test_session_tokens_match_the_full_render_after_every_action(smol, "own")


def test_each_turn_prefills_only_what_is_new(smol):
    conversation_suite.test_each_turn_prefills_only_what_is_new(smol, "own")


# The UI suite's app, over the shared llama-server: streaming, regenerate, rewind, continue,
# step, undo, reset, two tabs at once (and Stop, below). Edit and export/import add nothing
# over HTTP that the conversation tests above do not cover.
app, fresh_tabs = ui_suite.app, ui_suite.fresh_tabs
UI = ["test_streaming_grows_and_panel_matches_server", "test_regenerate_reuses_the_prefix",
      "test_rewind_then_continue_and_step", "test_undo_and_reset",
      "test_two_clients_are_isolated_and_never_block_each_other"]
for _name in UI:
    globals()[f"test_ui_{_name[5:]}"] = getattr(ui_suite, _name)


def test_ui_cancel_stops_the_stream_at_once_and_keeps_exactly_the_resident_reply(app):
    """The UI suite's own cancel test counts tokens after the cancel; over HTTP the
    stream runs ahead, so tokens already received cost nothing: time it instead."""
    c = ui_suite.client(app)
    job = c.submit({"text": "Write a long story about a dragon and a knight.", "files": []}, api_name="/send",
                   **UI_GREEDY, max_new=64, stored=ui_suite.EMPTY_STORE)
    ui_suite.wait_until(lambda: ui_suite.tab_of(app, c) is not None and len(ui_suite.tab_of(app, c).conv.turns) == 2
                        and len(ui_suite.tab_of(app, c).conv.turns[-1].token_ids) >= 3, timeout=60)
    tab = ui_suite.tab_of(app, c)
    t0 = time.perf_counter()
    job.cancel()
    ui_suite.wait_until(lambda: not tab.streaming, timeout=10)
    assert time.perf_counter() - t0 < 1.0
    ids, pos = list(tab.conv.turns[-1].token_ids), tab.conv.position
    time.sleep(0.5)
    assert tab.conv.turns[-1].token_ids == ids and tab.conv.position == pos, "generation went on after cancel"
    assert 3 <= len(ids) < 64 and tab.conv.last_stats.finish_reason == "stopped"
    assert tab.conv.turns[-1].span[1] == pos == len(tab.conv.session.tokens)


# --------------------------------------------------------------------------- what a server can do to you


def test_a_dead_port_at_load_is_a_clear_error_at_once():
    url = f"http://127.0.0.1:{free_port()}"
    for backend in ("auto", "llama-server", "vllm", "sglang"):
        t0 = time.perf_counter()
        with pytest.raises(EngineError, match="cannot reach .*127.0.0.1"):
            load_engine(url, backend=backend)
        assert time.perf_counter() - t0 < 5


@pytest.fixture
def victim():
    """A llama-server of the test's own, to kill and restart (wants an API key)."""
    server = LlamaServerProcess(slots=2, ctx_per_slot=1024, threads=1, api_key="sekret")
    yield server
    server.stop()


def test_a_missing_api_key_then_a_server_killed_mid_stream_and_restarted(victim):
    with pytest.raises(EngineError, match="wants an API key: set PLAYGROUND_API_KEY"):
        load_engine(victim.url)
    engine = load_engine(victim.url, api_key="sekret", timeout=10)
    conv = Conversation(engine)
    say(conv, "Name a fruit.")
    first = [(t.role, t.text, list(t.token_ids or [])) for t in conv.turns]
    assert conv.session.last_cached == 0  # nothing was cached yet

    # 1. The server dies while a reply streams: a clear error, soon; the tape holds
    #    exactly the ids returned so far; the user's message is kept.
    stream = conv.send([MI.text("Tell me a long story about the sea.")], GREEDY, 200)
    next(stream)
    victim.stop()
    t0 = time.perf_counter()
    with pytest.raises(EngineError, match=r"lost the server at http://127\.0\.0\.1.* mid-stream"):
        for _ in stream:
            pass
    assert time.perf_counter() - t0 < 10
    user, partial = conv.turns[-2], conv.turns[-1]
    got = list(partial.token_ids)
    assert user.text == "Tell me a long story about the sea." and got
    assert conv.session.tokens[-len(got):] == got
    prompt = conv.session.tokens[:-len(got)]

    # 2. While it is down, the next action fails clearly and changes nothing.
    with pytest.raises(EngineError, match="cannot reach the server"):
        say(conv, "Are you there?")
    assert conv.turns[-1] is partial

    # 3. Restarted, its cache empty: the next action rebuilds from the transcript, and
    #    the stats say so (everything prefilled, nothing found in the server's cache).
    victim.start()
    with engine.create_session() as ref:  # every id received before the crash is the model's own
        ref.prefill([MI.tokens(prompt)])
        assert greedy_ids(ref, len(got)) == got
    "".join(conv.regenerate(GREEDY, 6))
    stats = conv.last_stats
    assert stats.fallback and stats.reused == 0 and stats.prefilled == len(conv.session.tokens) - len(
        conv.turns[-1].token_ids)
    assert stats.server_cached == 0  # its slot came back empty
    assert [(t.role, t.text, list(t.token_ids or [])) for t in conv.turns[:2]] == first
    conversation_suite.assert_fidelity(engine, conv)
    # A restart between two actions is invisible to the client but not free: the
    # server reports how much of the resent tape it had cached.
    say(conv, "Thanks.")
    assert conv.last_stats.reused > 0 and conv.last_stats.server_cached >= conv.last_stats.reused - 1
    victim.restart()
    say(conv, "And now?")
    assert conv.last_stats.reused > 0 and conv.last_stats.server_cached == 0
    conversation_suite.assert_fidelity(engine, conv)


def test_a_server_that_comes_back_as_another_model_is_refused(tmp_path):
    from engines.loading import default_gguf_path

    server = LlamaServerProcess(slots=2, ctx_per_slot=1024, threads=1)
    try:
        engine = load_engine(server.url)
        conv = Conversation(engine)
        say(conv, "Name a fruit.")
        tape = conv.session.tokens
        other = tmp_path / "another-model.gguf"
        other.symlink_to(default_gguf_path())
        server.stop()
        server.gguf = str(other)
        server.start()
        with pytest.raises(EngineError, match="now serves .*another-model.gguf.*mean nothing"):
            say(conv, "Name a colour.")
        assert conv.session.tokens == tape or isinstance(conv.session, object)  # poisoned, not extended
        with pytest.raises(SessionPoisoned, match="another-model"):
            conv.session.decode_one(GREEDY)
        # A new connection is to the new model, and works.
        again = load_engine(server.url)
        assert "another-model" in again.name and again.fingerprint == engine.fingerprint  # same tokenizer here
        assert say(Conversation(again), "Name a colour.")
    finally:
        server.stop()


@pytest.fixture(scope="module")
def proxied():
    """A real llama-server behind a proxy that can fail, stall, garble or cut requests."""
    server = LlamaServerProcess(slots=3, ctx_per_slot=1024, threads=1)
    proxy = FaultProxy(server.url)
    engine = load_engine(proxy.url, timeout=2.0)
    yield server, proxy, engine
    proxy.close()
    server.stop()


PROMPT = [MI.text("<|im_start|>user\nList three colours.<|im_end|>\n<|im_start|>assistant\n")]


@pytest.fixture(autouse=True)
def no_leftover_faults(request):
    """A fault a test injected but did not trigger must not hit the next test."""
    yield
    if "proxied" in request.fixturenames:
        request.getfixturevalue("proxied")[1].clear()


def test_http_500_poisons_only_that_session_with_the_servers_message(proxied):
    server, proxy, engine = proxied
    with engine.create_session() as sick, engine.create_session() as healthy:
        healthy.prefill(PROMPT)
        proxy.fail("/completion")  # the one-token request a prefill sends
        with pytest.raises(SessionPoisoned, match="HTTP 500: .*injected failure"):
            sick.prefill(PROMPT)
        assert sick.tokens == []
        sick.reset()
        sick.prefill(PROMPT)
        proxy.fail("/v1/completions")  # the stream the first decode opens
        with pytest.raises(SessionPoisoned, match="HTTP 500: .*injected failure"):
            sick.decode_one(GREEDY)
        assert sick.tokens == engine.tokenize(PROMPT)
        assert greedy_ids(healthy, 3)  # the other session never noticed
        with pytest.raises(SessionPoisoned, match="reset"):
            sick.decode_one(GREEDY)


def test_nonsense_and_a_cut_stream_never_put_a_wrong_token_in_the_tape(proxied):
    server, proxy, engine = proxied
    with engine.create_session() as s, engine.create_session() as ref:
        ref.prefill(PROMPT)
        want = greedy_ids(ref, 12)
        proxy.garble("/completion")
        with pytest.raises(SessionPoisoned, match="no token"):
            s.prefill(PROMPT)
        s.reset()
        s.prefill(PROMPT)
        proxy.cut("/v1/completions", after=3)  # the connection drops after three tokens
        got = []
        with pytest.raises(SessionPoisoned, match="lost the server at .* mid-stream"):
            for _ in range(12):
                got.append(s.decode_one(GREEDY).token_id)
        assert got == want[: len(got)] and s.tokens == engine.tokenize(PROMPT) + got
        s.reset()
        s.prefill(PROMPT)
        assert greedy_ids(s, 12) == want


def test_a_stalled_server_times_out_clearly_and_stop_never_waits_for_it(proxied):
    server, proxy, engine = proxied  # timeout=2 s
    with engine.create_session() as s:
        proxy.stall("/completion", 6)
        t0 = time.perf_counter()
        with pytest.raises(SessionPoisoned, match="sent nothing for 2 s .*the timeout"):
            s.prefill(PROMPT)
        assert time.perf_counter() - t0 < 5
        s.reset()
        s.prefill(PROMPT)
        proxy.stall("/v1/completions", 6)
        t0 = time.perf_counter()
        with pytest.raises(SessionPoisoned, match="sent no token for 2 s"):
            s.decode_one(GREEDY)
        assert time.perf_counter() - t0 < 5
        s.reset()
        s.prefill(PROMPT)
        proxy.stall("/v1/completions", 6)
        threading.Timer(0.5, s.stop).start()
        t0 = time.perf_counter()
        assert s.decode_one(GREEDY).is_terminal  # Stop answers while the server stalls
        assert time.perf_counter() - t0 < 2
        proxy.clear()
        assert not s.decode_one(GREEDY).is_terminal


def test_the_ui_says_what_went_wrong_and_keeps_the_message(proxied):
    server, proxy, engine = proxied
    with running_app(engine, max_sessions=2, max_new_tokens_cap=32) as (url, demo):
        c = Client(url, verbose=False)
        kw = {**UI_GREEDY, "max_new": 6, "stored": {"messages": []}}
        out = c.predict({"text": "Name a fruit.", "files": []}, api_name="/send", **kw)
        assert reply_text(out[0])
        proxy.fail("/v1/completions")
        out = c.predict({"text": "Name a colour.", "files": []}, api_name="/send", **kw)
        assert "HTTP 500" in out[2] and "injected failure" in out[2], out[2]
        tab = demo.sessions.get(c.session_hash)
        assert [t.text for t in tab.conv.turns if t.role == "user"] == ["Name a fruit.", "Name a colour."]
        proxy.stall("/completion", 6)
        out = c.predict({"text": "Name a planet.", "files": []}, api_name="/send", **kw)
        assert "the timeout" in out[2], out[2]
        assert out[1] == ui_suite.UNCHANGED  # the box keeps "Name a planet.", to send again
        out = c.predict({"text": "Name a planet.", "files": []}, api_name="/send", **kw)
        assert reply_text(out[0]) and re.search(r"reused \d+ .* server cache \d+", stats_text(out[3])), out[3]


# --------------------------------------------------------------------------- engines.check and the benchmark


def test_engines_check_passes_against_the_live_llama_server(smol, capsys):
    from engines import check

    assert check.main([smol.url, "--quick"]) == 0
    out = capsys.readouterr().out
    assert "FAIL" not in out and out.count("PASS") >= 11 and "llama-server" in out, out
    assert re.search(r"resending the tape hits the prefix cache +PASS", out), out


def test_engines_check_reports_failures_and_exits_nonzero():
    out = subprocess.run([sys.executable, "-m", "engines.check", f"http://127.0.0.1:{free_port()}"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "cannot reach" in out.stdout + out.stderr


def test_engines_check_fails_on_the_stub_when_seeds_are_ignored(vllm, capsys):
    from engines import check

    engine, stub = vllm
    stub.sample = lambda tape, temperature, seed: (stub.next_top(tape)[0][0], stub.next_top(tape))  # no seeds
    assert check.run(engine, n=4) == 1
    out = capsys.readouterr().out
    assert re.search(r"same seed same tokens different seeds differ +FAIL", out) and "1 failed" in out, out


def test_serving_benchmark_smoke(tmp_path, smol, capsys):
    import json

    from benchmarks import serving

    assert serving.main(["--smoke", "--url", smol.url, "--threads", "1", "--out", str(tmp_path / "s.json")]) == 0
    out = capsys.readouterr().out
    assert "decode_one" in out and "cached_tokens" in out
    res = json.loads((tmp_path / "s.json").read_text())
    assert res["decode_one"]["http_tok_s"] > 0 and res["decode_one"]["in_process_tok_s"] > 0
    assert res["turn_ttft"]["cached_tokens_cached"] > 0 and res["turn_ttft"]["cached_tokens_uncached"] == 0


# --------------------------------------------------------------------------- vLLM and SGLang dialects (stub)


def stub_engine(kind: str, **kw):
    stub = StubOpenAIServer(kind)
    if kind == "sglang":
        kw.setdefault("chat_template", CHATML)  # SGLang renders no template for a client
    engine = load_engine(stub.url, **kw)
    engine.stub = stub
    return engine


def break_stub_session(engine, monkeypatch, sick):
    """The sick session's requests fail in transport, as a dead connection would."""
    marked = set()
    real_request, real_stream, real_evaluate = engine.stream_request, engine.stream, engine.evaluate

    def stream_request(slot, *a, **k):
        body = real_request(slot, *a, **k)
        if slot == sick.slot:
            marked.add(id(body))
        return body

    def stream(body, on_chunk):
        if id(body) in marked:
            raise RuntimeError("simulated device failure")
        return real_stream(body, on_chunk)

    def evaluate(slot, *a, **k):
        if slot == sick.slot:
            raise RuntimeError("simulated device failure")
        return real_evaluate(slot, *a, **k)

    monkeypatch.setattr(engine, "stream_request", stream_request)
    monkeypatch.setattr(engine, "stream", stream)
    monkeypatch.setattr(engine, "evaluate", evaluate)


STUB_CASES = [EngineCase(f"stub-{kind}", lambda kind=kind: stub_engine(kind), chat_prompts, atol=1e-9,
                         break_session=break_stub_session) for kind in ("vllm", "sglang")]


@pytest.fixture(scope="module", params=STUB_CASES, ids=[c.id for c in STUB_CASES])
def case(request):
    c = request.param
    engine = c.make_engine()
    yield c, engine
    engine.stub.close()


session = contract_suite.session
SKIP_CONTRACT = {  # the stub's KV is not measurable; these do not depend on the engine
    "test_capacity_matches_the_measured_kv_cache", "test_invalid_sampling_is_rejected_at_construction"}
for _name in dir(contract_suite):
    if _name.startswith("test_") and _name not in SKIP_CONTRACT:
        globals()[f"test_dialect_{_name[5:]}"] = getattr(contract_suite, _name)


@pytest.fixture
def vllm():
    engine = stub_engine("vllm")
    yield engine, engine.stub
    engine.stub.close()


@pytest.fixture
def sglang():
    engine = stub_engine("sglang")
    yield engine, engine.stub
    engine.stub.close()


def oracle(stub, tape, n):
    tape, out = list(tape), []
    for _ in range(n):
        t = stub.next_top(tape)[0][0]
        out.append(t)
        tape.append(t)
    return out


def last(stub, path):
    return [b for p, b in stub.requests if p == path][-1]


def test_auto_detects_each_server_and_reads_its_capacity(vllm, sglang):
    for engine, stub in (vllm, sglang):
        assert engine.backend == stub.kind and engine.name == "stub/model-1b"
        assert engine.capacity.max_context_len == stub.max_model_len - 1  # room for the one greedy token
        assert engine.eos_token_ids == {0, 2}
    assert load_engine(vllm[1].url, max_context=100, max_sessions=2).capacity.max_context_len == 100


def test_vllm_request_sends_token_ids_and_every_sampling_setting(vllm):
    engine, stub = vllm
    with engine.create_session() as s:
        s.prefill([MI.text("hello")])
        ev = last(stub, "/v1/completions")
        assert ev["prompt"] == stub.encode("hello") and ev["max_tokens"] == 1 and not ev["stream"]
        assert ev["ignore_eos"] and ev["temperature"] == 0.0 and ev["return_token_ids"]
        s.decode_one(SamplingConfig(temperature=0.7, top_p=0.9, top_k=0, repetition_penalty=1.3, seed=5))
        body = last(stub, "/v1/completions")
    assert body["stream"] and body["stream_options"] == {"include_usage": True}
    assert body["prompt"] == stub.encode("hello") and isinstance(body["seed"], int)
    assert body["logprobs"] == engine.top_k_logprobs and body["return_tokens_as_token_ids"]
    want = {"temperature": 0.7, "top_p": 0.9, "top_k": -1, "min_p": 0.0, "repetition_penalty": 1.3,
            "presence_penalty": 0.0, "frequency_penalty": 0.0, "n": 1, "use_beam_search": False, "stop": [],
            "stop_token_ids": [0, 2], "ignore_eos": False, "min_tokens": 0, "skip_special_tokens": False}
    assert {k: body[k] for k in want} == want
    assert not set(body) - {*want, "model", "prompt", "max_tokens", "seed", "logprobs", "return_tokens_as_token_ids",
                            "return_token_ids", "stream", "stream_options", "include_stop_str_in_output",
                            "logit_bias", "bad_words", "spaces_between_special_tokens", "echo"}


def test_sglang_request_sends_input_ids_and_every_sampling_setting(sglang):
    engine, stub = sglang
    with engine.create_session() as s:
        s.prefill([MI.text("hello")])
        s.decode_one(SamplingConfig(temperature=0.7, top_k=40, seed=5))
    body = last(stub, "/generate")
    assert body["input_ids"] == stub.encode("hello") and body["stream"] and body["return_logprob"]
    assert body["top_logprobs_num"] == engine.top_k_logprobs and body["return_text_in_logprobs"]
    sp = body["sampling_params"]
    want = {"temperature": 0.7, "top_p": 1.0, "top_k": 40, "min_p": 0.0, "repetition_penalty": 1.0,
            "frequency_penalty": 0.0, "presence_penalty": 0.0, "stop": [], "stop_token_ids": [0, 2],
            "ignore_eos": False, "n": 1, "min_new_tokens": 0}
    assert {k: sp[k] for k in want} == want and isinstance(sp["sampling_seed"], int) and sp["max_new_tokens"] >= 1


@pytest.mark.parametrize("kind, knob", [("vllm", {"per_chunk": 3}), ("sglang", {"incremental": False}),
                                        ("sglang", {"incremental": True})])
def test_stream_shapes_give_the_exact_ids(kind, knob):
    """vLLM chunks that carry several tokens (--stream-interval), SGLang's cumulative
    and incremental outputs: one id per decode_one, the stub's own greedy ids."""
    engine = stub_engine(kind)
    stub = engine.stub
    for k, v in knob.items():
        setattr(stub, k, v)
    try:
        with engine.create_session() as s:
            s.prefill([MI.text("hello")])
            got = greedy_ids(s, 40)
            assert got == oracle(stub, stub.encode("hello"), 40) and s.tokens == stub.encode("hello") + got
            assert s.top_logprobs(3)[0][2] == -0.5 and s.next_logprobs(2)[0][1] == -0.5
            assert s.last_cached is not None and s.last_cached > 0  # resending the tape hit the cache
    finally:
        stub.close()


@pytest.mark.parametrize("kind", ["vllm", "sglang"])
@pytest.mark.parametrize("report_eos", [True, False])
def test_an_end_of_generation_id_is_returned_and_not_made_resident(kind, report_eos):
    engine = stub_engine(kind)
    stub = engine.stub
    stub.report_eos, stub.eos_every = report_eos, 9
    try:
        with engine.create_session() as s:
            s.prefill([MI.text("hi")])  # 2 ids; the stub's greedy id is EOS once 9 are resident
            out = [s.decode_one(GREEDY) for _ in range(8)]
            assert out[-1].is_eos and out[-1].text_piece == "" and out[-1].token_id in engine.eos_token_ids
            if report_eos or kind == "sglang":  # reported, or named by SGLang's finish_reason.matched
                assert out[-1].token_id == 2
            assert s.position == 9 and all(not r.is_terminal for r in out[:-1])
    finally:
        stub.close()


@pytest.mark.parametrize("kind", ["vllm", "sglang"])
def test_an_error_event_or_another_model_poisons_the_session_with_the_message(kind):
    engine = stub_engine(kind)
    stub = engine.stub
    try:
        with engine.create_session() as s:
            s.prefill([MI.text("hi")])
            stub.fail_stream = True
            with pytest.raises(SessionPoisoned, match="CUDA out of memory|scheduler crashed"):
                s.decode_one(GREEDY)
            stub.fail_stream = False
            s.reset()
            s.prefill([MI.text("hi")])
            if kind == "vllm":  # vLLM names the model in every response
                stub.model = "stub/another-model"
                with pytest.raises(SessionPoisoned, match="now serves 'stub/another-model'"):
                    s.decode_one(GREEDY)
            with pytest.raises(InvalidArgument, match="outside the vocabulary"):
                s.reset() or s.prefill([MI.tokens([10**9])])
            assert s.tokens == []
    finally:
        stub.close()


def test_vllm_renders_with_the_servers_own_template(vllm):
    engine, stub = vllm
    inputs = engine.render([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo",
                                                                 "token_ids": [300, 301]}])
    assert [i.kind for i in inputs] == ["text", "tokens", "text"] and inputs[1].value == (300, 301)
    assert engine.tokenize(inputs) == (stub.encode("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
                                       + [300, 301] + stub.encode("<|im_end|>\n<|im_start|>assistant\n"))
    chat = [b for p, b in stub.requests if p == "/tokenize" and "messages" in b][-1]
    assert chat["add_generation_prompt"] and chat["messages"][1]["content"] != "yo"  # ids spliced, not re-tokenised


def test_sglang_without_a_template_or_tokenizer_says_what_to_pass():
    stub = StubOpenAIServer("sglang")
    try:
        engine = load_engine(stub.url)
        with pytest.raises(Exception, match="pass tokenizer="):
            engine.render([{"role": "user", "content": "hi"}])
        with engine.create_session() as s:  # raw text still works
            assert s.prefill([MI.text("Once upon a time")]) == stub.next_top(stub.encode("Once upon a time"))[0][0]
    finally:
        stub.close()


def char_tokenizer(path, stub):
    """A local tokenizer with the stub's ids (one per character), saved as a transformers tokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {chr(c): 100 + c for c in [*range(32, 127), *map(ord, "\n你好")]}
    vocab.update(stub.SPECIAL)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   additional_special_tokens=["<|endoftext|>"])
    fast.chat_template = CHATML
    fast.save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("kind", ["vllm", "sglang"])
def test_a_local_tokenizer_is_checked_once_then_renders_and_tokenizes_here(kind, tmp_path):
    from tests.tiny_models import make_tokenizer

    stub = StubOpenAIServer(kind)
    try:
        engine = load_engine(stub.url, tokenizer=char_tokenizer(tmp_path / "same", stub))
        assert [p for p, b in stub.requests].count("/tokenize") == 1  # the one check
        inputs = engine.render([{"role": "user", "content": "hi 你好"}])
        assert engine.tokenize(inputs) == stub.encode("<|im_start|>user\nhi 你好<|im_end|>\n<|im_start|>assistant\n")
        assert [p for p, b in stub.requests].count("/tokenize") == 1  # rendered and tokenized here
        other = tmp_path / "other"
        make_tokenizer([]).save_pretrained(other)
        with pytest.raises(EngineError, match="does not match the model 'stub/model-1b'.*gives .* here but"):
            load_engine(stub.url, tokenizer=str(other))
    finally:
        stub.close()
