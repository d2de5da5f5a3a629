"""transformers causal LMs behind the Engine / Session contract.

Knows nothing of Gradio or of conversations. One forward per prefill or
decode step, on a cache owned by the session (`HFTextEngine.new_cache`); the
weights are shared and forwards on them are serialised by the engine's lock.

Differences from the contract: none. With `compile=True` the cache is a
fixed-size `StaticCache` and seek still works (the contract allows a static cache
to refuse it; this one need not). Extras: `top_logprobs(k)`; `fork()` copies
the cache; `decode_batch` forwards sessions at one position together (`batch.py`).
Threads and weight layout on CPU are `cpu_tuning`'s (its names are re-exported here).
"""

from __future__ import annotations

import hashlib
import random
import sys
import threading
from dataclasses import dataclass, field
from typing import Sequence

import torch

from . import kv
from .attention import use_sdpa_gqa
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
    ServingCapacity,
    Session,
    SessionPoisoned,
    check_inputs,
    framed,
)
from .chat import render_messages
from .compiled import CompiledStep, refusal
from .cpu_tuning import DECODE_THREADS_ENV, GEMV_LAYOUT_ENV, decode_threads, use_gemv_layout, use_threads  # noqa: F401
from .detok import StreamDecoder
from .sampling import build_processors, sample_token

# A decode step waiting for the engine's lock looks for a stop request this often.
STOP_POLL_S = 0.02

@dataclass
class Prepared:
    """Inputs turned into ids (media expanded), plus what the forward needs
    besides ids (processor features) and the media blocks' [start, end) offsets."""

    ids: list[int]
    extras: dict = field(default_factory=dict)
    media_spans: list[tuple[int, int]] = field(default_factory=list)


class HFTextEngine(Engine):
    """A transformers causal LM and its tokenizer, on one device and dtype."""

    session_class: type = None  # set below
    backend = "transformers"

    def __init__(
        self,
        model,
        tokenizer,
        *,
        name: str,
        max_context: int | None = None,
        max_sessions: int = 4,
        chat_template: str | None = None,
        num_threads: int | None = None,
        compile: bool = False,
    ):
        if not isinstance(max_sessions, int) or max_sessions < 1:
            raise InvalidArgument(f"max_sessions must be an int >= 1, got {max_sessions!r}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.device = model.device
        self.dtype = model.dtype
        self.chat_template = chat_template or getattr(tokenizer, "chat_template", None)
        self.num_threads = num_threads or torch.get_num_threads()
        text_cfg = model.config.get_text_config()
        limit = getattr(text_cfg, "max_position_embeddings", None) or 2048
        if max_context is not None:
            if not isinstance(max_context, int) or max_context < 2:
                raise InvalidArgument(f"max_context must be an int >= 2, got {max_context!r}")
            limit = min(limit, max_context)
        self.max_context = limit
        self.vocab_size = model.get_input_embeddings().num_embeddings
        self.eos_token_ids = frozenset(_eos_ids(model, tokenizer))
        self.bos_token_id = _first(getattr(tokenizer, "bos_token_id", None), getattr(text_cfg, "bos_token_id", None))
        self.modalities = frozenset({"text", "tokens"})
        kv_per_token = _kv_bytes_per_token(text_cfg, self.dtype)
        self.capacity = ServingCapacity(max_sessions, limit, kv_per_token, kv_per_token * limit)
        self.lock = threading.Lock()  # serialises forwards on the shared weights
        use_gemv_layout(self)  # at load: the engine never changes after it
        use_sdpa_gqa(model)
        self.compiled = self._compiled_step(compile)
        self._slots = threading.BoundedSemaphore(max_sessions)
        self._open = 0
        self._open_lock = threading.Lock()
        self._fingerprint = None

    def _compiled_step(self, compile) -> CompiledStep | None:
        if not isinstance(compile, bool):
            raise InvalidArgument(f"compile must be True or False, got {compile!r}")
        if not compile:
            return None
        why = refusal(self.model)
        if why:
            raise InvalidArgument(
                f"compile=True needs a text model with full attention on every layer, "
                f"and {self.name} cannot: {why}; load it with compile=False"
            )
        step = CompiledStep(self.model, self.max_context)
        print(f"compile=True: each session's KV cache is allocated whole, {self.max_context} tokens, "
              f"{self.capacity.estimated_bytes_per_session / 2**20:.0f} MiB; --max-context caps it",
              file=sys.stderr)
        with self.lock:
            step.warm_up(decode_threads(self))
        return step

    # -- sessions

    def create_session(self) -> "HFTextSession":
        if not self._slots.acquire(blocking=False):
            raise EngineError(
                f"busy: all {self.capacity.max_sessions} sessions of {self.name} are in use; "
                "close one or try again later"
            )
        with self._open_lock:
            self._open += 1
        return self.session_class(self)

    def _release(self) -> None:
        with self._open_lock:
            self._open -= 1
        self._slots.release()

    @property
    def open_sessions(self) -> int:
        return self._open

    def decode_batch(self, sessions, samplings):
        """Sessions at one position step in one forward (`batch.py`); others in turn."""
        from .batch import decode_batch

        if len(sessions) != len(samplings):
            raise InvalidArgument(f"{len(sessions)} sessions but {len(samplings)} sampling configs")
        return decode_batch(self, sessions, samplings)

    # -- planning helpers (no model needed)

    def render(self, messages, add_generation_prompt=True, chat_template=None):
        template = chat_template or self.chat_template
        if not template:
            raise NotSupported(
                f"{self.name} has no chat template; pass chat_template= or prefill raw text"
            )
        return render_messages(self.tokenizer, messages, add_generation_prompt, template, self.modalities)

    def tokenize(self, inputs: Sequence[MultimodalInput]) -> list[int]:
        return self.prepare(inputs).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            backend = getattr(self.tokenizer, "backend_tokenizer", None)
            blob = backend.to_str() if backend is not None else repr(sorted(self.tokenizer.get_vocab().items()))
            self._fingerprint = hashlib.sha256(blob.encode()).hexdigest()[:16]
        return self._fingerprint

    def prepare(self, inputs: Sequence[MultimodalInput]) -> Prepared:
        """Validate inputs and turn them into ids. Raises before any state changes."""
        inputs = check_inputs(inputs)
        ids: list[int] = []
        for i, inp in enumerate(inputs):
            if inp.kind not in self.modalities:
                raise NotSupported(
                    f"input {i} is {inp.kind}, but {self.name} takes only "
                    f"{', '.join(sorted(self.modalities))}"
                )
            if inp.kind == "text":
                ids.extend(self.tokenizer.encode(inp.value, add_special_tokens=False))
            else:
                bad = [t for t in inp.value if t >= self.vocab_size]
                if bad:
                    raise InvalidArgument(
                        f"input {i} has token id {bad[0]}, outside the vocabulary of {self.vocab_size}"
                    )
                ids.extend(inp.value)
        return Prepared(ids)

    # -- the model (called with self.lock held)

    def new_cache(self):
        """An empty cache for one session: fixed-size when compiled, else growing."""
        return self.compiled.new_cache() if self.compiled else kv.new_cache(self.model.config)

    def forward(self, ids: list[int], cache, extras: dict, session) -> torch.Tensor:
        """One forward of `ids` on `cache`; returns the last position's logits."""
        if self.compiled and len(ids) == 1 and not extras:
            return self.compiled(ids[0], cache)  # sets the threads it was compiled for
        use_threads(self, len(ids))
        input_ids = torch.tensor([ids], dtype=torch.long, device=self.device)
        out = self.model(input_ids=input_ids, past_key_values=cache, use_cache=True, logits_to_keep=1, **extras)
        return out.logits[0, -1]


class HFTextSession(Session):
    """One conversation on an `HFTextEngine`."""

    def __init__(self, engine: HFTextEngine):
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

    def _run(self, ids: list[int], extras: dict, stoppable: bool = False) -> bool:
        """Forward `ids` and make them resident. A failure here poisons the session.

        `stoppable` (a decode step): a stop request that comes while this session
        waits for the engine's lock, behind other sessions' forwards, ends the wait;
        nothing is forwarded and it returns False."""
        if self._batch is not None and self._batch.collecting:
            return self._batch.defer(self, ids)  # forwarded with the group's other rows
        eng = self._engine
        if stoppable:
            if not self._lock_unless_stopped(eng.lock):
                return False
        else:
            eng.lock.acquire()
        try:
            with torch.inference_mode():
                if self._cache is None:
                    self._cache = eng.new_cache()
                    self._on_new_cache()
                logits = eng.forward(ids, self._cache, extras, self)
        except BaseException as e:  # an interrupt mid-forward leaves the cache half-updated too
            self._poisoned = e
            if not isinstance(e, Exception):
                raise
            raise SessionPoisoned(f"forward pass failed: {e!r}; call reset() to use this session again") from e
        finally:
            eng.lock.release()
        self._ids.extend(ids)
        self._logits = logits
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

    def _on_new_cache(self) -> None:
        """Hook: per-conversation model state starts afresh with the cache."""

    # -- the contract

    def prefill(self, inputs, num_bos=0, num_eos=0) -> int:
        self._usable()
        prep = self._engine.prepare(inputs)
        ids, n_bos = framed(self._engine, self.position, prep.ids, num_bos, num_eos)
        self._stop.clear()
        start = self.position + n_bos
        self._run(ids, prep.extras)
        self._media_spans.extend((start + a, start + b) for a, b in prep.media_spans)
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

    def can_seek(self, pos: int) -> bool:
        if isinstance(pos, bool) or not isinstance(pos, int) or not 0 <= pos <= self.position:
            return False
        if self._closed or self._poisoned is not None:
            return False
        if pos == self.position or pos == 0:
            return True
        if any(a < pos < b for a, b in self._media_spans):
            return False
        return pos - 1 >= kv.seek_floor(self._cache)

    def seek(self, pos: int) -> None:
        self._usable()
        if isinstance(pos, bool) or not isinstance(pos, int) or not 0 <= pos <= self.position:
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
        # Crop to pos - 1 and re-run the last kept token to get its logits back.
        last = self._ids[pos - 1]
        del self._ids[pos - 1 :]
        self._media_spans = [s for s in self._media_spans if s[1] <= pos - 1]
        try:
            kv.crop_to(self._cache, pos - 1)
        except BaseException as e:
            self._poisoned = e
            raise SessionPoisoned(f"cache crop failed: {e!r}; call reset()") from e
        self._run([last], {})
        self._after_move()

    def _after_move(self) -> None:
        self._seed = None
        self._detok = None
        self._last_logits = None

    def reset(self) -> None:
        if self._closed:
            raise EngineError("this session is closed; create a new one")
        self._clear()

    def fork(self) -> "HFTextSession":
        """A copy of this session's cache, ids and pending logits in a new session
        (about 5 ms per 1,000 cached tokens of SmolLM2 here, against a prefill)."""
        self._usable()
        new = self._engine.create_session()  # takes a capacity slot, or raises "busy"
        try:
            with torch.inference_mode():
                self._copy_into(new)
        except BaseException:
            new.close()
            raise
        return new

    def _copy_into(self, new: "HFTextSession") -> None:
        """Hook: copy per-conversation state into a fresh session of the same engine."""
        new._ids = list(self._ids)
        new._cache = None if self._cache is None else kv.copy_cache(self._cache)
        new._logits = None if self._logits is None else self._logits.clone()
        new._media_spans = list(self._media_spans)

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


HFTextEngine.session_class = HFTextSession


# --------------------------------------------------------------------------- helpers

def _first(*values):
    return next((v for v in values if v is not None), None)


def _eos_ids(model, tokenizer) -> list[int]:
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None)
    if eos is None:
        eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        return []
    return [eos] if isinstance(eos, int) else list(eos)


def _kv_bytes_per_token(cfg, dtype) -> int:
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    itemsize = torch.empty(0, dtype=dtype).element_size()
    return 2 * cfg.num_hidden_layers * kv_heads * head_dim * itemsize
