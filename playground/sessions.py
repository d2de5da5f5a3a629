"""One Conversation per browser tab, with a capacity limit and an idle timeout.

This module knows nothing of Gradio widgets or tensors: it maps an opaque key
(the tab's Gradio `session_hash`) to a `Tab` that owns one `Conversation`.
Tabs are made on a tab's first action, freed by `close(key)` (wired to
`demo.unload`) or by `sweep()` after `idle_timeout_s` without an action.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from engines import EngineError

log = logging.getLogger(__name__)


class Busy(EngineError):
    """Every session slot is taken; the message says to try again."""


class TabBusy(EngineError):
    """This tab already runs an action (a reply is streaming)."""


@dataclass
class Tab:
    """A browser tab's conversation plus the bookkeeping around it."""

    key: str
    conv: object
    raw: bool = False
    system_prompt: str = ""
    last_used: float = field(default_factory=time.monotonic)
    # Held for the whole of an action (a stream included): one action per tab.
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def streaming(self) -> bool:
        return self.lock.locked()

    def touch(self) -> None:
        self.last_used = time.monotonic()


def close_conversation(conv) -> None:
    """Free a conversation's engine session (its capacity slot)."""
    close = getattr(conv, "close", None)
    if callable(close):
        close()
        return
    session = getattr(conv, "session", None)
    if session is not None:
        session.close()


class SessionManager:
    """Maps tab keys to `Tab`s on one engine.

    Args:
        engine: the shared engine (only passed through to `make_conversation`).
        make_conversation: `(engine, messages|None, system_prompt, raw) -> Conversation`.
        max_sessions: how many tabs may hold a conversation at once.
        idle_timeout_s: a tab idle this long (and not streaming) is freed by `sweep`.
    """

    def __init__(self, engine, make_conversation: Callable, max_sessions: int, idle_timeout_s: float = 900.0):
        self.engine = engine
        self.make_conversation = make_conversation
        self.max_sessions = max_sessions
        self.idle_timeout_s = idle_timeout_s
        self._tabs: dict[str, Tab] = {}
        self._lock = threading.Lock()
        self._reaper: threading.Thread | None = None
        self._stop_reaper = threading.Event()

    # ------------------------------------------------------------------ lookup

    def get(self, key: str) -> Tab | None:
        with self._lock:
            return self._tabs.get(key)

    def __len__(self) -> int:
        with self._lock:
            return len(self._tabs)

    def keys(self) -> list[str]:
        with self._lock:
            return list(self._tabs)

    def open(self, key: str, messages: list | None = None, system_prompt: str = "", raw: bool = False) -> Tab:
        """The tab for `key`, made on first use (from a stored transcript if given).

        Raises `Busy` when `max_sessions` tabs already hold a conversation.
        """
        with self._lock:
            tab = self._tabs.get(key)
            if tab is not None:
                tab.touch()
                return tab
            if len(self._tabs) >= self.max_sessions:
                raise Busy(
                    f"busy: all {self.max_sessions} conversation slots are in use; "
                    "try again in a minute (idle tabs are freed after "
                    f"{int(self.idle_timeout_s)} s)"
                )
            conv = self.make_conversation(self.engine, messages, system_prompt, raw)
            tab = Tab(key, conv, raw=raw, system_prompt=system_prompt)
            self._tabs[key] = tab
            return tab

    def replace(self, tab: Tab, messages: list | None, system_prompt: str, raw: bool) -> None:
        """Give `tab` a new conversation (import, raw toggle, new system prompt)."""
        new = self.make_conversation(self.engine, messages, system_prompt, raw)
        old, tab.conv = tab.conv, new
        tab.raw, tab.system_prompt = raw, system_prompt
        close_conversation(old)

    # ------------------------------------------------------------------ freeing

    def close(self, key: str) -> bool:
        """Free `key`'s conversation (tab closed). A running stream is stopped first."""
        with self._lock:
            tab = self._tabs.pop(key, None)
        if tab is None:
            return False
        try:
            tab.conv.stop()
        except Exception:  # noqa: BLE001 - freeing must not fail on a broken conversation
            pass
        # Wait briefly for the stream to notice, so the session is not closed mid-forward.
        if tab.lock.acquire(timeout=5):
            tab.lock.release()
        close_conversation(tab.conv)
        return True

    def sweep(self, now: float | None = None) -> list[str]:
        """Free tabs idle longer than the timeout; returns their keys."""
        now = time.monotonic() if now is None else now
        with self._lock:
            idle = [k for k, t in self._tabs.items()
                    if not t.streaming and now - t.last_used > self.idle_timeout_s]
        return [k for k in idle if self.close(k)]

    def start_reaper(self, every_s: float = 30.0) -> None:
        """Run `sweep` in a daemon thread every `every_s` seconds."""
        if self._reaper is not None:
            return

        def loop():
            while not self._stop_reaper.wait(every_s):
                try:
                    self.sweep()
                except Exception:  # a failed sweep must not end the reaper: slots would leak
                    log.exception("idle sweep failed")

        self._reaper = threading.Thread(target=loop, name="playground-reaper", daemon=True)
        self._reaper.start()

    def shutdown(self) -> None:
        self._stop_reaper.set()
        for key in self.keys():
            self.close(key)
