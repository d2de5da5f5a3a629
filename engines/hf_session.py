"""One conversation on a transformers engine: the session both HF adapters share.

Knows nothing of Gradio, conversations, tokenizers or processors. What differs
between models comes from the engine, its strategy:
- `engine.prepare(inputs)`: ids, features and media blocks (`Prepared`);
- `engine.new_cache()` and `engine.forward(...)`, run under `engine.lock`;
- `engine.new_model_state()`: per-conversation state a model would otherwise
  keep on its shared object (Qwen2-VL's M-RoPE positions), or None.
The session owns everything that changes: ids, cache, pending logits, media
blocks, the stop request and the poison.
"""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass, field

import torch

from . import kv
from .base import (
    STOP_RESULT,
    ContextFull,
    DecodeResult,
    EngineError,
    InvalidArgument,
    NotSupported,
    SamplingConfig,
    Session,
    SessionPoisoned,
    framed,
)
from .detok import StreamDecoder
from .sampling import build_processors, sample_token

# A decode step waiting for the engine's lock looks for a stop request this often.
STOP_POLL_S = 0.02


@dataclass
class Prepared:
    """Inputs turned into ids (media expanded), plus what the forward needs
    besides ids (processor features), the media blocks' [start, end) offsets and
    each block's own (ids, features), so a seek to a block's end can re-run it."""

    ids: list[int]
    extras: dict = field(default_factory=dict)
    media_spans: list[tuple[int, int]] = field(default_factory=list)
    blocks: list[tuple[list[int], dict]] = field(default_factory=list)


class HFSession(Session):
    """One conversation on an `HFTextEngine` or an `HFMultimodalEngine`."""

    def __init__(self, engine):
        self._engine = engine
        self._stop = threading.Event()
        self._closed = False
        self._close_lock = threading.Lock()
        self._generator = torch.Generator(device=engine.device)
        self._processors = (None, None)  # (config, processors) memo
        self._logp_memo = (None, None)  # (logits, their log_softmax)
        self._batch = None  # a batch.BatchGroup holding this session's cache as one of its rows
        self._clear()

    def _clear(self) -> None:
        self._leave_batch(keep=False)
        self._ids: list[int] = []
        self._cache = None
        self._logits = None  # pending next-token logits
        self._last_logits = None  # what the last decode step sampled from
        self._media_spans: list[tuple[int, int]] = []
        self._blocks: dict[tuple[int, int], tuple[list[int], dict]] = {}  # span -> (ids, features)
        self._model_state = self._engine.new_model_state()
        self._poisoned: BaseException | None = None
        self._seed = None  # seed of the running random stream; None = reseed
        self._detok = None
        self._stop.clear()

    # -- state

    @property
    def tokens(self) -> list[int]:
        return list(self._ids)

    @property
    def position(self) -> int:
        return len(self._ids)

    @property
    def pending_logits(self):
        """The next-token logits `decode_one` will sample from (None before prefill)."""
        return self._logits

    @property
    def media_spans(self) -> list[tuple[int, int]]:
        """[start, end) of each media block in the resident ids."""
        return list(self._media_spans)

    @property
    def rope_deltas(self) -> int | None:
        """Qwen2-VL's per-conversation offset of positions from token indices (None for other models)."""
        state = self._model_state
        return None if state is None else state.rope_deltas(self.position)

    def _usable(self) -> None:
        if self._closed:
            raise EngineError("this session is closed; create a new one")
        if self._poisoned is not None:
            raise SessionPoisoned(
                f"this session is unusable after a failed forward pass ({self._poisoned!r}); call reset()"
            )
        if self._batch is not None and not self._batch.collecting:
            self._leave_batch()  # anything done alone needs its own cache back

    def _leave_batch(self, keep: bool = True) -> None:
        """Take this session's cache back from its batch group (a copy of its row when `keep`)."""
        if getattr(self, "_batch", None) is not None:
            self._batch.leave(self, keep)

    def _poison(self, error: BaseException, what: str) -> BaseException:
        """Mark the session unusable after `error` struck while its state was changing,
        and return what to raise: an interrupt (KeyboardInterrupt, SystemExit) as it is,
        anything else as `SessionPoisoned`."""
        self._poisoned = error
        if not isinstance(error, Exception):
            return error
        poisoned = SessionPoisoned(f"{what} failed: {error!r}; call reset() to use this session again")
        poisoned.__cause__ = error
        return poisoned

    def _run(self, ids: list[int], extras: dict, stoppable: bool = False) -> bool:
        """Forward `ids` and make them resident. A failure here poisons the session.

        `stoppable` (a decode step): a stop request that comes while this session
        waits for the engine's lock, behind other sessions' forwards, ends the wait;
        nothing is forwarded and it returns False."""
        if self._batch is not None and self._batch.collecting:
            return self._batch.defer(self, ids)  # forwarded with the group's other rows
        eng, state = self._engine, self._model_state
        if state is not None:
            extras = state.extras(self._ids, ids, extras)
        if stoppable:
            if not self._lock_unless_stopped(eng.lock):
                return False
        else:
            eng.lock.acquire()
        try:
            with torch.inference_mode():
                if self._cache is None:
                    self._cache = eng.new_cache()
                logits = eng.forward(ids, self._cache, extras)
        except BaseException as e:  # an interrupt mid-forward leaves the cache half-updated too
            raise self._poison(e, "forward pass")
        finally:
            eng.lock.release()
        self._ids.extend(ids)
        self._logits = logits
        if state is not None:
            state.advance()
        return True

    def _lock_unless_stopped(self, lock) -> bool:
        """Take `lock`, or give up (False) once a stop request is pending: Stop never
        waits behind other sessions' forwards, only behind this session's own."""
        while not lock.acquire(timeout=STOP_POLL_S):
            if self._stop.is_set():
                return False
        if self._stop.is_set():  # asked while waiting: do not forward
            lock.release()
            return False
        return True

    # -- the contract

    def prefill(self, inputs, num_bos=0, num_eos=0) -> int:
        self._usable()
        prep = self._engine.prepare(inputs)
        ids, n_bos = framed(self._engine, self.position, prep.ids, num_bos, num_eos)
        self._stop.clear()
        start = self.position + n_bos
        self._run(ids, prep.extras)
        for (a, b), block in zip(prep.media_spans, prep.blocks):  # kept for a later seek to its end
            self._media_spans.append((start + a, start + b))
            self._blocks[start + a, start + b] = block
        self._after_move()
        return int(self._logits.argmax())

    def decode_one(self, sampling: SamplingConfig) -> DecodeResult:
        self._usable()
        if not isinstance(sampling, SamplingConfig):
            raise InvalidArgument(f"sampling must be a SamplingConfig, got {type(sampling).__name__}")
        if self._stop.is_set():
            self._stop.clear()
            return STOP_RESULT
        if self._logits is None:
            raise InvalidArgument("nothing to decode from: prefill first")
        eng = self._engine
        if self.position >= eng.max_context:
            raise ContextFull(f"position {self.position} has reached the context of {eng.max_context}")
        self._seed_for(sampling)
        if self._processors[0] != sampling:
            self._processors = (sampling, build_processors(sampling))
        rng = None if sampling.greedy else self._generator.get_state()
        t = sample_token(self._logits, self._ids, sampling, self._processors[1], self._generator)
        last, self._last_logits = self._last_logits, self._logits
        if t in eng.eos_token_ids:
            return DecodeResult(t, "", True, True)
        if not self._run([t], {}, stoppable=True):  # stopped while other sessions forwarded
            self._stop.clear()  # the terminal step consumes the request, as above
            self._last_logits = last
            if rng is not None:  # as if `t` was never drawn: a continued reply replays from its seed
                self._generator.set_state(rng)
            return STOP_RESULT
        if self._detok is None:
            self._detok = StreamDecoder(eng.tokenizer, self._ids[:-1])
        return DecodeResult(t, self._detok.step(t), False, False)

    def _seed_for(self, sampling: SamplingConfig) -> None:
        if sampling.greedy:
            return
        if self._seed is None or (sampling.seed is not None and sampling.seed != self._seed):
            self._seed = sampling.seed if sampling.seed is not None else random.getrandbits(63)
            self._generator.manual_seed(self._seed)

    def stop(self) -> None:
        self._stop.set()

    def _in_range(self, pos) -> bool:
        return not isinstance(pos, bool) and isinstance(pos, int) and 0 <= pos <= self.position

    def can_seek(self, pos: int) -> bool:
        if not self._in_range(pos):
            return False
        if self._closed or self._poisoned is not None:
            return False
        if pos == self.position or pos == 0:
            return True
        if any(a < pos < b for a, b in self._media_spans):
            return False
        span = self._block_ending_at(pos)
        return (span[0] if span else pos - 1) >= kv.seek_floor(self._cache)

    def seek(self, pos: int) -> None:
        self._usable()
        if not self._in_range(pos):
            raise InvalidArgument(f"seek position {pos!r} is outside 0..{self.position}")
        if not self.can_seek(pos):
            inside = [s for s in self._media_spans if s[0] < pos < s[1]]
            why = (
                f"it is inside the media block at {inside[0][0]}..{inside[0][1]}"
                if inside
                else f"the sliding-window floor is {kv.seek_floor(self._cache) + 1}"
            )
            raise NotSupported(f"cannot seek to {pos}: {why}; reset() and prefill instead")
        self._stop.clear()
        if pos == self.position:
            return
        if pos == 0:
            self._clear()
            return
        # Crop below `pos` and re-run what gives its logits back: the last kept token, or,
        # at a media block's end, the whole block (its last id is a placeholder whose
        # embedding came from the features).
        span = self._block_ending_at(pos)
        if span:
            keep, (ids, extras) = span[0], self._blocks[span]
        else:
            keep, ids, extras = pos - 1, [self._ids[pos - 1]], {}
        del self._ids[keep:]
        self._media_spans = [s for s in self._media_spans if s[1] <= keep]
        try:
            kv.crop_to(self._cache, keep)
        except BaseException as e:
            raise self._poison(e, "cache crop")
        self._run(list(ids), extras)
        if span:
            self._media_spans.append(span)
        self._after_move()

    def _block_ending_at(self, pos: int) -> tuple[int, int] | None:
        if pos == self.position:
            return None
        return next((s for s in self._media_spans if s[1] == pos and s in self._blocks), None)

    def _after_move(self) -> None:
        self._seed = None
        self._detok = None
        self._last_logits = None

    def reset(self) -> None:
        if self._closed:
            raise EngineError("this session is closed; create a new one")
        self._clear()

    def fork(self) -> "HFSession":
        """A copy of this session's cache, ids and pending logits in a new session
        (about 5 ms per 1,000 cached tokens of SmolLM2 here, against a prefill)."""
        self._usable()
        new = self._engine.create_session()  # takes a capacity slot, or raises "busy"
        try:
            with torch.inference_mode():
                new._ids = list(self._ids)
                new._cache = None if self._cache is None else kv.copy_cache(self._cache)
                new._logits = None if self._logits is None else self._logits.clone()
                new._media_spans = list(self._media_spans)
                new._blocks = dict(self._blocks)  # features are never changed in place: shared
                new._model_state = None if self._model_state is None else self._model_state.copy()
        except BaseException:
            new.close()
            raise
        return new

    def close(self) -> None:
        with self._close_lock:  # close() and __del__ may race; the slot is given back once
            if self._closed:
                return
            self._closed = True
        self._leave_batch(keep=False)
        self._cache = None
        self._logits = self._last_logits = None
        self._engine._release()

    def __del__(self):
        # A session dropped without close() (a notebook re-running a cell) gives its slot back.
        try:
            self.close()
        except Exception:
            pass

    # -- log-probabilities (extras)

    def _last_logp(self):
        """log_softmax of the last step's logits, computed once per step."""
        logits = self._last_logits
        if logits is None:
            return None
        if self._logp_memo[0] is not logits:
            self._logp_memo = (logits, torch.log_softmax(logits.float(), dim=-1))
        return self._logp_memo[1]

    def top_logprobs(self, k: int = 5) -> list[tuple[int, str, float]]:
        logp = self._last_logp()
        if logp is None:
            return []
        vals, idx = logp.topk(k)
        return [(int(i), self._engine.decode([int(i)]), float(v)) for v, i in zip(vals, idx)]

    def next_logprobs(self, k: int = 5) -> list[tuple[int, float]]:
        self._usable()
        if self._logits is None:
            return []
        vals, idx = torch.log_softmax(self._logits.float(), dim=-1).topk(k)
        return [(int(i), float(v)) for v, i in zip(vals, idx)]

    def logprob(self, token_id: int) -> float | None:
        """Log-probability of `token_id` in the last decode step's distribution."""
        logp = self._last_logp()
        return None if logp is None else float(logp[token_id])
