"""Decode in the background: run a reply's generator in its own thread.

A Gradio generator handler renders each value it yields before it asks for the
next. A reply generator driven that way waits for every render, so the model
idles while the page updates. `BackgroundStream` runs the generator in a thread
of its own; the handler, an async generator on Gradio's event loop, wakes when it
made progress and gets every item produced since its last wake-up, several
tokens at once when the UI falls behind. The model never waits for the page.
Knows nothing of conversations or widgets.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Callable, Iterator


class BackgroundStream:
    """Iterate `gen` in a background thread; `async for` over it yields the list of items
    produced since the last wake-up, once per wake-up, and re-raises the generator's error.

    Wake-ups are paced: at most one per `min_interval` seconds, and after a
    consumer step that took `b` seconds (a render), the next waits until at least
    `b * (1 - share) / share` has passed, so the consumer's work stays near `share`
    of the time. Renders are Python work that holds the GIL the producer needs
    between its torch ops; pacing them keeps decoding near full speed, and adapts
    as renders grow with the chat.

    `close()` calls `stop` (which must make the generator end soon) and waits for
    the thread, so nothing runs on after the consumer has gone.
    """

    def __init__(self, gen: Iterator, stop: Callable[[], None], min_interval: float = 0.0, share: float = 1.0):
        if not 0 < share <= 1:
            raise ValueError(f"share must be in (0, 1], got {share!r}")
        self._gen, self._stop = gen, stop
        self.min_interval, self.share = min_interval, share
        self._lock = threading.Lock()  # guards the three fields below and `_wake`
        self._items, self._done, self._error = [], False, None
        self._wake: Callable[[], None] = lambda: None  # set by the consumer
        self._thread = threading.Thread(target=self._run, name="decode-ahead", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for item in self._gen:
                with self._lock:
                    self._items.append(item)
                    self._notify()
            self._gen = None
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            self._error = e
        finally:
            try:
                close = getattr(self._gen, "close", None)  # only this thread touches the generator
                if close is not None:
                    close()
            finally:
                with self._lock:
                    self._done = True
                    self._notify()

    def _notify(self) -> None:
        try:
            self._wake()
        except RuntimeError:  # the consumer's event loop has closed
            pass

    async def __aiter__(self):
        """Yield the items produced since the last wake-up, once per wake-up. Waits are awaits:
        cancelling the consumer's task interrupts them at once, where a sync generator
        blocked in `next()` could not be closed until it yielded."""
        loop = asyncio.get_running_loop()
        news, finished = asyncio.Event(), asyncio.Event()

        def wake():
            news.set()
            if self._done:
                finished.set()

        with self._lock:
            self._wake = lambda: loop.call_soon_threadsafe(wake)
        seen, not_before = 0, 0.0
        while True:
            delay = not_before - time.monotonic()
            if delay > 0 and not finished.is_set():
                # Paced, but the end is shown at once: under load a render can take 0.1 s, and
                # sleeping out its pacing (x9) after a Stop made the Stop look seconds late.
                try:
                    await asyncio.wait_for(finished.wait(), delay)
                except asyncio.TimeoutError:
                    pass
            news.clear()
            with self._lock:
                count, done = len(self._items), self._done
            if count == seen and not done:
                await news.wait()  # set by the producer after the clear above: no wake-up is lost
                continue
            if count > seen:
                new, seen = self._items[seen:count], count
                yielded = time.monotonic()
                yield new
                back = time.monotonic()
                not_before = max(yielded + self.min_interval, back + (back - yielded) * (1 - self.share) / self.share)
            elif done:
                break
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        """Stop the generator (if still running) and wait for its thread to end."""
        if self._thread.is_alive():
            self._stop()
        self._thread.join()
