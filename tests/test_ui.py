"""The playground through gradio_client, against a launched app on the real default model.

Assertions are on what the server did (the tab's Conversation) and on the
widgets' values, not on exact token counts, so they hold on a loaded CPU.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time

import numpy as np
import pytest
import soundfile
from gradio_client import Client, handle_file

from tests.cases import ENGINES
from tests.ui_harness import GREEDY, gauge, reply_text, running_app, stats_text, shown, wait_until

UNCHANGED = {"__type__": "update"}  # what a client sees for a widget the handler left alone
EMPTY_STORE = {"messages": []}


@pytest.fixture(scope="module", params=list(ENGINES))
def smol(request):
    """The default model on each backend: the UI relies only on the contract."""
    return ENGINES[request.param]()


@pytest.fixture(scope="module")
def app(smol):
    # The handler's upload limit (1 MB) sits under the server's (5 MB), so an
    # oversized file reaches the handler and gets the playground's own message.
    with running_app(smol, max_sessions=2, max_new_tokens_cap=64, max_file_mb=1,
                     launch_kwargs={"max_file_size": "5mb"}) as (url, demo):
        yield url, demo


@pytest.fixture(autouse=True)
def fresh_tabs(request):
    """Each test starts with every tab freed (clients from earlier tests hold none)."""
    if "app" in request.fixturenames:
        sessions = request.getfixturevalue("app")[1].sessions
        for key in sessions.keys():
            sessions.close(key)
    yield


def client(app) -> Client:
    return Client(app[0], verbose=False)


def tab_of(app, c: Client):
    return app[1].sessions.get(c.session_hash)


def call(c: Client, api: str, *args, max_new=8, store=None, **kw):
    """Run an endpoint to the end; returns its last output tuple."""
    params = {**GREEDY, "max_new": max_new, "stored": store if store is not None else EMPTY_STORE, **kw}
    if api in ("/reset", "/undo", "/rewind"):
        params = {k: params[k] for k in ("system_prompt", "raw", "stored")} | kw
    return c.predict(*args, api_name=api, **params)


def send(c, text, files=(), **kw):
    return call(c, "/send", {"text": text, "files": [handle_file(f) for f in files]}, **kw)


# --------------------------------------------------------------------------- streaming and stop


def test_streaming_grows_and_panel_matches_server(app):
    c = client(app)
    job = c.submit({"text": "Name three fruits.", "files": []}, api_name="/send", **GREEDY, max_new=24,
                   stored=EMPTY_STORE)
    lengths = [len(reply_text(shown(out).chat)) for out in job]
    final = job.outputs()[-1]
    grown = [n for n in lengths if n > 0]
    assert len(set(grown)) >= 3, f"the reply did not stream (lengths {lengths})"
    assert grown == sorted(grown), f"streamed text shrank: {lengths}"
    tab = tab_of(app, c)
    conv = tab.conv
    assert [t.role for t in conv.turns] == ["user", "assistant"]
    assert reply_text(shown(final).chat) == conv.turns[-1].text
    pos, cap = gauge(shown(final).context)
    assert (pos, cap) == (conv.position, conv.max_context) and pos > 0
    stats = stats_text(shown(final).context)
    assert f"reused {conv.last_stats.reused} · prefilled {conv.last_stats.prefilled}" in stats
    assert "TTFT" in stats and f"finish: {conv.last_stats.finish_reason}" in stats
    # The token view shows one chip per generated token.
    assert shown(final).tokens.count("data-tok=") == len(conv.turns[-1].token_ids)
    # The transcript for page reloads (BrowserState) is the conversation's export.
    assert shown(final).stored["messages"] == conv.to_messages()
    # The box is cleared once the message is accepted.
    assert any(shown(out).box == {"text": "", "files": []} for out in job.outputs())


def thread_wakeups() -> int:
    """Voluntary context switches of every thread of this process so far (Linux)."""
    total = 0
    for t in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError), open(f"/proc/self/task/{t}/status") as f:
            total += sum(int(line.split()[1]) for line in f if line.startswith("voluntary_ctxt_switches"))
    return total


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts wake-ups through Linux's /proc")
def test_an_idle_app_does_not_spin(app):
    # Gradio's queue polls every 1 ms: 1,000 wake-ups a second of the event loop, each taking
    # the GIL and a core from decoding. launch() slows that polling (layout.quiet_queue).
    time.sleep(0.5)
    before, t0 = thread_wakeups(), time.monotonic()
    time.sleep(2)
    rate = (thread_wakeups() - before) / (time.monotonic() - t0)
    assert rate < 400, f"{rate:.0f} thread wake-ups a second in an idle app"


def test_cancel_stops_server_generation_quickly(app):
    c = client(app)
    job = c.submit({"text": "Write a long story about a dragon and a knight.", "files": []}, api_name="/send",
                   **GREEDY, max_new=64, stored=EMPTY_STORE)
    wait_until(lambda: tab_of(app, c) is not None and len(tab_of(app, c).conv.turns) == 2
               and len(tab_of(app, c).conv.turns[-1].token_ids) >= 3, timeout=60)
    tab = tab_of(app, c)
    assert tab.streaming
    # A forward already running cannot be interrupted (on a loaded CPU one decode step
    # alone can exceed 0.5 s), so the clock for "stopped" starts when that step lands.
    reply = tab.conv.turns[-1]
    n_before = len(reply.token_ids)
    marks = {}

    def watch():  # when the last token landed and when the stream let go of the tab
        n = n_before
        while tab.streaming:
            if len(reply.token_ids) != n:
                marks["step"], n = time.perf_counter(), len(reply.token_ids)
            time.sleep(0.002)
        marks["end"] = time.perf_counter()

    at_stop = []  # tokens when the server's side learned of the cancel (the HTTP hop before it varies)
    session = tab.conv.session  # Conversation.stop() ends with session.stop()
    stop = session.stop
    session.stop = lambda: (at_stop.append(len(reply.token_ids)), stop())[1]
    watcher = threading.Thread(target=watch)
    watcher.start()
    t0 = time.perf_counter()
    job.cancel()
    watcher.join(10)
    del session.stop  # the class's own again
    t_step, t_end = max(t0, marks.get("step", t0)), marks["end"]
    ids = list(tab.conv.turns[-1].token_ids)
    print(f"cancel -> server generation ended in {(t_end - t0) * 1000:.0f} ms; "
          f"{len(ids) - n_before} token(s) after the cancel; ended {(t_end - t_step) * 1000:.0f} ms after "
          "the step in flight")
    assert not tab.streaming
    assert t_end - t_step < 0.5, f"server kept generating for {t_end - t_step:.2f} s after cancel"
    assert at_stop, "the cancel never reached the conversation"
    assert len(ids) - at_stop[0] <= 2, "more than the step in flight was generated after cancel"
    pos = tab.conv.position
    time.sleep(1.0)
    assert tab.conv.turns[-1].token_ids == ids and tab.conv.position == pos, "generation went on after cancel"
    assert 3 <= len(ids) < 64
    assert tab.conv.last_stats.finish_reason == "stopped"
    assert tab.conv.turns[-1].span[1] == pos  # the partial reply is exactly what is resident


def test_stop_button_stops_only_its_own_tab(app):
    a, b = client(app), client(app)
    ja = a.submit({"text": "Count from one to fifty in words.", "files": []}, api_name="/send", **GREEDY,
                  max_new=64, stored=EMPTY_STORE)
    jb = b.submit({"text": "Write a poem about rain.", "files": []}, api_name="/send", **GREEDY,
                  max_new=64, stored=EMPTY_STORE)
    wait_until(lambda: all(tab_of(app, x) is not None and len(tab_of(app, x).conv.turns) == 2
                           and tab_of(app, x).conv.turns[-1].token_ids for x in (a, b)), timeout=60)
    a.predict(api_name="/stop")
    wait_until(lambda: not tab_of(app, a).streaming, timeout=5)
    assert tab_of(app, b).streaming, "Stop in one tab ended another tab's reply"
    n = len(tab_of(app, b).conv.turns[-1].token_ids)
    wait_until(lambda: len(tab_of(app, b).conv.turns[-1].token_ids) > n, timeout=20)  # b keeps going
    assert tab_of(app, a).conv.last_stats.finish_reason == "stopped"
    jb.cancel()
    ja.cancel()


# --------------------------------------------------------------------------- actions


def test_regenerate_reuses_the_prefix(app):
    c = client(app)
    first = send(c, "What is 2 + 2?")
    conv = tab_of(app, c).conv
    ids = list(conv.turns[-1].token_ids)
    start = conv.turns[-1].span[1] - len(ids)  # where the reply's own ids begin (after the header)
    again = call(c, "/regenerate")
    assert conv.last_stats.reused == start and conv.last_stats.prefilled == 0
    assert conv.turns[-1].token_ids == ids, "a greedy regenerate must reproduce the reply"
    assert reply_text(shown(again).chat) == reply_text(shown(first).chat)
    one = reply_text(call(c, "/regenerate", max_new=24, temperature=1.0, top_p=1.0, seed=1)[0])
    assert conv.turns[-1].sampling["seed"] == 1
    two = reply_text(call(c, "/regenerate", max_new=24, temperature=1.0, top_p=1.0, seed=2)[0])
    assert one != two, "different seeds at temperature 1 gave the same reply"
    assert len(conv.turns) == 2


def test_edit_replaces_turn_and_prefills_from_it(app):
    c = client(app)
    send(c, "My name is Ada.")
    send(c, "What is my name?")
    conv = tab_of(app, c).conv
    edited_start = conv.turns[2].span[0]
    out = call(c, "/edit", 2, "Say hello to me.")
    assert [t.role for t in conv.turns] == ["user", "assistant", "user", "assistant"]
    assert conv.turns[2].text == "Say hello to me."
    assert conv.last_stats.reused >= edited_start and conv.last_stats.reused < conv.turns[2].span[1]
    assert reply_text(shown(out).chat) == conv.turns[3].text
    assert shown(out).chat[2]["content"][0]["text"] == "Say hello to me."


def test_rewind_then_continue_and_step(app):
    c = client(app)
    send(c, "Describe the sea in two sentences.", max_new=20)
    conv = tab_of(app, c).conv
    reply = conv.turns[-1]
    ids = list(reply.token_ids)
    start = reply.span[1] - len(ids)  # where the reply's own ids begin (after the header)
    assert len(ids) >= 6
    out = call(c, "/rewind", 1, 3)
    assert conv.turns[-1].token_ids == ids[:3]
    assert gauge(shown(out).context)[0] == start + 3 == conv.position  # the gauge shows the rewind
    assert "Rewound" in shown(out).status
    out = call(c, "/continue", max_new=20)
    assert conv.last_stats.reused == start + 3 and conv.last_stats.prefilled == 0  # nothing re-read
    assert conv.turns[-1].token_ids[:3] == ids[:3] and len(conv.turns[-1].token_ids) > 3
    call(c, "/rewind", 1, 4)
    out = call(c, "/step")
    assert len(conv.turns[-1].token_ids) == 5, "Step must decode exactly one token"
    assert gauge(shown(out).context)[0] == start + 5


def test_undo_and_reset(app):
    c = client(app)
    send(c, "Hello!")
    send(c, "Tell me a joke.")
    conv = tab_of(app, c).conv
    out = call(c, "/undo")
    assert len(conv.turns) == 2 and shown(out).box["text"] == "Tell me a joke."  # the message is back in the box
    out = call(c, "/reset")
    assert shown(out).chat == [] and conv.turns == [] and gauge(shown(out).context)[0] == 0
    assert shown(out).stored["messages"] == []


def test_reload_restores_transcript_and_rebuilds_kv(app):
    c = client(app)
    out = send(c, "Remember the number 42.")
    store = shown(out).stored
    old = tab_of(app, c).conv
    reply_ids = list(old.turns[-1].token_ids)
    d = client(app)  # a reloaded page is a new session with the stored transcript
    out = call(d, "/regenerate", store=store)
    conv = tab_of(app, d).conv
    assert conv is not old and conv.turns[0].text == "Remember the number 42."
    assert conv.last_stats.reused == 0 and conv.last_stats.prefilled > 0  # KV rebuilt on the next action
    assert conv.turns[-1].token_ids == reply_ids


def test_export_import_roundtrip(app, tmp_path):
    c = client(app)
    send(c, "Say yes.")
    path = c.predict(api_name="/export")
    d = client(app)
    out = d.predict(handle_file(path), "", False, EMPTY_STORE, api_name="/import")
    conv_c, conv_d = tab_of(app, c).conv, tab_of(app, d).conv
    assert [t.text for t in conv_d.turns] == [t.text for t in conv_c.turns]
    assert conv_d.turns[-1].token_ids == conv_c.turns[-1].token_ids
    assert "imported" in shown(out).status
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    out = d.predict(handle_file(str(bad)), "", False, EMPTY_STORE, api_name="/import")
    assert "not valid JSON" in shown(out).status and len(conv_d.turns) == 2


def test_raw_mode_prefills_text_as_is(app, smol):
    from engines import MultimodalInput

    c = client(app)
    out = c.predict(True, "", api_name="/set_raw")
    assert "Raw mode" in shown(out).status
    send(c, "The capital of France is", raw=True, max_new=6)
    conv = tab_of(app, c).conv
    assert conv.raw
    prompt_ids = smol.tokenize([MultimodalInput.text("The capital of France is")])
    session_ids = conv.session.tokens
    assert session_ids[: len(prompt_ids)] == prompt_ids  # no template around the text
    assert session_ids[len(prompt_ids):] == conv.turns[-1].token_ids


def test_system_prompt_becomes_the_first_turn(app):
    c = client(app)
    send(c, "Who are you?", system_prompt="You are a pirate.", max_new=4)
    conv = tab_of(app, c).conv
    assert conv.turns[0].role == "system" and conv.turns[0].text == "You are a pirate."
    send(c, "And now?", system_prompt="You are a poet.", max_new=4)  # a new prompt rebuilds the conversation
    conv = tab_of(app, c).conv
    assert conv.turns[0].text == "You are a poet." and [t.role for t in conv.turns][1:] == ["user", "assistant"] * 2
    assert conv.last_stats.reused < conv.turns[1].span[0] + 1  # the prompt changed, so little is reusable


def test_reasoning_blocks_show_collapsed(app):
    chatbot = next(b for b in app[1].blocks.values() if getattr(b, "elem_id", None) == "chatbot")
    shown = chatbot.postprocess([{"role": "user", "content": "Why?"},
                                 {"role": "assistant", "content": "<think>Let me see.</think>Because."}]).root
    thought = next(m for m in shown if m.metadata and m.metadata.get("title"))
    assert thought.metadata["title"] == "Reasoning" and thought.metadata["status"] == "done"
    assert shown[-1].content[0].text == "Because."


# --------------------------------------------------------------------------- many users


def test_two_clients_are_isolated_and_never_block_each_other(app):
    a, b = client(app), client(app)
    results = {}

    def run(name, c, text):
        results[name] = send(c, text, max_new=12)

    threads = [threading.Thread(target=run, args=("a", a, "Say something about apples.")),
               threading.Thread(target=run, args=("b", b, "Say something about boats."))]
    for t in threads:
        t.start()
    # While both generate, a quick action in a third tab answers promptly.
    e = client(app)
    wait_until(lambda: any(tab_of(app, x) is not None and tab_of(app, x).streaming for x in (a, b)), timeout=60)
    t0 = time.perf_counter()
    e.predict(api_name="/stop")
    assert time.perf_counter() - t0 < 3.0, "another user's generation froze this tab"
    for t in threads:
        t.join(120)
    assert shown(results["a"]).chat[0]["content"][0]["text"] == "Say something about apples."
    assert shown(results["b"]).chat[0]["content"][0]["text"] == "Say something about boats."
    assert len(shown(results["a"]).chat) == len(shown(results["b"]).chat) == 2
    ta, tb = tab_of(app, a), tab_of(app, b)
    assert ta.conv is not tb.conv and ta.conv.session is not tb.conv.session
    assert ta.conv.turns[0].text != tb.conv.turns[0].text


def test_max_sessions_gives_a_busy_message(app):
    a, b, c = client(app), client(app), client(app)
    send(a, "Hi.", max_new=2)
    send(b, "Hi.", max_new=2)
    out = send(c, "Hello?", max_new=2)
    assert "busy" in shown(out).status and "try again" in shown(out).status
    assert shown(out).box == UNCHANGED and tab_of(app, c) is None
    app[1].sessions.close(a.session_hash)  # a tab goes away (demo.unload) ...
    out = send(c, "Hello?", max_new=2)  # ... and its slot is free again
    assert tab_of(app, c) is not None and "busy" not in shown(out).status


def test_idle_tabs_are_swept(app):
    c = client(app)
    send(c, "Hi.", max_new=2)
    sessions = app[1].sessions
    assert sessions.sweep() == []
    assert sessions.sweep(now=time.monotonic() + sessions.idle_timeout_s + 1) == [c.session_hash]
    assert tab_of(app, c) is None


# --------------------------------------------------------------------------- bad input


def _assert_rejected(app, c, out, *words):
    for w in words:
        assert w in shown(out).status, shown(out).status
    assert "Traceback" not in shown(out).status
    assert shown(out).box == UNCHANGED, "the typed text must stay in the box"
    tab = tab_of(app, c)
    assert tab is None or tab.conv.turns == []


def test_empty_message(app):
    c = client(app)
    _assert_rejected(app, c, send(c, "   "), "empty")


def test_unsupported_file_type(app, tmp_path):
    c = client(app)
    f = tmp_path / "notes.txt"
    f.write_text("hello")
    _assert_rejected(app, c, send(c, "Read this", [str(f)]), "notes.txt", "not a supported file type")


def test_file_over_upload_limit(app, tmp_path):
    c = client(app)
    f = tmp_path / "big.wav"
    soundfile.write(str(f), np.zeros(44100 * 15, dtype=np.float32), 44100)  # 16-bit: ~1.3 MB > 1 MB
    _assert_rejected(app, c, send(c, "Listen", [str(f)]), "big.wav", "upload limit")


def test_microphone_recording_to_text_only_model(app, tmp_path):
    c = client(app)
    f = tmp_path / "audio.wav"  # what the microphone sends: a 44.1 kHz mono wav
    soundfile.write(str(f), (0.1 * np.sin(np.arange(22050) / 10)).astype(np.float32), 44100)
    _assert_rejected(app, c, send(c, "What did I say?", [str(f)]), "cannot take audio", "text only")


def test_image_to_text_only_model(app, tmp_path):
    from PIL import Image

    c = client(app)
    f = tmp_path / "red.png"
    Image.new("RGB", (32, 32), (200, 0, 0)).save(f)
    _assert_rejected(app, c, send(c, "What is this?", [str(f)]), "cannot take images")


def test_message_too_long_for_the_context(app):
    c = client(app)
    out = send(c, "word " * 9000)
    _assert_rejected(app, c, out, "context is full", "Reset")


def test_bad_actions_give_messages(app):
    c = client(app)
    out = call(c, "/continue")
    assert "no reply to continue" in shown(out).status
    out = call(c, "/rewind", 5, 0)
    assert "turn index" in shown(out).status
    out = call(c, "/send", {"text": "hi", "files": []}, max_new=16, seed=-1, stops="\n\n")
    assert conv_ok(app, c)


def conv_ok(app, c) -> bool:
    """A random seed (-1) and a stop string are accepted and recorded."""
    turn = tab_of(app, c).conv.turns[-1]
    return turn.role == "assistant" and isinstance(turn.sampling["seed"], int) and turn.sampling["seed"] >= 0


# --------------------------------------------------------------------------- entry points


def test_app_import_loads_nothing_and_honours_gradio_env():
    import os
    import subprocess
    import sys

    code = ("import sys, app; assert 'torch' not in sys.modules and 'engines' not in sys.modules; "
            "a = app.parse_args([]); print(a.host, a.port, a.model, a.max_sessions)")
    env = {**os.environ, "GRADIO_SERVER_NAME": "0.0.0.0", "GRADIO_SERVER_PORT": "7999"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["0.0.0.0", "7999", "smollm2", "4"]


# --------------------------------------------------------------------------- multimodal models (tiny, offline)


@pytest.mark.parametrize("family,kind", [("llava", "image"), ("qwen2_audio", "audio")])
def test_media_reaches_a_multimodal_model(family, kind, tmp_path):
    """An upload (or a microphone recording: a 44.1 kHz wav) reaches the model; the panel shows its span."""
    from PIL import Image

    from tests.tiny_models import tiny_engine

    engine = tiny_engine(family)
    if kind == "image":
        f = tmp_path / "photo.png"
        Image.new("RGB", (40, 32), (10, 200, 30)).save(f)
    else:
        f = tmp_path / "audio.wav"
        soundfile.write(str(f), (0.2 * np.sin(np.arange(44100) / 7)).astype(np.float32), 44100)
    with running_app(engine, max_new_tokens_cap=8) as (url, demo):
        c = Client(url, verbose=False)
        out = c.predict({"text": "What is this?", "files": [handle_file(str(f))]}, api_name="/send",
                        **{**GREEDY, "max_new": 4, "stored": EMPTY_STORE})
        assert "⚠️" not in shown(out).status, shown(out).status
        conv = demo.sessions.get(c.session_hash).conv
        user = conv.turns[-2]
        assert [p.kind for p in user.parts] == [kind, "text"]
        assert conv.turns[-1].role == "assistant" and conv.last_stats.finish_reason is not None
        (mkind, start, end), = user.media_spans
        assert mkind == kind and user.span[0] <= start < end <= user.span[1]
        assert f"{kind} {start}–{end}" in shown(out).context  # the context panel lists the media span
        uploads = [part for msg in shown(out).chat if msg["role"] == "user" for part in msg["content"]]
        assert any(part.get("type") == "file" for part in uploads), "the chat should show the upload"
