"""Branches and Compare (issue 17) on the real default model, through the Python API,
the UI (gradio_client) and a real browser.

Oracles: the full chat-template render of the current branch (replies spliced in as
their exact ids), a fresh session prefilled with the same ids, and a solo
`regenerate` with the same sampling and seed.
"""

from __future__ import annotations

import json
import threading
import time

import pytest

from engines import Busy, EngineError, InvalidArgument, MultimodalInput as MI, NotSupported, SamplingConfig, Session
from playground import Conversation
from playground.prefix import common_prefix
from tests.cases import ENGINES, greedy_ids

GREEDY = SamplingConfig()
HOT = [SamplingConfig(temperature=1.0, seed=s) for s in (11, 12)] + [SamplingConfig(temperature=0.7, seed=13)]


def say(conv, text, sampling=GREEDY, n=6):
    return "".join(conv.send([MI.text(text)], sampling, n))


def oracle_tokens(engine, conv):
    """What must be resident while this branch is current: the render of the turns
    before the last reply (generation prompt on), then that reply's exact ids."""
    turns = conv.turns
    reply = turns[-1] if turns and turns[-1].role == "assistant" else None
    messages = [{"role": t.role, "content": t.text, **({"token_ids": t.token_ids} if t.role == "assistant" else {})}
                for t in (turns[:-1] if reply else turns)]
    return engine.tokenize(engine.render(messages, add_generation_prompt=True)) + (reply.token_ids if reply else [])


def greedy_from(engine, ids, n):
    with engine.create_session() as s:
        s.prefill([MI.tokens(ids)])
        return greedy_ids(s, n)


def tree(conv):
    """Every turn's alternatives and the current one, for comparing two conversations."""
    return [(t.role, conv.siblings(i), conv.sibling_index(i)) for i, t in enumerate(conv.turns)]


@pytest.fixture(scope="module", params=list(ENGINES))
def engine(request):
    """The default model on each backend, for what goes through the contract: switching,
    compare (fork, decode_batch), Stop, and the UI. The tree's own logic, the transcript
    and the transformers engine's fork and batching run on `smol` (transformers) only."""
    return ENGINES[request.param]()


# --------------------------------------------------------------------------- the tree


def test_regenerate_edit_and_rewind_then_continue_keep_what_they_replace(smol):
    conv = Conversation(smol, system_prompt="Be brief.")
    say(conv, "Name a fruit.")
    first = conv.turns[2].text
    "".join(conv.regenerate(HOT[0], 6))
    assert conv.siblings(2) == [first, conv.turns[2].text] and conv.sibling_index(2) == 1
    assert conv.turns[2].sampling["seed"] == 11 and conv.siblings(1) == ["Name a fruit."]

    say(conv, "And a colour?")
    "".join(conv.edit(3, [MI.text("And a planet?")], GREEDY, 6))
    assert conv.siblings(3) == ["And a colour?", "And a planet?"] and conv.sibling_index(3) == 1

    reply = conv.turns[4]
    conv.rewind(4, 2)
    assert conv.siblings(4) == [reply.text, conv.turns[4].text] and len(conv.turns[4].token_ids) == 2
    conv.rewind(4, 1)  # a cut never continued is cut again in place: nothing would be lost
    assert len(conv.siblings(4)) == 2 and conv.turns[4].token_ids == reply.token_ids[:1]
    "".join(conv.continue_reply(HOT[1], 4))
    assert conv.siblings(4)[0] == reply.text and conv.sibling_index(4) == 1
    assert conv.session.tokens == oracle_tokens(smol, conv)

    conv.drop_from(3)  # Undo drops the current branch only
    assert [t.role for t in conv.turns] == ["system", "user", "assistant"]
    say(conv, "One more?")
    assert conv.siblings(3) == ["And a colour?", "One more?"]


def test_switch_restores_a_branch_exactly_and_reuses_the_shared_history(engine):
    conv = Conversation(engine)
    say(conv, "Tell me about owls.", n=8)
    a = list(conv.turns[1].token_ids)
    shared = conv.position - len(a)  # the history both replies answer
    "".join(conv.regenerate(HOT[0], 8))
    b = list(conv.turns[1].token_ids)
    assert a != b

    conv.switch(1, 0)
    assert conv.turns[1].token_ids == a and conv.session.tokens == oracle_tokens(engine, conv)
    st = conv.last_stats
    assert st.reused == shared + common_prefix(a, b) and st.prefilled == len(a) - common_prefix(a, b)
    assert not st.fallback  # none of the shared history was prefilled again
    conv.switch(1, 1)
    assert conv.turns[1].token_ids == b and conv.last_stats.reused >= shared

    # A deeper branch comes back with everything that followed it, and decodes as a fresh session would.
    say(conv, "Why?", n=6)
    later = [t.text for t in conv.turns]
    "".join(conv.edit(2, [MI.text("Where do they live?")], GREEDY, 6))
    conv.switch(2, 0)
    assert [t.text for t in conv.turns] == later
    assert conv.session.tokens == oracle_tokens(engine, conv)
    assert conv.last_stats.reused >= conv.turns[2].span[0]
    want = greedy_from(engine, conv.session.tokens, 4)
    "".join(conv.continue_reply(GREEDY, 4))
    assert conv.turns[-1].token_ids[-len(want):] == want or conv.last_stats.finish_reason == "eos"

    with pytest.raises(InvalidArgument, match="outside"):
        conv.switch(1, 5)
    with pytest.raises(InvalidArgument, match="outside"):
        conv.siblings(9)


# --------------------------------------------------------------------------- compare


def test_compare_replies_equal_solo_regenerates_from_one_prefill(engine):
    conv = Conversation(engine, system_prompt="You tell stories.")
    say(conv, "Start a story about a fox.", n=4)
    before = conv.turns[2].text
    opened = engine.open_sessions
    pieces = {0: [], 1: [], 2: []}
    for k, piece in conv.compare(HOT, max_new_tokens=8):
        pieces[k].append(piece)
        assert engine.open_sessions == opened + 2  # two forks while it runs
    assert engine.open_sessions == opened
    st = conv.last_stats
    assert st.replies == 3 and st.extra_prefilled == 0 and st.prefilled == 0 and len(st.finish_reasons) == 3
    replies = conv.last_compare[1]
    assert conv.siblings(2) == [before] + [r.text for r in replies] and conv.sibling_index(2) == 1
    assert ["".join(pieces[k]) for k in range(3)] == [r.text for r in replies]
    assert conv.session.tokens == oracle_tokens(engine, conv)  # the first reply is resident
    assert len({tuple(r.token_ids) for r in replies}) == 3
    for k, sampling in enumerate(HOT):  # the oracle: each alone, from the same seed
        "".join(conv.regenerate(sampling, 8))
        assert conv.turns[2].token_ids == replies[k].token_ids, k


def test_compare_without_fork_prefills_again_and_says_so(smol, monkeypatch):
    forked = Conversation(smol)
    say(forked, "Name two rivers.", n=2)
    "".join(t for _, t in forked.compare(HOT[:2], 5))
    monkeypatch.setattr(type(forked.session), "fork", Session.fork)  # an smol that cannot fork
    conv = Conversation(smol)
    say(conv, "Name two rivers.", n=2)
    prompt = conv.position - len(conv.turns[1].token_ids)
    "".join(t for _, t in conv.compare(HOT[:2], 5))
    assert conv.last_stats.extra_prefilled == prompt  # one more full prefill, reported
    assert [r.token_ids for r in conv.last_compare[1]] == [r.token_ids for r in forked.last_compare[1]]
    forked.close(), conv.close()


def test_compare_with_a_new_message_and_bad_calls(smol):
    conv = Conversation(smol)
    with pytest.raises(InvalidArgument, match="nothing to compare"):
        conv.compare(HOT[:2], 4)
    with pytest.raises(InvalidArgument, match="2 to 4"):
        conv.compare(HOT[:1], 4, parts=[MI.text("hi")])
    with pytest.raises(InvalidArgument, match="SamplingConfig"):
        conv.compare([GREEDY, {"temperature": 1}], 4, parts=[MI.text("hi")])
    assert conv.turns == [] and conv.last_stats is None
    "".join(t for _, t in conv.compare(HOT[:2], 4, parts=[MI.text("Hello!")]))
    assert [t.role for t in conv.turns] == ["user", "assistant"] and len(conv.siblings(1)) == 2
    assert conv.session.tokens == oracle_tokens(smol, conv)
    conv.close()


def test_fork_and_compare_respect_the_capacity(smol):
    conv = Conversation(smol)
    say(conv, "Hi!", n=3)
    held = []
    with pytest.raises(EngineError, match="busy"):
        while True:  # fill every free slot, whoever else holds some
            held.append(smol.create_session())
    try:
        with pytest.raises(EngineError, match="busy") as refused:
            conv.session.fork()
        assert isinstance(refused.value, Busy)
        tokens, turns = conv.session.tokens, tree(conv)
        with pytest.raises(EngineError, match="busy: comparing 2 replies needs 1 more session"):
            conv.compare(HOT[:2], 4)
        assert conv.session.tokens == tokens and tree(conv) == turns
        held.pop().close()
        "".join(t for _, t in conv.compare(HOT[:2], 4))
        assert len(conv.siblings(1)) == 3
    finally:
        for s in held:
            s.close()
        conv.close()


def test_stop_during_compare_stops_every_reply(engine):
    conv = Conversation(engine)
    say(conv, "Count from one to fifty in words.", n=2)
    opened = engine.open_sessions
    gen = conv.compare(HOT, max_new_tokens=200)
    seen = 0
    for _ in gen:
        seen += 1
        if seen == 6:
            threading.Thread(target=conv.stop).start()
            break
    rest = list(gen)
    assert len(rest) <= 3 + 3  # at most the round in flight, plus held-back tails
    st = conv.last_stats
    assert st.finish_reasons == ("stopped",) * 3 and st.finish_reason == "stopped"
    assert engine.open_sessions == opened
    assert all(0 < len(r.token_ids) < 200 for r in conv.last_compare[1])
    assert conv.session.tokens == oracle_tokens(engine, conv)
    say(conv, "Thanks.", n=2)  # and no stop request is left behind
    assert conv.last_stats.finish_reason in ("eos", "length")


# --------------------------------------------------------------------------- export / import


def test_the_whole_tree_round_trips_and_flat_transcripts_still_import(smol):
    conv = Conversation(smol, system_prompt="Be brief.")
    say(conv, "Name a fruit.", n=3)
    "".join(conv.regenerate(HOT[0], 3))
    say(conv, "And a colour?", n=3)
    "".join(t for _, t in conv.compare(HOT[:2], 3))
    "".join(conv.edit(3, [MI.text("And a planet?")], GREEDY, 3))
    conv.switch(3, 0)  # back to the colour, whose reply has three alternatives
    messages = json.loads(json.dumps(conv.to_messages()))
    assert messages[2]["sibling_index"] == 1 and len(messages[2]["siblings"]) == 1
    assert messages[3]["sibling_index"] == 0 and messages[4]["sibling_index"] == 1
    back = Conversation.from_messages(smol, messages)
    assert tree(back) == tree(conv) and back.session.tokens == conv.session.tokens
    assert back.to_messages() == messages

    back.drop_from(3)  # the current branch ends where another goes on: "next_branches"
    after = json.loads(json.dumps(back.to_messages()))
    assert [m["content"] for b in after[-1]["next_branches"] for m in b[:1]] == ["And a planet?"]
    assert Conversation.from_messages(smol, after, prefill=False).to_messages() == after
    back.close()

    flat = [{k: v for k, v in m.items() if k not in ("siblings", "sibling_index", "next_branches")}
            for m in messages]
    old = Conversation.from_messages(smol, flat)
    assert [len(old.siblings(i)) for i in range(len(old.turns))] == [1] * 5
    assert old.session.tokens == conv.session.tokens
    old.close()

    bad = json.loads(json.dumps(messages))
    bad[2]["siblings"][0][0]["role"] = "user"
    with pytest.raises(InvalidArgument, match="sibling of a assistant message must be a assistant"):
        Conversation.from_messages(smol, bad)
    conv.close()


# --------------------------------------------------------------------------- engines


def test_fork_copies_tokens_and_pending_logits_and_is_independent(smol):
    prompt = smol.render([{"role": "user", "content": "What is the capital of France?"}])
    with smol.create_session() as s:
        s.prefill(prompt)
        opened = smol.open_sessions
        with s.fork() as f:
            assert smol.open_sessions == opened + 1
            assert f.tokens == s.tokens
            want = greedy_from(smol, s.tokens, 6)
            assert greedy_ids(f, 6) == want
            assert s.position == len(smol.tokenize(prompt))  # the original did not move
            assert greedy_ids(s, 6) == want
        assert smol.open_sessions == opened

    class Bare(Session):  # a backend written from base.py alone
        tokens = []
        prefill = decode_one = stop = can_seek = seek = reset = close = lambda *a: None

    with pytest.raises(NotSupported, match="cannot fork"):
        Bare().fork()


def test_decode_batch_equals_decode_one(smol):
    prompt = smol.render([{"role": "user", "content": "Write a line about rain."}])
    with smol.create_session() as s:
        s.prefill(prompt)
        solo = []
        for c in HOT:
            with s.fork() as f:
                solo.append([f.decode_one(c).token_id for _ in range(5)])
        forks = [s.fork() for _ in HOT]
        batched = [[], [], []]
        for _ in range(5):
            for out, r in zip(batched, smol.decode_batch(forks, HOT)):
                out.append(r.token_id)
        assert batched == solo
        assert forks[0].tokens == s.tokens + solo[0] or any(t in smol.eos_token_ids for t in solo[0])
        for f in forks:
            f.close()


def test_fork_of_a_multimodal_session_keeps_its_media_state():
    from tests.tiny_models import media_prompts, tiny_engine

    engine = tiny_engine("qwen2_vl")  # M-RoPE positions are per session: they must be copied
    prompt = media_prompts("image")(engine)[0]
    with engine.create_session() as s:
        s.prefill(prompt)
        with s.fork() as f:
            assert f.tokens == s.tokens and f.media_spans == s.media_spans and f.rope_deltas == s.rope_deltas
            assert greedy_ids(f, 5) == greedy_ids(s, 5)


# --------------------------------------------------------------------------- the UI (gradio_client)

EMPTY = {"messages": []}
CMP = dict(n=3, t1=1.0, s1=11, t2=1.0, s2=12, t3=0.7, s3=13, t4=1.0, s4=14, top_p=1.0, top_k=0, rep=1.0, stops="",
           system_prompt="", raw=False)


@pytest.fixture(scope="module")
def app(engine):
    from tests.ui_harness import running_app

    with running_app(engine, max_sessions=2, max_new_tokens_cap=48, default_max_new_tokens=8) as (url, demo):
        yield url, demo


@pytest.fixture
def ui(app):
    """A fresh gradio_client per test, every tab freed first."""
    from gradio_client import Client

    for key in app[1].sessions.keys():
        app[1].sessions.close(key)
    return Client(app[0], verbose=False)


def conv_of(app, c):
    return app[1].sessions.get(c.session_hash).conv


def ui_compare(c, text="", store=EMPTY, max_new=8, **kw):
    return c.predict({"text": text, "files": []}, **{**CMP, **kw}, max_new=max_new, stored=store, api_name="/compare")


def test_ui_switch_compare_keep_reload_and_import(app, ui, engine):
    from gradio_client import Client, handle_file

    from tests.ui_harness import GREEDY, gauge, reply_text, shown, stats_text

    ui.predict({"text": "Name a fruit.", "files": []}, api_name="/send", **GREEDY, max_new=6, stored=EMPTY)
    conv = conv_of(app, ui)
    shared = conv.position - len(conv.turns[1].token_ids)
    out = ui.predict(api_name="/regenerate", **{**GREEDY, "temperature": 1.0, "seed": 5}, max_new=6, stored=EMPTY)
    assert "data-nav='[[1, 1, 1, 2]]'" in shown(out).context and "2/2" in shown(out).context  # chat message 1 = turn 1, at 2 of 2

    out = ui.predict(1, 0, "", False, EMPTY, api_name="/switch")
    assert conv.sibling_index(1) == 0 and reply_text(shown(out).chat) == conv.turns[1].text
    assert conv.session.tokens == oracle_tokens(engine, conv)
    assert gauge(shown(out).context)[0] == conv.position  # the gauge and the token view follow the branch
    assert shown(out).tokens.count("data-tok=") == len(conv.turns[1].token_ids)
    assert f"reused {conv.last_stats.reused} · prefilled {conv.last_stats.prefilled}" in stats_text(shown(out).context)
    assert conv.last_stats.reused >= shared

    out = ui_compare(ui)  # an empty box: the last message, answered three more ways
    replies = conv.last_compare[1]
    assert shown(out).compare.count("class='cmp-col") == 3 and "Compared 3 replies" in shown(out).status
    assert "compare ×3: one prefill, forked" in stats_text(shown(out).context)
    assert all(html_text(r.text) in shown(out).compare for r in replies)
    assert conv.siblings(1)[2:] == [r.text for r in replies] and conv.sibling_index(1) == 2

    out = ui.predict(2, "", False, EMPTY, api_name="/keep")
    assert conv.turns[1] is replies[2] and reply_text(shown(out).chat) == replies[2].text and "Kept reply 3" in shown(out).status
    store = shown(out).stored
    assert store["messages"][1]["sibling_index"] == 4 and len(store["messages"][1]["siblings"]) == 4

    reloaded = Client(app[0], verbose=False)  # a reloaded page: a new session with the stored transcript
    out = reloaded.predict(1, 0, "", False, store, api_name="/switch")
    back = conv_of(app, reloaded)
    assert back.siblings(1) == conv.siblings(1) and back.sibling_index(1) == 0
    assert back.session.tokens == oracle_tokens(engine, back) and "data-nav='[[1, 1, 0, 5]]'" in shown(out).context
    app[1].sessions.close(reloaded.session_hash)

    imported = Client(app[0], verbose=False)
    imported.predict(handle_file(ui.predict(api_name="/export")), "", False, EMPTY, api_name="/import")
    assert tree(conv_of(app, imported)) == tree(conv)


def html_text(text: str) -> str:
    import html

    return html.escape(text)


@pytest.mark.parametrize("engine", ["transformers"], indirect=True)  # Stop and capacity: both in the API tests
def test_ui_stop_during_compare_and_the_capacity_limit(app, ui, engine):
    from tests.ui_harness import GREEDY, shown, wait_until

    ui.predict({"text": "Count from one to fifty in words.", "files": []}, api_name="/send", **GREEDY, max_new=2,
               stored=EMPTY)
    conv = conv_of(app, ui)
    opened = engine.open_sessions
    job = ui.submit({"text": "", "files": []}, **CMP, max_new=48, stored=EMPTY, api_name="/compare")
    wait_until(lambda: conv.last_compare is not None
               and all(len(r.token_ids) >= 2 for r in conv.last_compare[1]), timeout=120)
    ui.predict(api_name="/stop")
    waited = wait_until(lambda: not app[1].sessions.get(ui.session_hash).streaming, timeout=10)
    job.cancel()
    lengths = [len(r.token_ids) for r in conv.last_compare[1]]
    assert conv.last_stats.finish_reasons == ("stopped",) * 3 and all(n < 48 for n in lengths), lengths
    assert engine.open_sessions == opened, "the compare's forks were not freed"
    time.sleep(0.5)
    assert [len(r.token_ids) for r in conv.last_compare[1]] == lengths, "a reply went on after Stop"
    print(f"Stop ended all three replies {waited:.2f} s after it was pressed")

    held = []
    try:
        with pytest.raises(EngineError):
            while True:
                held.append(engine.create_session())
        before = tree(conv)
        out = ui_compare(ui)
        assert "busy" in shown(out).status and "compare fewer replies" in shown(out).status and tree(conv) == before
    finally:
        for s in held:
            s.close()


# --------------------------------------------------------------------------- a real browser


@pytest.mark.browser
@pytest.mark.parametrize("engine", ["transformers"], indirect=True)
def test_browser_branch_control_compare_keep_and_reload(app, engine, artifacts):
    import os
    import shutil

    from tests.test_browser import ARGS, CHROMIUM, T
    from tests.ui_harness import wait_until

    if not shutil.which(CHROMIUM) and not os.path.exists(CHROMIUM):
        pytest.skip("Debian chromium is not installed (scripts/setup.sh --dev installs it)")
    from playwright.sync_api import sync_playwright

    sessions = app[1].sessions
    for key in sessions.keys():
        sessions.close(key)

    def tab():
        keys = sessions.keys()
        return sessions.get(keys[0]) if keys else None

    def idle():
        return tab() is not None and not tab().streaming

    def nav(pg):  # the chat's ‹ k/n › on the reply
        return pg.locator("#chatbot .branch-nav .branch-pos").first

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        pg = browser.new_page(viewport={"width": 1400, "height": 1100})
        pg.set_default_timeout(T)
        pg.goto(app[0], wait_until="domcontentloaded")
        pg.wait_for_selector("#box textarea")
        pg.fill("#box textarea", "Name a fruit.")
        pg.press("#box textarea", "Enter")
        wait_until(lambda: idle() and len(tab().conv.turns) == 2, timeout=60, every=0.05)
        assert pg.locator("#chatbot .branch-nav").count() == 0  # no alternatives yet
        pg.click("#regenerate")
        wait_until(lambda: idle() and len(tab().conv.siblings(1)) == 2, timeout=60, every=0.05)
        conv = tab().conv
        wait_until(lambda: nav(pg).count() and nav(pg).inner_text() == "2/2", timeout=30)

        # ‹ switches back to the first reply; the chat and the context panel follow.
        first = conv.siblings(1)[0]
        pg.locator("#chatbot .branch-nav button[aria-label='previous alternative']").click()
        wait_until(lambda: conv.sibling_index(1) == 0 and idle(), timeout=30)
        wait_until(lambda: nav(pg).inner_text() == "1/2", timeout=30)
        wait_until(lambda: " ".join(first.split())[:15] in " ".join(
            pg.locator("#chatbot [data-testid=bot]").last.inner_text().split()), timeout=30)
        wait_until(lambda: f"reused {conv.last_stats.reused}" in pg.locator("#stats").inner_text(), timeout=30)

        # Compare: three replies side by side, then keep the third.
        pg.click("#compare")
        wait_until(lambda: conv.last_compare is not None and idle() and conv.last_stats.finish_reasons, timeout=90)
        replies = conv.last_compare[1]
        wait_until(lambda: pg.locator("#compare-grid .cmp-col").count() == 3, timeout=30)
        wait_until(lambda: pg.locator("#compare-grid [data-keep]").count() == 2
                   and pg.locator("#compare-grid [data-keep='2']").is_enabled(), timeout=30)
        for k, r in enumerate(replies):
            shown = pg.locator(f"#compare-grid .cmp-col[data-k='{k}'] .cmp-text").inner_text()
            assert " ".join(shown.split()) == " ".join(r.text.split()) or (not r.text and shown == "…")
        pg.locator("#compare-grid [data-keep='2']").click()
        wait_until(lambda: conv.turns[1] is replies[2] and idle(), timeout=30)
        wait_until(lambda: nav(pg).inner_text() == "5/5", timeout=30)
        pg.screenshot(path=str(artifacts / "branches-compare.png"), full_page=True)

        # The tree survives a reload (the browser-stored transcript).
        time.sleep(0.5)  # the BrowserState write lands in localStorage
        pg.reload(wait_until="domcontentloaded")
        pg.wait_for_selector("#box textarea")
        wait_until(lambda: nav(pg).count() and nav(pg).inner_text() == "5/5", timeout=30)
        browser.close()


@pytest.mark.bench
def test_branches_benchmark_quick_smoke(tmp_path):
    """benchmarks/branches.py end to end on tiny histories (structure only; timings are not asserted)."""
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "branches.json"
    root = Path(__file__).resolve().parent.parent
    p = subprocess.run([sys.executable, "-m", "benchmarks.branches", "--quick", "--backend", "transformers",
                        "--out", str(out)], cwd=root, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(out.read_text())["transformers"]
    assert r["compare"]["ratio_wall"] > 0 and r["switch"]["ratio"] > 0
    assert r["compare"]["compare3"]["extra_prefilled"]["median"] == 0
