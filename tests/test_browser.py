"""The playground in a real browser: Debian's chromium driven by playwright.

Never `playwright install`: the browser is /usr/bin/chromium (scripts/setup.sh
--dev installs it). The browser lags the server under load, so each step waits
for the server-side effect first, then checks what the page shows.
"""

from __future__ import annotations

import os
import shutil
import time

import pytest

from tests.ui_harness import running_app, wait_until

pytestmark = pytest.mark.browser

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
        # A fake microphone (a beep) for the recording tests.
        "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream"]
T = 30_000  # ms; playwright's own default (5 s) is too short on a loaded CPU


@pytest.fixture(scope="module")
def app(smol):
    with running_app(smol, max_sessions=2, default_max_new_tokens=40, max_new_tokens_cap=64,
                     max_file_mb=1) as (url, demo):
        yield url, demo


@pytest.fixture(scope="module")
def browser():
    if not shutil.which(CHROMIUM) and not os.path.exists(CHROMIUM):
        pytest.skip("Debian chromium is not installed (scripts/setup.sh --dev installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


@pytest.fixture
def page(app, browser):
    for key in app[1].sessions.keys():
        app[1].sessions.close(key)
    ctx = browser.new_context(viewport={"width": 1400, "height": 1100}, permissions=["microphone"])
    pg = ctx.new_page()
    pg.set_default_timeout(T)
    pg.goto(app[0], wait_until="domcontentloaded")
    pg.wait_for_selector("#box textarea")
    yield pg
    ctx.close()


def the_tab(app):
    keys = app[1].sessions.keys()
    return app[1].sessions.get(keys[0]) if keys else None


def bot_text(pg) -> str:
    bots = pg.locator("#chatbot [data-testid=bot]")
    return bots.last.inner_text() if bots.count() else ""


def norm(s: str) -> str:
    return " ".join(s.split())


def idle(app, timeout=60):
    """Wait until the tab's action has finished on the server."""
    wait_until(lambda: the_tab(app) is not None and not the_tab(app).streaming
               and the_tab(app).conv.last_stats is not None, timeout=timeout, every=0.05)
    return the_tab(app).conv


def shows(pg, conv, timeout=30):
    """Wait until the page shows the server's last reply (its start, markdown aside)."""
    want = norm(conv.turns[-1].text)[:20]
    wait_until(lambda: want in norm(bot_text(pg)), timeout=timeout, every=0.1)


def page_gauge(pg) -> int:
    return int(pg.locator("#gauge").get_attribute("data-position"))


def test_chat_stop_regenerate_edit_rewind_continue_reset(app, page, artifacts):
    pg = page
    # Type, and the streamed text grows.
    pg.fill("#box textarea", "Tell me a long story about a cat.")
    pg.press("#box textarea", "Enter")
    seen = []
    deadline = time.time() + 60
    while len(set(seen)) < 3 and time.time() < deadline:
        n = len(bot_text(pg))
        if n and (not seen or n != seen[-1]):
            seen.append(n)
        time.sleep(0.1)
    assert len(set(seen)) >= 3 and seen == sorted(seen), f"streamed text did not grow: {seen}"
    assert pg.locator("#stop").is_enabled() and not pg.locator("#regenerate").is_enabled()

    # Stop, and the text is stable afterwards.
    pg.click("#stop")
    conv = idle(app, timeout=5)
    assert conv.last_stats.finish_reason == "stopped"
    wait_until(lambda: not pg.locator("#stop").is_enabled(), timeout=30)
    shows(pg, conv)
    stopped = bot_text(pg)
    time.sleep(1.5)
    assert bot_text(pg) == stopped and norm(stopped) == norm(conv.turns[-1].text)
    assert pg.locator("#regenerate").is_enabled()

    # Regenerate: a new reply to the same message, reusing everything before it.
    old_seed = conv.turns[-1].sampling["seed"]
    pg.click("#regenerate")
    wait_until(lambda: the_tab(app).conv.turns[-1].sampling["seed"] != old_seed, timeout=30)
    conv = idle(app)
    assert len(conv.turns) == 2 and conv.last_stats.prefilled == 0 and conv.last_stats.reused > 0
    shows(pg, conv)

    # Edit the user message with the Chatbot's own Edit button.
    pg.locator("#chatbot [data-testid=user]").first.hover()
    pg.locator("#chatbot button[aria-label='Edit']").first.click()
    pg.locator("#chatbot textarea.edit-textarea").first.fill("Tell me a short story about a dog.")
    pg.locator("#chatbot button[aria-label='Submit']").first.click()
    wait_until(lambda: the_tab(app).conv.turns[0].text == "Tell me a short story about a dog.", timeout=30)
    conv = idle(app)
    assert [t.role for t in conv.turns] == ["user", "assistant"]
    wait_until(lambda: "short story about a dog" in pg.locator("#chatbot [data-testid=user]").first.inner_text())
    shows(pg, conv)

    # Click a token: the reply is cut just before it and the gauge shows the rewind.
    reply = conv.turns[-1]
    start = reply.span[1] - len(reply.token_ids)
    wait_until(lambda: pg.locator("#token-view [data-tok]").count() == len(reply.token_ids), timeout=30)
    pg.locator("#token-view [data-tok='3']").click()
    wait_until(lambda: len(the_tab(app).conv.turns[-1].token_ids) == 3 and not the_tab(app).streaming, timeout=30)
    assert the_tab(app).conv.position == start + 3
    wait_until(lambda: page_gauge(pg) == start + 3, timeout=30)
    wait_until(lambda: "Rewound" in pg.locator("#status").inner_text(), timeout=30)

    # Continue resamples from the cut without re-reading anything.
    pg.click("#continue")
    wait_until(lambda: len(the_tab(app).conv.turns[-1].token_ids) > 3, timeout=30)
    conv = idle(app)
    assert conv.last_stats.reused == start + 3 and conv.last_stats.prefilled == 0
    wait_until(lambda: page_gauge(pg) == conv.position, timeout=30)
    shows(pg, conv)
    wait_until(lambda: pg.locator("#token-view [data-tok]").count() == len(conv.turns[-1].token_ids), timeout=30)
    pg.screenshot(path=str(artifacts / "playground.png"), full_page=True)

    # Reset clears the chat, the context and the server's conversation.
    pg.click("#reset")
    wait_until(lambda: the_tab(app).conv.turns == [], timeout=30)
    wait_until(lambda: pg.locator("#chatbot [data-testid=bot]").count() == 0, timeout=30)
    wait_until(lambda: page_gauge(pg) == 0, timeout=30)


def test_image_upload_to_text_only_model_keeps_text(app, page):
    pg = page
    from PIL import Image

    img = os.path.join(os.path.dirname(__file__), "..", "artifacts", "upload-test.png")
    os.makedirs(os.path.dirname(img), exist_ok=True)
    Image.new("RGB", (48, 48), (20, 120, 220)).save(img)
    pg.fill("#box textarea", "What is in this picture?")
    pg.locator("#box input[data-testid=file-upload]").set_input_files(img)
    time.sleep(1.0)  # let the upload finish before sending
    pg.press("#box textarea", "Enter")
    wait_until(lambda: "cannot take images" in pg.locator("#status").inner_text(), timeout=30)
    assert pg.locator("#box textarea").input_value() == "What is in this picture?"
    assert "Traceback" not in pg.content()
    tab = the_tab(app)
    assert tab is None or tab.conv.turns == []


def record(pg, seconds=1.5):
    """Record from the (fake) microphone into the box, as a person would."""
    pg.locator("#box button[aria-label='Record audio']").click()
    pg.locator("#box button[aria-label='Start recording']").click()
    time.sleep(seconds)
    pg.locator("#box button[aria-label='Stop recording']").click()
    attach = pg.locator("#box button[aria-label='Attach audio']")
    attach.wait_for()
    attach.click()
    time.sleep(1.0)  # the recording uploads


def test_microphone_recording_to_text_only_model_keeps_text(app, page):
    pg = page
    pg.fill("#box textarea", "Did you hear me?")
    record(pg)
    pg.press("#box textarea", "Enter")
    wait_until(lambda: "cannot take audio" in pg.locator("#status").inner_text(), timeout=30)
    assert pg.locator("#box textarea").input_value() == "Did you hear me?"
    tab = the_tab(app)
    assert tab is None or tab.conv.turns == []


def test_reload_keeps_the_transcript(app, page):
    pg = page
    pg.fill("#box textarea", "Say hello.")
    pg.press("#box textarea", "Enter")
    conv = idle(app)
    shows(pg, conv)
    time.sleep(0.5)  # the BrowserState write lands in localStorage
    pg.reload(wait_until="domcontentloaded")
    pg.wait_for_selector("#box textarea")
    wait_until(lambda: "Say hello." in pg.locator("#chatbot").inner_text(), timeout=30)
    shows(pg, conv)
    assert "restored" in pg.locator("#status").inner_text()


@pytest.mark.parametrize("family,kind,how", [("llava", "image", "upload"), ("qwen2_audio", "audio", "upload"),
                                             ("qwen2_audio", "audio", "microphone")])
def test_media_reaches_a_tiny_multimodal_model(family, kind, how, browser, tmp_path):
    """Issue 5's UI check: an uploaded image or audio file, or a microphone recording, reaches the
    model, and the context panel shows its KV span."""
    import numpy as np
    import soundfile
    from PIL import Image

    from tests.tiny_models import tiny_engine

    if kind == "image":
        f = tmp_path / "photo.png"
        Image.new("RGB", (40, 32), (10, 200, 30)).save(f)
    else:
        f = tmp_path / "clip.wav"
        soundfile.write(str(f), (0.2 * np.sin(np.arange(22050) / 7)).astype(np.float32), 44100)
    with running_app(tiny_engine(family), default_max_new_tokens=4) as (url, demo):
        ctx = browser.new_context(viewport={"width": 1400, "height": 1000}, permissions=["microphone"])
        pg = ctx.new_page()
        pg.set_default_timeout(T)
        pg.goto(url, wait_until="domcontentloaded")
        pg.fill("#box textarea", "What is this?")
        if how == "microphone":
            record(pg, seconds=0.3)  # the tiny audio model takes at most 2 s of audio
        else:
            pg.locator("#box input[data-testid=file-upload]").set_input_files(str(f))
            time.sleep(1.0)
        pg.press("#box textarea", "Enter")
        try:
            wait_until(lambda: demo.sessions.keys() and not demo.sessions.get(demo.sessions.keys()[0]).streaming
                       and len(demo.sessions.get(demo.sessions.keys()[0]).conv.turns) == 2, timeout=60, every=0.05)
        except TimeoutError:
            pytest.fail(f"no reply; status {pg.locator('#status').inner_text()!r}, "
                        f"box {pg.locator('#box').inner_text()!r}, tabs {demo.sessions.keys()}")
        conv = demo.sessions.get(demo.sessions.keys()[0]).conv
        assert [p.kind for p in conv.turns[0].parts] == [kind, "text"]
        (_, start, end), = conv.turns[0].media_spans
        wait_until(lambda: f"{kind} {start}–{end}" in pg.locator("#context").inner_text(), timeout=30)
        wait_until(lambda: pg.locator("#chatbot [data-testid=bot]").count() >= 1, timeout=30)
        assert "⚠️" not in pg.locator("#status").inner_text()
        ctx.close()


def test_closing_the_tab_frees_its_session(app, page):
    pg = page
    pg.fill("#box textarea", "Hi!")
    pg.press("#box textarea", "Enter")
    idle(app)
    assert len(app[1].sessions) == 1
    pg.close()  # demo.unload fires once the server notices the tab is gone
    waited = wait_until(lambda: len(app[1].sessions) == 0, timeout=90, every=0.5)
    print(f"session freed {waited:.1f} s after the tab closed")
