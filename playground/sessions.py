"""The tab registry: one Conversation per browser tab, a tab limit and an idle timeout.

This module knows nothing of Gradio widgets or tensors: it maps an opaque key
(the tab's Gradio `session_hash`) to a `Tab` that owns one `Conversation`.
Tabs are made on a tab's first action, freed by `close(key)` (wired to
`demo.unload`) or by `sweep()` after `idle_timeout_s` without an action.

It also owns two things a public deployment needs per tab, keyed the same way
and kept even before the tab has a conversation:
- stop requests (`request_stop`): a Stop is recorded with its time, so an action
  that was asked for before it is pre-empted however late it starts
  (`stop_requested(key, since)`), and a running stream is stopped at once;
- a rate limit on actions (`RateLimit`, `take_action`): a token bucket per tab, so
  a script hammering one tab is refused quickly instead of queueing work.
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from engines import Busy, EngineError  # noqa: F401 - Busy: the one "no room" error, the engine's included (re-exported)

log = logging.getLogger(__name__)


class TabBusy(EngineError):
    """This tab already runs an action (a reply is streaming)."""


class RateLimited(EngineError):
    """This tab asked for more actions than the rate limit allows; the message says when to retry."""


# Stop requests are remembered this long (an action can wait in the queue for a
# while before it starts) and for at most this many tabs (keys come from clients).
STOP_MEMORY_S = 600.0
# A Stop that finds nothing running (no tab yet, or between actions) also pre-empts an action
# asked for up to this long after it: a client's Send and Stop race over two connections, and
# in a run here the Stop sent 0.1 s after a new tab's Send reached the server 0.08 s before it.
STOP_GRACE_S = 2.0
MAX_REMEMBERED_KEYS = 10_000


@dataclass(frozen=True)
class RateLimit:
    """At most `per_minute` actions a minute per tab, `burst` of them at once.
    `per_minute <= 0` turns the limit off."""

    per_minute: float = 120.0
    burst: int = 30

    def __post_init__(self):
        if self.per_minute > 0 and (isinstance(self.burst, bool) or not isinstance(self.burst, int) or self.burst < 1):
            raise ValueError(f"a rate limit's burst must be an int >= 1, got {self.burst!r}")

    @property
    def on(self) -> bool:
        return self.per_minute > 0


@dataclass
class Tab:
    """A browser tab's conversation plus the bookkeeping around it."""

    key: str
    conv: object
    raw: bool = False
    system_prompt: str = ""
    last_used: float = field(default_factory=time.monotonic)

    @property
    def lock(self) -> threading.Lock:
        """The conversation's action lock: one action per tab. A conversation that replaces
        this one (import, raw toggle) is made with the same lock."""
        return self.conv.lock

    @property
    def streaming(self) -> bool:
        return self.lock.locked()

    def touch(self) -> None:
        self.last_used = time.monotonic()


class PromptTooLong(EngineError):
    """One action's new message is over the deployment's prompt limit."""


# No tokenizer makes tokens of more characters than this on average, so text longer
# than this many times the limit is refused without tokenizing it (a pasted novel).
CHARS_PER_TOKEN_BOUND = 32


def check_prompt(engine, parts, max_tokens: int | None) -> int | None:
    """Refuse a new message (text and media, expanded as the model sees them) over
    `max_tokens` tokens, before anything changes. Returns its token count (None when
    there is no limit). Media errors surface here as they would in `send`."""
    if not max_tokens:
        return None
    chars = sum(len(p.value) for p in parts if p.kind == "text")
    if chars > max_tokens * CHARS_PER_TOKEN_BOUND:
        raise PromptTooLong(f"The message is {chars:,} characters long, far over the limit of "
                            f"{max_tokens:,} tokens per message. Send a shorter message; your text is kept.")
    n = len(engine.tokenize(list(parts)))
    if n > max_tokens:
        raise PromptTooLong(f"The message is {n:,} tokens (attachments included), over the limit of "
                            f"{max_tokens:,} tokens per message. Send a shorter message; your text is kept.")
    return n


def release_memory() -> bool:
    """Hand heap pages glibc keeps for reuse back to the system (`malloc_trim(0)`).

    Freed sessions' memory is free but stays resident: with 6 tabs of SmolLM2 on the
    transformers backend gone, RSS stayed 120-170 MiB over its start, and trimming gave
    50-90 MiB of it back (benchmarks/soak.py, docs/reliability.md).
    Returns whether there was a glibc to ask. ctypes lets go of the GIL meanwhile."""
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL("libc.so.6")
            _libc.malloc_trim  # noqa: B018 - musl and macOS have none
        except (OSError, AttributeError):
            _libc = False
    if not _libc:
        return False
    _libc.malloc_trim(0)
    return True


_libc = None


def close_conversation(conv) -> None:
    """Free a conversation's engine session (its capacity slot)."""
    close = getattr(conv, "close", None)
    if callable(close):
        close()
        return
    session = getattr(conv, "session", None)
    if session is not None:
        session.close()


class TabRegistry:
    """Maps tab keys to `Tab`s on one engine.

    Args:
        engine: the shared engine (only passed through to `make_conversation`).
        make_conversation: `(engine, messages|None, system_prompt, raw, lock) -> Conversation`.
        max_sessions: how many tabs may hold a conversation at once (the deployment's limit, at
            most the engine's; a session the engine refuses is the same `Busy`).
        idle_timeout_s: a tab idle this long (and not streaming) is freed by `sweep`.
    """

    def __init__(self, engine, make_conversation: Callable, max_sessions: int, idle_timeout_s: float = 900.0,
                 rate_limit: RateLimit | None = None):
        self.engine = engine
        self.make_conversation = make_conversation
        self.max_sessions = max_sessions
        self.idle_timeout_s = idle_timeout_s
        self.rate_limit = rate_limit or RateLimit(0)
        self.stop_grace_s = STOP_GRACE_S
        # Called with a key after its tab was freed or went away: the UI drops what its framework
        # keeps per tab.
        self.on_close: Callable[[str], None] | None = None
        self._freed = False  # a tab was freed since the reaper last released memory
        self._tabs: dict[str, Tab] = {}
        self._lock = threading.Lock()  # guards the three dicts
        self._stops: dict[str, float] = {}  # key -> pre-empts actions asked for up to then (time.monotonic())
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, when)
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
            conv = self.make_conversation(self.engine, messages, system_prompt, raw, threading.Lock())
            tab = Tab(key, conv, raw=raw, system_prompt=system_prompt)
            self._tabs[key] = tab
            return tab

    def replace(self, tab: Tab, messages: list | None, system_prompt: str, raw: bool) -> None:
        """Give `tab` a new conversation (import, raw toggle, new system prompt)."""
        new = self.make_conversation(self.engine, messages, system_prompt, raw, tab.lock)
        old, tab.conv = tab.conv, new
        tab.raw, tab.system_prompt = raw, system_prompt
        close_conversation(old)

    # ------------------------------------------------------------------ stop and rate

    def request_stop(self, key: str, now: float | None = None) -> bool:
        """Stop `key`'s running stream, and remember the request for an action asked
        for before it that has not started yet (or whose tab does not exist yet). A
        Stop that finds nothing running also pre-empts an action asked for up to
        STOP_GRACE_S after it (the two requests raced). Returns whether a tab was
        there to stop. Never blocks on a forward pass."""
        now = time.monotonic() if now is None else now
        with self._lock:
            tab = self._tabs.get(key)
            reach = now if (tab is not None and tab.streaming) else now + self.stop_grace_s
            self._stops.pop(key, None)  # re-inserted: the dict stays in time order
            self._stops[key] = reach
            self._forget(self._stops, now - STOP_MEMORY_S, lambda t: t)
        if tab is None:
            return False
        try:
            tab.conv.stop()
        except Exception:  # noqa: BLE001 - a broken conversation must not fail a Stop
            log.exception("stop failed")
        return True

    def stop_requested(self, key: str, since: float) -> bool:
        """Whether a Stop for `key` reaches an action asked for at `since` (time.monotonic()):
        it came later, or found nothing running and came at most STOP_GRACE_S earlier."""
        with self._lock:
            reach = self._stops.get(key)
        return reach is not None and reach >= since

    def take_action(self, key: str, now: float | None = None) -> None:
        """Count one action against `key`'s rate limit; raises `RateLimited` when over it."""
        rate = self.rate_limit
        if not rate.on:
            return
        now = time.monotonic() if now is None else now
        per_s = rate.per_minute / 60.0
        with self._lock:
            tokens, when = self._buckets.get(key, (float(rate.burst), now))
            tokens = min(float(rate.burst), tokens + (now - when) * per_s)
            if tokens < 1.0:
                self._buckets[key] = (tokens, now)
                wait = (1.0 - tokens) / per_s
                raise RateLimited(
                    f"Too many actions in this tab: at most {rate.per_minute:g} a minute "
                    f"({rate.burst} at once). Try again in {max(wait, 0.1):.1f} s."
                )
            self._buckets.pop(key, None)  # re-inserted: the dict stays in time order
            self._buckets[key] = (tokens - 1.0, now)
            # A full bucket says nothing: forget it (keys come from clients, so the dict stays small).
            self._forget(self._buckets, now - rate.burst / per_s, lambda v: v[1])

    @staticmethod
    def _forget(d: dict, before: float, when) -> None:
        """Drop entries last touched before `before`, and the oldest beyond the cap (lock held)."""
        if len(d) < 64:
            return
        for k in [k for k, v in d.items() if when(v) < before]:
            del d[k]
        while len(d) > MAX_REMEMBERED_KEYS:
            del d[next(iter(d))]

    # ------------------------------------------------------------------ freeing

    def close(self, key: str) -> bool:
        """Free `key`'s conversation (tab closed). A running stream is stopped first.
        `on_close` runs either way: a tab that held no conversation has framework state too."""
        with self._lock:
            tab = self._tabs.pop(key, None)
        if tab is None:
            self._closed_hook(key)
            return False
        try:
            tab.conv.stop()
        except Exception:  # noqa: BLE001 - freeing must not fail on a broken conversation
            pass
        # Wait briefly for the stream to notice, so the session is not closed mid-forward.
        if tab.lock.acquire(timeout=5):
            tab.lock.release()
        close_conversation(tab.conv)
        self._freed = True
        self._closed_hook(key)
        return True

    def _closed_hook(self, key: str) -> None:
        if self.on_close is not None:
            try:
                self.on_close(key)
            except Exception:  # noqa: BLE001 - freeing must not fail on a hook
                log.exception("on_close hook failed")

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
                    if self._freed:  # tabs went away: give their memory back to the system
                        self._freed = False
                        release_memory()
                except Exception:  # a failed sweep must not end the reaper: slots would leak
                    log.exception("idle sweep failed")

        self._reaper = threading.Thread(target=loop, name="playground-reaper", daemon=True)
        self._reaper.start()

    def shutdown(self) -> None:
        self._stop_reaper.set()
        for key in self.keys():
            self.close(key)


SessionManager = TabRegistry  # its former name
