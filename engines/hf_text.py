"""transformers causal LMs behind the Engine / Session contract.

Knows nothing of Gradio or of conversations. The engine holds the weights and
the tokenizer, turns inputs into ids, and runs one forward per prefill or
decode step on a cache owned by the session; forwards on the shared weights
are serialised by the engine's lock. The session is `hf_session.HFSession`,
shared with `hf_multimodal`; CPU threads and weight layout are `cpu_tuning`'s
(their names are re-exported here).

Differences from the contract: none. With `compile=True` the cache is a
fixed-size `StaticCache` and seek still works (the contract allows a static cache
to refuse it; this one need not). Extras: `top_logprobs(k)`; `fork()` copies
the cache; `decode_batch` forwards sessions at one position together (`batch.py`).
"""

from __future__ import annotations

import hashlib
import sys
import threading
from typing import Sequence

import torch

from . import kv
from .attention import use_sdpa_gqa
from .batch import decode_batch
from .base import Busy, Engine, InvalidArgument, MultimodalInput, NotSupported, ServingCapacity, check_inputs
from .chat import render_messages
from .compiled import CompiledStep, why_not_compilable
from .cpu_tuning import DECODE_THREADS_ENV, GEMV_LAYOUT_ENV, decode_threads, use_gemv_layout, use_threads  # noqa: F401
from .hf_session import STOP_POLL_S, HFSession, Prepared  # noqa: F401 (STOP_POLL_S: re-exported)


class HFTextEngine(Engine):
    """A transformers causal LM and its tokenizer, on one device and dtype."""

    backend = "transformers"
    batchable = True  # sessions at one position may decode in one batched forward (batch.py)

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
        self.chat_tokenizer = tokenizer  # what `render` applies the chat template with
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
        kv_per_token = kv.bytes_per_token(text_cfg, self.dtype)
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
        why = why_not_compilable(self.model)
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

    def create_session(self) -> HFSession:
        if not self._slots.acquire(blocking=False):
            raise Busy(
                f"busy: all {self.capacity.max_sessions} sessions of {self.name} are in use; "
                "close one or try again later"
            )
        with self._open_lock:
            self._open += 1
        return HFSession(self)

    def _release(self) -> None:
        with self._open_lock:
            self._open -= 1
        self._slots.release()

    @property
    def open_sessions(self) -> int:
        return self._open

    def decode_batch(self, sessions, samplings):
        """Sessions at one position step in one forward (`batch.py`); others in turn."""
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
        return render_messages(self.chat_tokenizer, messages, add_generation_prompt, template, self.modalities)

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
        ids: list[int] = []
        for i, inp in enumerate(check_inputs(inputs)):
            ids.extend(self._text_ids(inp, i))
        return Prepared(ids)

    def _text_ids(self, inp: MultimodalInput, index: int) -> Sequence[int]:
        """The ids of input `index`, a text or tokens input. Raises `NotSupported` for a
        kind this engine does not take, `InvalidArgument` for an id outside the vocabulary."""
        if inp.kind not in self.modalities:
            raise NotSupported(
                f"input {index} is {inp.kind}, but {self.name} takes only "
                f"{', '.join(sorted(self.modalities))}"
            )
        if inp.kind == "text":
            return self.tokenizer.encode(inp.value, add_special_tokens=False)
        bad = [t for t in inp.value if t >= self.vocab_size]
        if bad:
            raise InvalidArgument(f"input {index} has token id {bad[0]}, outside the vocabulary of {self.vocab_size}")
        return inp.value

    def new_model_state(self):
        """Per-conversation state the model would keep on its shared object; a plain
        causal LM keeps none (see `HFMultimodalEngine`)."""
        return None

    # -- the model (called with self.lock held)

    def new_cache(self):
        """An empty cache for one session: fixed-size when compiled, else growing."""
        return self.compiled.new_cache() if self.compiled else kv.new_cache(self.model.config)

    def forward(self, ids: list[int], cache, extras: dict) -> torch.Tensor:
        """One forward of `ids` on `cache`; returns the last position's logits."""
        if self.compiled and len(ids) == 1 and not extras:
            return self.compiled(ids[0], cache)  # sets the threads it was compiled for
        use_threads(self, len(ids))
        input_ids = torch.tensor([ids], dtype=torch.long, device=self.device)
        out = self.model(input_ids=input_ids, past_key_values=cache, use_cache=True, logits_to_keep=1, **extras)
        return out.logits[0, -1]


# The one session class of both HF adapters; the old name keeps working.
HFTextSession = HFSession


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
