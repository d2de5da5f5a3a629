"""Engines the shared contract suite runs over.

Each `EngineCase` gives an engine and prompts to prefill. The suite
(tests/test_contract.py) uses only what engines/base.py declares; the two
things no contract can declare, breaking a session's next request and
measuring its KV, are hooks here. Multimodal families register their tiny
models too, with prompts that carry media.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Callable

from engines import Engine, MultimodalInput as MI, load_engine


@dataclass
class EngineCase:
    id: str
    make_engine: Callable[[], Engine]  # cached by the fixture
    # Three different prompts (lists of inputs). prompts[0] and prompts[1] may
    # carry media; `suffix` is plain text appended in seek tests.
    prompts: Callable[[Engine], list[list[MI]]]
    atol: float = 1e-3  # log-probability tolerance: chunked prefill is not bitwise equal
    # break_session(engine, monkeypatch, session): make that session's next model call fail.
    break_session: Callable | None = None
    # kv_held(engine, session) -> (bytes the KV holds, tokens it was sized for).
    kv_held: Callable | None = None


def chat_prompts(engine: Engine) -> list[list[MI]]:
    questions = [
        "What is the capital of France?",
        "Write a haiku about the sea.",
        "List three colours of the rainbow.",
    ]
    return [engine.render([{"role": "user", "content": q}]) for q in questions]


def greedy_ids(session, n: int) -> list[int]:
    """Up to `n` greedy tokens from `session`, ending at EOS or a stop step."""
    from engines import SamplingConfig

    out = []
    for _ in range(n):
        r = session.decode_one(SamplingConfig())
        if r.is_terminal:
            break
        out.append(r.token_id)
    return out


@functools.lru_cache(maxsize=None)
def default_engine() -> Engine:
    """The real embedded default on transformers, loaded once per test run."""
    return load_engine("smollm2", backend="transformers")


@functools.lru_cache(maxsize=None)
def llamacpp_engine() -> Engine:
    """The same GGUF on llama.cpp in process."""
    return load_engine("smollm2", backend="llama.cpp", max_context=4096)


@functools.lru_cache(maxsize=None)
def llama_server_engine() -> Engine:
    """The same GGUF behind a real llama-server (a child process, tests/servers.py), by URL."""
    from tests.servers import LlamaServerProcess

    # One compute thread: on a shared 2-core machine llama.cpp's spinning threads
    # lose 5-10x under contention (measured), and the tests measure behaviour, not speed.
    server = LlamaServerProcess(slots=4, ctx_per_slot=4096, threads=1)
    engine = load_engine(server.url)
    engine.test_server = server  # kept alive with the engine; it exits with this process
    return engine


ENGINES = {"transformers": default_engine, "llama.cpp": llamacpp_engine}


# -- hooks: transformers


def break_hf_session(engine, monkeypatch, sick):
    real = engine.forward

    def broken(ids, cache, extras):
        if cache is sick._cache:  # adapter detail, as in hf_kv_held
            raise RuntimeError("simulated device failure")
        return real(ids, cache, extras)

    monkeypatch.setattr(engine, "forward", broken)


def hf_kv_held(engine, session):
    from transformers import StaticCache

    cache = session._cache  # adapter detail: measure what the KV really holds
    held = sum(l.keys.nbytes + l.values.nbytes for l in cache.layers  # shared layers (Gemma 3n) hold no keys
               if getattr(l, "is_initialized", False) and getattr(l, "keys", None) is not None)
    if isinstance(cache, StaticCache):  # allocated whole at the first prefill
        return held, engine.capacity.max_context_len
    return held, session.position


# -- hooks: llama.cpp and servers speaking its protocol


def break_server_session(engine, monkeypatch, sick):
    def failing(real):
        def call(*args, **kwargs):
            request = args[0] if args and isinstance(args[0], dict) else None
            slot = request.get("id_slot") if request else args[0]
            if slot == sick.slot:
                raise RuntimeError("simulated device failure")
            return real(*args, **kwargs)
        return call

    monkeypatch.setattr(engine, "stream", failing(engine.stream))
    monkeypatch.setattr(engine, "evaluate", failing(engine.evaluate))


def server_kv_held(engine, session):
    """A slot save writes the slot's KV: its size over its tokens is the KV per token."""
    with contextlib.suppress(Exception):
        session.next_logprobs(1)  # let any open stream finish its current token
    out = engine.post(f"/slots/{session.slot}?action=save", {"filename": "kv-measure.bin"})
    return out["n_written"], out["n_saved"]


def break_engine(engine, monkeypatch, message="device lost"):
    """Make every model call of `engine` fail, whatever its backend."""
    def fail(*args, **kwargs):
        raise RuntimeError(message)

    names = ("stream", "evaluate") if hasattr(engine, "stream") else ("forward",)
    for name in names:
        monkeypatch.setattr(engine, name, fail)


CASES: list[EngineCase] = [
    EngineCase("smollm2", default_engine, chat_prompts, atol=2e-3,
               break_session=break_hf_session, kv_held=hf_kv_held),
    # llama.cpp's quantized matrix products differ with batch shape, so a chunked
    # prefill's log-probabilities differ from one prefill's by up to a few 1e-2.
    EngineCase("smollm2-llama.cpp", llamacpp_engine, chat_prompts, atol=5e-2,
               break_session=break_server_session, kv_held=server_kv_held),
    # The same model and protocol by URL, against a llama-server in another process.
    EngineCase("smollm2-llama-server", llama_server_engine, chat_prompts, atol=5e-2,
               break_session=break_server_session, kv_held=server_kv_held),
]

from tests.tiny_models import MULTIMODAL_CASES, compiled_engine  # noqa: E402

for _c in MULTIMODAL_CASES:
    _c.break_session = _c.break_session or break_hf_session
    _c.kv_held = _c.kv_held or hf_kv_held
CASES.extend(MULTIMODAL_CASES)
# The same contract on a fixed-size cache with a torch.compile'd decode step.
# Rotary angles are float32 even in a float64 model, and inductor's sin/cos
# differ from eager's in the last bit (6e-8), hence a float32-sized tolerance.
CASES.append(EngineCase("tiny-llama-compiled", compiled_engine, chat_prompts, atol=1e-5,
                        break_session=break_hf_session, kv_held=hf_kv_held))
