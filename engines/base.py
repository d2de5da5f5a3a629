"""The Engine / Session contract: a Python port of ExecuTorch's LLM runner.

This module knows nothing of torch, transformers or Gradio. It defines the
values that cross the boundary and states every invariant once; adapters
(`hf_text`, `hf_multimodal`) obey them and only document where they differ.

Lifetimes, as in llama.cpp: an `Engine` is the loaded model and never changes
after load; a `Session` is one conversation's state (KV cache, resident ids,
pending next-token logits, stop request); a `SamplingConfig` is per call.
"""

from __future__ import annotations

import abc
import hashlib
import math
import os
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

# --------------------------------------------------------------------------- errors


class EngineError(RuntimeError):
    """Base class of every error the contract raises."""


class Busy(EngineError):
    """No room for another session: raised by `Engine.create_session` and `Session.fork`
    at `capacity.max_sessions`. Nothing changed; try again once a session closes. Still an
    `EngineError`, and its message still starts with "busy", for callers that predate it."""


class InvalidArgument(EngineError, ValueError):
    """An argument is out of range or of the wrong type. Nothing changed."""


class NotSupported(EngineError):
    """The engine cannot do this (a modality, a seek below a floor). Nothing changed."""


class ContextFull(EngineError):
    """The request does not fit in the context window. Nothing changed."""


class SessionPoisoned(EngineError):
    """A forward pass failed midway; only `reset()` or `close()` are allowed."""


# --------------------------------------------------------------------------- values

KINDS = ("text", "tokens", "image", "audio")


@dataclass(frozen=True, eq=False)
class MultimodalInput:
    """One piece of model input: text, token ids, an image or audio.

    Build it with the constructors; they validate. `value` is a str for text,
    a tuple of ints for tokens, a PIL image / path / bytes for images and a
    float32 numpy waveform (1-D or (channels, samples)) or a path for audio.
    Equality and hashing use `key()`, so two inputs are equal exactly when
    their content is (media by a content hash, never by object identity).
    """

    kind: str
    value: Any
    sample_rate: int | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise InvalidArgument(f"input kind {self.kind!r} is not one of {', '.join(KINDS)}")

    @staticmethod
    def text(text: str) -> "MultimodalInput":
        if not isinstance(text, str):
            raise InvalidArgument(f"text input must be a str, got {type(text).__name__}")
        return MultimodalInput("text", text)

    @staticmethod
    def tokens(ids: Iterable[int]) -> "MultimodalInput":
        try:
            ids = tuple(ids)
        except TypeError:
            raise InvalidArgument(f"tokens input must be a list of ints, got {type(ids).__name__}") from None
        for t in ids:
            if isinstance(t, bool) or not isinstance(t, int) or t < 0:
                raise InvalidArgument(f"tokens input must hold non-negative ints, got {t!r}")
        return MultimodalInput("tokens", ids)

    @staticmethod
    def image(image: Any) -> "MultimodalInput":
        """`image`: a PIL image, a path (str or os.PathLike) or encoded bytes."""
        ok = isinstance(image, (str, os.PathLike, bytes, bytearray)) or _is_pil(image)
        if not ok:
            raise InvalidArgument(
                f"image input must be a PIL image, a path or bytes, got {type(image).__name__}"
            )
        if isinstance(image, bytearray):
            image = bytes(image)
        return MultimodalInput("image", image)

    @staticmethod
    def audio(audio: Any, sample_rate: int | None = None) -> "MultimodalInput":
        """`audio`: a float32 numpy waveform (1-D or (channels, samples)) with its
        `sample_rate`, or a path to a sound file (its rate is read from the file)."""
        if isinstance(audio, (str, os.PathLike, bytes)):
            return MultimodalInput("audio", audio, sample_rate)
        shape = getattr(audio, "shape", None)
        if shape is None or getattr(audio, "dtype", None) is None:
            raise InvalidArgument(
                f"audio input must be a numpy waveform or a path, got {type(audio).__name__}"
            )
        if len(shape) not in (1, 2):
            raise InvalidArgument(f"audio waveform must be 1-D or (channels, samples), got shape {tuple(shape)}")
        if sample_rate is None or isinstance(sample_rate, bool) or not isinstance(sample_rate, int) or sample_rate <= 0:
            raise InvalidArgument(f"a waveform needs a positive int sample_rate, got {sample_rate!r}")
        return MultimodalInput("audio", audio, sample_rate)

    def key(self) -> tuple:
        """Content identity: the text, the ids, or a hash of the media bytes."""
        if self.kind in ("text", "tokens"):
            return (self.kind, self.value)
        return (self.kind, media_digest(self.value), self.sample_rate)

    def __eq__(self, other):
        return isinstance(other, MultimodalInput) and self.key() == other.key()

    def __hash__(self):
        return hash(self.key())

    def __repr__(self):
        if self.kind == "text":
            v = self.value if len(self.value) < 40 else self.value[:37] + "..."
            return f"MultimodalInput.text({v!r})"
        if self.kind == "tokens":
            return f"MultimodalInput.tokens(<{len(self.value)} ids>)"
        return f"MultimodalInput.{self.kind}(<{media_digest(self.value)[:12]}>)"


def _is_pil(x) -> bool:
    return type(x).__module__.startswith("PIL.") and hasattr(x, "tobytes")


def media_digest(value) -> str:
    """A content hash of an image or audio value (pixels, samples or file bytes)."""
    h = hashlib.sha256()
    if isinstance(value, (bytes, bytearray)):
        h.update(value)
    elif isinstance(value, (str, os.PathLike)):
        try:
            with open(value, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
        except OSError:
            h.update(os.fsencode(value))  # unreadable: the adapter reports it at prefill
    elif _is_pil(value):
        h.update(f"{value.mode}{value.size}".encode())
        h.update(value.tobytes())
    else:  # numpy waveform
        h.update(f"{value.dtype}{value.shape}".encode())
        h.update(memoryview(value.tobytes()))
    return h.hexdigest()


@dataclass(frozen=True)
class SamplingConfig:
    """How to pick the next token. Temperature 0 is greedy.

    `seed` seeds the session's own generator (see `Session.decode_one`);
    None means a fresh random seed. How many tokens to make is the caller's
    loop, not a sampling setting.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        def num(name, v):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise InvalidArgument(f"{name} must be a finite number, got {v!r}")

        num("temperature", self.temperature)
        num("top_p", self.top_p)
        num("repetition_penalty", self.repetition_penalty)
        if self.temperature < 0:
            raise InvalidArgument(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InvalidArgument(f"top_p must be in (0, 1], got {self.top_p}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise InvalidArgument(f"top_k must be an int >= 0 (0 = off), got {self.top_k!r}")
        if self.repetition_penalty <= 0:
            raise InvalidArgument(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63
        ):
            raise InvalidArgument(f"seed must be an int in 0..2**63-1 or None, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def to_dict(self) -> dict:
        return {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "repetition_penalty": self.repetition_penalty,
            "seed": self.seed,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "SamplingConfig":
        if not isinstance(d, dict):
            raise InvalidArgument(f"sampling must be a dict, got {type(d).__name__}")
        unknown = set(d) - {"temperature", "top_p", "top_k", "repetition_penalty", "seed"}
        if unknown:
            raise InvalidArgument(f"unknown sampling keys: {sorted(unknown)}")
        return cls(**d)


@dataclass(frozen=True)
class DecodeResult:
    """One decode step. EOS: `(id, "", True, True)`; stop: `(0, "", False, True)`."""

    token_id: int
    text_piece: str
    is_eos: bool
    is_terminal: bool


@dataclass(frozen=True)
class ServingCapacity:
    """What one engine can serve. `estimated_bytes_per_session` is the KV at full context."""

    max_sessions: int
    max_context_len: int
    kv_bytes_per_token: int
    estimated_bytes_per_session: int


STOP_RESULT = DecodeResult(0, "", False, True)


# --------------------------------------------------------------------------- contract


class Session(abc.ABC):
    """One conversation's state on an engine.

    Invariants every adapter keeps:
    - `position == len(tokens)`; `tokens` are the resident ids, media expanded.
    - Validation failures (bad input, `ContextFull` found up front, seek out of
      range) raise before anything changes: the session is exactly as before.
    - A failure after state began to change (inside a forward pass) poisons the
      session: every call but `reset()` / `close()` raises `SessionPoisoned`.
      Other sessions are never affected.
    - `stop()` may be called from any thread. It only records a request. The
      next `decode_one` returns `DecodeResult(0, "", False, True)` without
      advancing and consumes the request. `prefill`, `seek` (even to the current
      position) and `reset` clear a pending request.
    """

    @property
    @abc.abstractmethod
    def tokens(self) -> list[int]:
        """A copy of the resident ids."""

    @property
    def position(self) -> int:
        return len(self.tokens)

    @abc.abstractmethod
    def prefill(self, inputs: Sequence[MultimodalInput], num_bos: int = 0, num_eos: int = 0) -> int:
        """Make `inputs` resident and return the greedy argmax of the new logits.

        Each text input is tokenized on its own, without special tokens.
        `num_bos` BOS ids go in front only at position 0; `num_eos` EOS ids go
        after the last input. The next `decode_one` samples from the same logits.
        Raises `InvalidArgument` (empty list, empty text, bad ids), `NotSupported`
        (a modality the engine lacks) or `ContextFull`, all before any change.
        """

    @abc.abstractmethod
    def decode_one(self, sampling: SamplingConfig) -> DecodeResult:
        """Sample one token `t` from the pending logits.

        EOS: returns `(t, "", True, True)`; `t` is not made resident (the final
        sampled token is never fed through the model). Otherwise forwards `t`
        (position + 1) and returns `(t, piece, False, False)`. `piece` is valid
        text: bytes of an unfinished character are held back until it completes.
        A pending stop request gives `(0, "", False, True)` and no change.
        The session's generator is seeded from `sampling.seed` on the first
        decode after a prefill, a seek that moves the position, or reset, and
        whenever the seed changes; later steps continue the same random stream.
        Raises `InvalidArgument` when nothing is resident and `ContextFull` when
        the context has no room for `t`, both before any change.
        """

    @abc.abstractmethod
    def stop(self) -> None:
        """Request that the next `decode_one` end the stream. Thread-safe.

        A `decode_one` already running may end with the terminal step too, when
        the request comes before its forward starts (while it waits for other
        sessions' forwards): a stop never waits behind other conversations."""

    @abc.abstractmethod
    def can_seek(self, pos: int) -> bool:
        """Whether `seek(pos)` would succeed (range, sliding-window floor, media block)."""

    @abc.abstractmethod
    def seek(self, pos: int) -> None:
        """Rewind to `pos` (0 <= pos <= position), restoring the pending logits.

        Afterwards greedy decoding equals a fresh session prefilled with
        `tokens[:pos]`; logits agree within a small tolerance (chunked prefill
        is not bitwise equal to one prefill). Out of range: `InvalidArgument`.
        Below a floor or inside a media block: `NotSupported`; callers then
        `reset()` and prefill again.
        """

    @abc.abstractmethod
    def reset(self) -> None:
        """Empty the session (and clear poison). Keeps its capacity slot."""

    @abc.abstractmethod
    def close(self) -> None:
        """Free the session and its capacity slot. Idempotent."""

    # Optional capabilities. A caller checks for NotSupported (or None) and does
    # without: the conversation then shows tokens without probabilities, and the
    # contract suite compares greedy tokens instead of distributions.

    def top_logprobs(self, k: int = 5) -> list[tuple[int, str, float]]:
        """Optional: the top `k` (id, text, logprob) of the last decode step's
        distribution, before sampling settings; [] before any step. Serving
        engines report only the top few (their `top_k_logprobs`)."""
        raise NotSupported(f"{type(self).__name__} does not report token probabilities")

    def logprob(self, token_id: int) -> float | None:
        """Optional: the log-probability of `token_id` in the last decode step's
        distribution; None when unknown (no step yet, or outside what is reported)."""
        return None

    def next_logprobs(self, k: int = 5) -> list[tuple[int, float]]:
        """Optional: the top `k` (id, logprob) of the pending next-token
        distribution, the one the next `decode_one` samples from, best first;
        [] when nothing is resident. It never changes the session's state.
        The contract suite's oracle: after seek, it agrees with a fresh session's."""
        raise NotSupported(f"{type(self).__name__} does not report its pending distribution")

    def pause(self) -> None:
        """Optional hint: no `decode_one` is coming soon (a reply ended at its
        token budget or at a stop string). An engine that computes ahead of the
        reader (a completion stream) stops and drops what it computed ahead.
        Nothing resident changes; the next `decode_one` samples as after a stop
        (llama.cpp: a new random stream, seeded from (seed, position)). A caller
        that steps one token per action skips it, to keep one stream. Default:
        nothing to do."""

    def fork(self) -> "Session":
        """Optional: a new, independent session with the same resident tokens and
        the same pending logits, made at the cost the engine allows (a cache copy)
        instead of a prefill. For sampling several replies from one prompt.

        - Afterwards the two sessions share nothing: each decodes, seeks, resets
          and closes on its own, and neither sees the other's tokens. Greedy
          decoding on the fork equals greedy decoding on the original.
        - The fork's first `decode_one` seeds its generator from `sampling.seed`,
          as after a prefill. A pending stop request is not copied.
        - A fork holds a capacity slot, like `Engine.create_session`: with no room
          it raises `Busy`, and nothing changes.
        - Raises `NotSupported` where the engine cannot copy a session (the
          default); callers then create a session and prefill `tokens` again.
        - A poisoned or closed session raises as any other call would.
        """
        raise NotSupported(f"{type(self).__name__} cannot fork; create a session and prefill its tokens instead")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Engine(abc.ABC):
    """Loaded weights plus tokenizer or processor, device and dtype.

    An engine never mutates after load; per-conversation state lives in its
    sessions. `create_session()` is cheap, never copies weights, and raises
    `Busy` beyond `capacity.max_sessions` open sessions.
    """

    name: str
    backend: str = ""  # "transformers", "llama.cpp", "llama-server", "vllm", "sglang"
    modalities: frozenset
    capacity: ServingCapacity
    eos_token_ids: frozenset

    @abc.abstractmethod
    def create_session(self) -> Session: ...

    @abc.abstractmethod
    def render(
        self, messages: list[dict], add_generation_prompt: bool = True, chat_template: str | None = None
    ) -> list[MultimodalInput]:
        """Apply the chat template. Media stay media inputs; an assistant message
        with "token_ids" is spliced in as those exact ids (a tokens input)."""

    @abc.abstractmethod
    def tokenize(self, inputs: Sequence[MultimodalInput]) -> list[int]:
        """Exactly the ids `prefill(inputs)` would make resident (media expanded)."""

    @abc.abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`, special tokens included (for display)."""

    @property
    def fingerprint(self) -> str:
        """Identifies the tokenizer, so exported token ids are only trusted on a match."""
        return ""

    @property
    def open_sessions(self) -> int:
        return 0

    def decode_batch(self, sessions: Sequence[Session], samplings: Sequence[SamplingConfig]) -> list[DecodeResult]:
        """Optional speed-up: one `decode_one(samplings[i])` on each of `sessions`
        (sessions of this engine), returned in order.

        The default steps them in turn. An engine that can forward several
        sessions in one batch overrides it; each result and each session's state
        then equal what its own `decode_one` gives, except that a batched forward
        may round differently (logits agree within the seek tolerance). A stop
        request ends only its own session's step. Errors are those of
        `decode_one`; sessions before the failing one may have advanced.
        """
        if len(sessions) != len(samplings):
            raise InvalidArgument(f"{len(sessions)} sessions but {len(samplings)} sampling configs")
        return [s.decode_one(c) for s, c in zip(sessions, samplings)]


# --------------------------------------------------------------------------- helpers adapters share


def check_inputs(inputs) -> list[MultimodalInput]:
    """Validate a prefill's `inputs` (a non-empty list of MultimodalInput, no empty text or ids)."""
    if isinstance(inputs, MultimodalInput) or not isinstance(inputs, (list, tuple)):
        raise InvalidArgument(f"inputs must be a list of MultimodalInput, got {type(inputs).__name__}")
    if not inputs:
        raise InvalidArgument("inputs is empty: give at least one MultimodalInput")
    for i, inp in enumerate(inputs):
        if not isinstance(inp, MultimodalInput):
            raise InvalidArgument(f"input {i} is a {type(inp).__name__}, not a MultimodalInput")
        if inp.kind in ("text", "tokens") and len(inp.value) == 0:
            raise InvalidArgument(f"input {i} is empty {inp.kind}")
    return list(inputs)


def framed(engine, position: int, ids: list[int], num_bos, num_eos) -> tuple[list[int], int]:
    """`ids` with prefill's BOS/EOS framing, and how many BOS ids lead; raises
    `InvalidArgument` / `ContextFull` (the contract's `prefill` rules) before any change."""
    for name, n in (("num_bos", num_bos), ("num_eos", num_eos)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise InvalidArgument(f"{name} must be an int >= 0, got {n!r}")
    head = []
    if num_bos and position == 0:
        if getattr(engine, "bos_token_id", None) is None:
            raise InvalidArgument(f"num_bos={num_bos}, but {engine.name} has no BOS token")
        head = [engine.bos_token_id] * num_bos
    tail = []
    if num_eos:
        if not engine.eos_token_ids:
            raise InvalidArgument(f"num_eos={num_eos}, but {engine.name} has no EOS token")
        tail = [min(engine.eos_token_ids)] * num_eos
    out = head + list(ids) + tail
    limit = engine.capacity.max_context_len
    if position + len(out) > limit:
        raise ContextFull(f"position {position} + {len(out)} new tokens exceeds the context of {limit}")
    return out, len(head)
