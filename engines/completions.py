"""A Session over a streaming completion server (llama.cpp in process, or a
serving engine by URL). Knows nothing of torch, Gradio, or how the server is
reached: the engine (a `CompletionEngine`) sends requests and parses chunks.

The session keeps the exact token tape client-side; the server's prompt cache
keeps the KV. Every request sends the whole tape and the server evaluates only
what it has not cached.
- `prefill` sends the tape plus the new ids and asks for one greedy token: that
  fills the cache and gives the pending distribution.
- `decode_one` takes one token from a stream kept open between calls. Tokens
  the stream produced but `decode_one` never returned are never resident.
- `stop` cancels the stream at the next token boundary; `seek` truncates the
  tape; the next request reuses the cached prefix.

Where this differs from the transformers engine (engines/base.py allows it):
- The random stream is re-seeded from (seed, position) whenever a stream is
  (re)opened: after prefill, seek, reset, stop, a change of settings, a lost-id
  recovery, a pause, and at window ends (16, 32, ... 256 tokens). The same seed and the
  same actions give the same reply; a reply stopped and continued differs from
  the uninterrupted one after the stop.
- Probabilities are the top-k log-probabilities the server reports, not full
  logits (`next_logprobs`, `top_logprobs`).
"""

from __future__ import annotations

import atexit
import hashlib
import random
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Sequence

from .base import (
    STOP_RESULT,
    ContextFull,
    DecodeResult,
    Engine,
    EngineError,
    InvalidArgument,
    MultimodalInput,
    NotSupported,
    SamplingConfig,
    Session,
    SessionPoisoned,
    framed,
)

FIRST_WINDOW, LAST_WINDOW = 16, 256  # tokens a stream may run ahead of the reader

# Streams whose request is still running. A stop does not wait for its stream to
# end (that takes one more token); exit does, since a thread still inside
# llama.cpp's handle_completions when Python exits aborts the process.
_LIVE: set = set()
_LIVE_LOCK = threading.Lock()


@atexit.register
def end_all_streams(timeout: float = 30.0) -> None:
    """Cancel every running stream and wait for each to end."""
    with _LIVE_LOCK:
        live = list(_LIVE)
    for s in live:
        s.cancel()
    for s in live:
        s.thread.join(timeout)


@dataclass(frozen=True)
class Token:
    """One sampled token as a server reported it. `lost` counts the ids before
    it that the stream did not report (they end inside a UTF-8 character)."""

    id: int
    text: str
    logprob: float | None
    top: tuple = ()  # ((id, text, logprob), ...) of the distribution it was sampled from
    lost: int = 0
    lost_ids: tuple = ()  # the skipped ids, where the engine could tell them from the bytes


@dataclass
class Evaluated:
    """What a one-token greedy request says about the pending distribution."""

    greedy: int
    top: tuple  # ((id, text, logprob), ...), maybe shorter than asked (see `top_logprobs`)
    cached: int | None = None  # prompt tokens the server took from its cache


@dataclass
class Parsed:
    """One stream chunk: its token (or None), the finish reason, or an error."""

    token: Token | None = None
    finish: str | None = None
    error: str | None = None
    cached: int | None = None


class CompletionEngine(Engine):
    """What `CompletionSession` needs from its engine; adapters implement these."""

    max_context: int
    top_k_logprobs: int = 5  # asked for on every token, so the token view has alternatives

    def prepare(self, inputs: Sequence[MultimodalInput]) -> list[int]:
        """Validate inputs and return their ids (raises before anything changes)."""
        raise NotImplementedError

    def evaluate(self, slot: int, ids: list[int], k: int) -> Evaluated:
        """Make `ids` the slot's cached prompt; return the greedy next token and top k."""
        raise NotImplementedError

    def stream_request(self, slot: int, ids: list[int], sampling: SamplingConfig, seed: int, n: int) -> dict:
        raise NotImplementedError

    def stream(self, request: dict, on_chunk: Callable[[dict], bool]) -> None:
        """Run `request`, calling `on_chunk` per chunk until it returns True or the stream ends."""
        raise NotImplementedError

    def parse_chunk(self, chunk: dict, produced: int) -> Parsed:
        raise NotImplementedError

    def recover_ids(self, slot: int, request: dict, upto: int) -> list[int]:
        """The slot's ids up to `upto` (prompt + generated), after its stream ended."""
        raise NotImplementedError

    def release_slot(self, slot: int) -> None: ...

    def copy_slot(self, src: int, dst: int) -> None:
        raise NotSupported(f"{self.name} cannot copy a slot")


def stream_seed(base: int, position: int) -> int:
    """The seed of a stream opened at `position` (llama.cpp takes 32 bits; 2**32-1 means random)."""
    h = hashlib.blake2b(f"{base}:{position}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") % (2**32 - 1)


class _Stream:
    """One streaming request, read by a background thread into a queue."""

    def __init__(self, engine: CompletionEngine, request: dict, sampling: SamplingConfig, start: int):
        self.request, self.sampling, self.start = request, sampling, start
        self.items: deque = deque()  # Parsed chunks with a token, then one final Parsed
        self.cond = threading.Condition()
        self.cancelled = False
        self.ended = False
        self.finished = False  # a final item (finish reason or error) is queued
        self.produced = 0  # tokens the server reported so far (lost ones included)
        self._engine = engine
        self.thread = threading.Thread(target=self._run, name="completion-stream", daemon=True)
        with _LIVE_LOCK:
            _LIVE.add(self)
        self.thread.start()

    def _run(self):
        final = Parsed(finish="cancelled")
        try:
            self._engine.stream(self.request, self._on_chunk)
            if not self.cancelled:
                final = Parsed(error="the stream ended without a finish reason")
        except Exception as e:  # the transport failed; the reader poisons the session
            final = Parsed(error=f"{type(e).__name__}: {e}")
        with self.cond:
            if not self.finished:
                self.items.append(final)
                self.finished = True
            self.ended = True
            self.cond.notify_all()
        with _LIVE_LOCK:
            _LIVE.discard(self)

    def _on_chunk(self, chunk: dict) -> bool:
        try:
            parsed = self._engine.parse_chunk(chunk, self.produced)
        except Exception as e:  # never let an exception cross into C++
            parsed = Parsed(error=f"unreadable chunk from the server: {e!r}")
        with self.cond:
            if self.cancelled:
                return True
            if parsed.token is not None:
                self.produced += 1 + parsed.token.lost
                self.items.append(parsed)
            if parsed.finish or parsed.error:
                self.items.append(Parsed(finish=parsed.finish, error=parsed.error, cached=parsed.cached))
                self.finished = True
            self.cond.notify_all()
            return parsed.error is not None

    def next(self, stop: threading.Event) -> Parsed | None:
        """The next item, waiting for it; None when `stop` was set while waiting."""
        with self.cond:
            while not self.items:
                if stop.is_set():
                    return None
                self.cond.wait(0.05)
            return self.items[0]

    def pop(self) -> Parsed:
        with self.cond:
            return self.items.popleft()

    def cancel(self) -> None:
        with self.cond:
            self.cancelled = True
            self.cond.notify_all()
        abort = getattr(self._engine, "abort", None)  # by URL: shut the connection now, even if the server stalls
        if abort is not None:
            abort(self.request)

    def close(self) -> None:
        """Cancel without waiting: the request ends at the server's next token, and
        a later request on the same slot waits for it there."""
        self.cancel()


class CompletionSession(Session):
    """One conversation on one server slot. Thread-safe `stop()`; one caller at a time otherwise."""

    def __init__(self, engine: CompletionEngine, slot: int):
        self._engine = engine
        self._slot = slot
        self._stop = threading.Event()
        self._closed = False
        self._close_lock = threading.Lock()
        self._stream: _Stream | None = None
        self._ready: deque[Token] = deque()  # recovered tokens to return before any stream
        self._clear()

    def _clear(self) -> None:
        self._close_stream()
        self._ids: list[int] = []
        self._next: Evaluated | None = None  # pending distribution, when known
        self._last: Token | None = None  # what the last decode step returned
        self._poisoned: str | None = None
        self._seed_base: int | None = None
        self._window = FIRST_WINDOW
        self._stop.clear()
        self.last_cached: int | None = None  # prompt tokens the last request found in the server's cache

    # -- state

    @property
    def tokens(self) -> list[int]:
        return list(self._ids)

    @property
    def position(self) -> int:
        return len(self._ids)

    @property
    def slot(self) -> int:
        return self._slot

    def _usable(self) -> None:
        if self._closed:
            raise EngineError("this session is closed; create a new one")
        if self._poisoned is not None:
            raise SessionPoisoned(f"this session is unusable after a failed request ({self._poisoned}); call reset()")

    def _poison(self, why: str) -> SessionPoisoned:
        self._close_stream()
        self._poisoned = why
        return SessionPoisoned(f"request failed: {why}; call reset() to use this session again")

    def _close_stream(self) -> None:
        self._ready.clear()
        if self._stream is not None:
            self._stream.close()
            self._stream = None

    def _moved(self) -> None:
        """After the tape changed other than by a decode step: a new random stream."""
        self._close_stream()
        self._last = None
        self._seed_base = None
        self._window = FIRST_WINDOW

    # -- the contract

    def prefill(self, inputs, num_bos=0, num_eos=0) -> int:
        self._usable()
        new, _ = framed(self._engine, self.position, self._engine.prepare(inputs), num_bos, num_eos)
        self._stop.clear()
        self._moved()
        tape = self._ids + new
        self._evaluate(tape)
        self._ids = tape
        return self._next.greedy

    def _evaluate(self, tape: list[int], k: int | None = None) -> None:
        try:
            ev = self._engine.evaluate(self._slot, tape, max(k or 0, self._engine.top_k_logprobs))
        except InvalidArgument:
            raise  # the server's own validation refused the ids before running anything: nothing changed
        except EngineError as e:
            raise self._poison(str(e)) from e
        except Exception as e:  # a transport failure mid-request
            raise self._poison(f"{type(e).__name__}: {e}") from e
        self._next = ev
        self.last_cached = ev.cached

    def decode_one(self, sampling: SamplingConfig) -> DecodeResult:
        self._usable()
        if not isinstance(sampling, SamplingConfig):
            raise InvalidArgument(f"sampling must be a SamplingConfig, got {type(sampling).__name__}")
        if self._stop.is_set():
            return self._stopped()
        if not self._ids:
            raise InvalidArgument("nothing to decode from: prefill first")
        eng = self._engine
        if self.position >= eng.max_context:
            raise ContextFull(f"position {self.position} has reached the context of {eng.max_context}")
        tok = self._next_token(sampling)
        if tok is None:
            return self._stopped()
        self._last = tok
        if tok.id in eng.eos_token_ids:
            # Not resident; the stream ran past it (or ended), so the next call reopens.
            self._close_stream()
            if tok.top:  # the distribution it was sampled from is still the pending one
                self._next = Evaluated(tok.top[0][0], tok.top)
            return DecodeResult(tok.id, "", True, True)
        self._ids.append(tok.id)
        self._next = None
        return DecodeResult(tok.id, tok.text, False, False)

    def _stopped(self) -> DecodeResult:
        self._stop.clear()
        self._close_stream()
        return STOP_RESULT

    def _next_token(self, sampling: SamplingConfig) -> Token | None:
        """The next token of the stream for `sampling`, opening or recovering as needed."""
        s = self._stream
        if s is not None and s.sampling != sampling:
            self._close_stream()
            self._window = FIRST_WINDOW
        if self._ready:
            return self._ready.popleft()
        while True:
            if self._stream is None:
                self._open(sampling)
            item = self._stream.next(self._stop)
            if item is None:
                return None
            if item.token is not None:
                self._stream.pop()
                tok = item.token
                if tok.lost and len(tok.lost_ids) == tok.lost:
                    self._ready.extend(Token(t, "", None) for t in tok.lost_ids)
                    self._ready.append(Token(tok.id, tok.text, tok.logprob, tok.top))
                    return self._ready.popleft()
                if tok.lost:
                    return self._recover(tok)
                return tok
            # The stream ended: a window used up, or an error.
            self._stream.close()
            self._stream = None
            if item.error:
                raise self._poison(item.error)
            if item.cached is not None:
                self.last_cached = item.cached
            if item.finish == "length":
                self._window = min(self._window * 2, LAST_WINDOW)
                continue
            if item.finish == "cancelled":  # by a stop request that a seek or prefill then cleared
                continue
            if item.finish == "stop":  # the server ended on an end-of-generation id it did not report
                return Token(min(self._engine.eos_token_ids), "", None)
            raise self._poison(f"the stream ended unexpectedly ({item.finish!r})")

    def _open(self, sampling: SamplingConfig) -> None:
        eng = self._engine
        if sampling.greedy:
            seed = 0
        else:
            if self._seed_base is None or (sampling.seed is not None and sampling.seed != self._seed_base):
                self._seed_base = sampling.seed if sampling.seed is not None else random.getrandbits(63)
            seed = stream_seed(self._seed_base, self.position)
        n = min(self._window, eng.max_context - self.position)
        request = eng.stream_request(self._slot, list(self._ids), sampling, seed, n)
        self._stream = _Stream(eng, request, sampling, self.position)

    def _recover(self, tok: Token) -> Token:
        """The stream skipped `tok.lost` ids before `tok`: read them from the slot.

        The stream ends here and reopens after `tok`, so where streams open does
        not depend on timing, and the same seed gives the same reply.
        """
        stream, self._stream = self._stream, None
        stream.close()
        pos = self.position
        try:
            saved = self._engine.recover_ids(self._slot, stream.request, pos + tok.lost)
        except Exception as e:
            raise self._poison(f"could not recover {tok.lost} token id(s) the stream skipped: {e}") from e
        if len(saved) < pos + tok.lost or saved[:pos] != self._ids:
            raise self._poison("the server's slot does not hold this session's tokens")
        for t in saved[pos : pos + tok.lost]:
            self._ready.append(Token(t, "", None))
        self._ready.append(Token(tok.id, tok.text, tok.logprob, tok.top))
        return self._ready.popleft()

    def stop(self) -> None:
        self._stop.set()
        s = self._stream
        if s is not None:
            s.cancel()

    def pause(self) -> None:
        self._close_stream()  # a new stream at this position when decoding resumes
        self._window = FIRST_WINDOW

    def can_seek(self, pos: int) -> bool:
        if isinstance(pos, bool) or not isinstance(pos, int) or not 0 <= pos <= self.position:
            return False
        return not self._closed and self._poisoned is None

    def seek(self, pos: int) -> None:
        self._usable()
        if isinstance(pos, bool) or not isinstance(pos, int) or not 0 <= pos <= self.position:
            raise InvalidArgument(f"seek position {pos!r} is outside 0..{self.position}")
        self._stop.clear()
        if pos == self.position:
            return
        self._moved()
        del self._ids[pos:]
        self._next = None  # evaluated on demand: the next stream re-reads the last token anyway

    def reset(self) -> None:
        if self._closed:
            raise EngineError("this session is closed; create a new one")
        self._clear()

    def close(self) -> None:
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        self._close_stream()
        self._engine.release_slot(self._slot)

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    # -- optional capabilities (engines/base.py)

    def next_logprobs(self, k: int = 5) -> list[tuple[int, float]]:
        self._usable()
        if not self._ids:
            return []
        if self._ready:
            return [(i, lp) for i, _, lp in self._ready[0].top[:k]]
        if self._stream is not None:  # the next streamed token carries its distribution
            item = self._stream.next(threading.Event())
            if item is not None and item.token is not None and not item.token.lost:
                return [(i, lp) for i, _, lp in item.token.top[:k]]
            self._close_stream()
        if self._next is None or len(self._next.top) < k:
            self._evaluate(self._ids, k)
        return [(i, lp) for i, _, lp in self._next.top[:k]]

    def top_logprobs(self, k: int = 5) -> list[tuple[int, str, float]]:
        return [] if self._last is None else list(self._last.top[:k])

    def logprob(self, token_id: int) -> float | None:
        last = self._last
        if last is None:
            return None
        if token_id == last.id and last.logprob is not None:
            return last.logprob
        return next((lp for i, _, lp in last.top if i == token_id), None)

    def fork(self) -> "CompletionSession":
        self._usable()
        eng = self._engine
        other = eng.create_session()
        try:
            self._close_stream()  # the slot must be idle to be copied
            if self._ids:
                eng.copy_slot(self._slot, other._slot)
        except BaseException:
            other.close()
            raise
        other._ids = list(self._ids)
        other._next = self._next
        return other
