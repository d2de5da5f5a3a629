"""Launch the playground in-process on a free 127.0.0.1 port, for the UI and browser tests."""

from __future__ import annotations

import contextlib
import html
import re
import socket
import time

from playground.ui import build_ui, launch
from playground.ui.view import View

GREEDY = dict(temperature=0, top_p=1, top_k=0, rep=1, seed=0, stops="", system_prompt="", raw=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_app(engine, launch_kwargs=None, **build_kwargs):
    """Yield (url, demo); the demo's sessions are freed and the server closed afterwards."""
    demo = build_ui(engine, **build_kwargs)
    port = free_port()
    launch(demo, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
           **(launch_kwargs or {}))
    try:
        yield f"http://127.0.0.1:{port}", demo
    finally:
        demo.sessions.shutdown()
        demo.close()


def shown(out) -> View:
    """A client's output tuple as a View, its fields named (`.chat`, `.status`, `.context`, ...)."""
    return View.read(out)


def gauge(context_html: str) -> tuple[int, int]:
    """(position, max) from the context panel's gauge."""
    m = re.search(r"data-position='(\d+)' data-max='(\d+)'", context_html)
    assert m, context_html[:200]
    return int(m.group(1)), int(m.group(2))


def reply_text(chat: list[dict]) -> str:
    """The last assistant message's text from a Chatbot value (as gradio_client returns it)."""
    for msg in reversed(chat or []):
        if msg["role"] == "assistant":
            content = msg["content"]
            if isinstance(content, str):
                return content
            return "".join(c.get("text", "") for c in content if isinstance(c, dict))
    return ""


def stats_text(context_html: str) -> str:
    m = re.search(r"<div id='stats'>(.*?)</div>", context_html)
    return html.unescape(m.group(1)) if m else ""


def wait_until(pred, timeout=10.0, every=0.01):
    """Poll `pred` until it is truthy; returns the seconds it took (raises on timeout)."""
    t0 = time.perf_counter()
    while not pred():
        if time.perf_counter() - t0 > timeout:
            raise TimeoutError(f"condition not met in {timeout} s")
        time.sleep(every)
    return time.perf_counter() - t0
