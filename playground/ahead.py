"""Decode ahead of the UI: run a reply's generator in its own thread.

Gradio drives a sync generator handler one `next()` at a time from its worker
threads, and renders each yielded value on its event loop before asking for
the next one. A reply generator driven that way waits for every render, so the
model idles while the page updates. `Ahead` runs the generator in a thread of
its own; the handler wakes whenever it made progress and renders the current
state, several tokens at once when the UI falls behind. The model never waits.
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Iterator


class Ahead:
    """Iterate `gen` in a background thread; iterating an `Ahead` yields the count
    of items produced so far, once per wake-up, and re-raises the generator's error.

    `close()` calls `stop` (which must make the generator end soon) and waits for
    the thread, so nothing runs on after the consumer has gone.
    """

    def __init__(self, gen: Iterator, stop: Callable[[], None], min_interval: float = 0.0, name: str = "decode-ahead"):
        self._gen, self._stop, self.min_interval = gen, stop, min_interval
        self._cond = threading.Condition()
        self._count, self._done, self._error = 0, False, None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for _ in self._gen:
                with self._cond:
                    self._count += 1
                    self._cond.notify()
            self._gen = None
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            self._error = e
        finally:
            try:
                close = getattr(self._gen, "close", None)  # only this thread touches the generator
                if close is not None:
                    close()
            finally:
                with self._cond:
                    self._done = True
                    self._cond.notify()

    def __iter__(self):
        seen, last = 0, float("-inf")
        while True:
            with self._cond:
                # At most one wake-up per `min_interval`: each render holds the GIL the
                # decode thread needs between ops, so fewer renders mean faster decoding.
                self._cond.wait_for(lambda: self._done, timeout=max(0.0, last + self.min_interval - time.monotonic()))
                self._cond.wait_for(lambda: self._count > seen or self._done)
                count, done = self._count, self._done
            last = time.monotonic()
            if count > seen:
                seen = count
                yield count
            elif done:
                break
        if self._error is not None:
            raise self._error

    def close(self, timeout: float | None = None) -> None:
        """Stop the generator (if still running) and wait for its thread to end."""
        if self._thread.is_alive():
            self._stop()
        self._thread.join(timeout)
