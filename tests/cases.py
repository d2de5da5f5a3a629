"""Engines the shared contract suite runs over.

Each `EngineCase` gives an engine and prompts to prefill. Multimodal families
register their tiny models here too, with prompts that carry media, so that
every adapter passes the same contract tests (tests/test_contract.py).
"""

from __future__ import annotations

import functools
import importlib.util
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
    atol: float = 1e-3  # logits tolerance: chunked prefill is not bitwise equal


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
    """The real embedded default, loaded once per test run."""
    return load_engine("smollm2")


CASES: list[EngineCase] = [EngineCase("smollm2", default_engine, chat_prompts, atol=2e-3)]

# Multimodal families append their tiny-model cases (tests/tiny_models.py).
if importlib.util.find_spec("tests.tiny_models") is not None:
    from tests.tiny_models import MULTIMODAL_CASES, compiled_engine

    CASES.extend(MULTIMODAL_CASES)
    # The same contract on a fixed-size cache with a torch.compile'd decode step.
    # Rotary angles are float32 even in a float64 model, and inductor's sin/cos
    # differ from eager's in the last bit (6e-8), hence a float32-sized tolerance.
    CASES.append(EngineCase("tiny-llama-compiled", compiled_engine, chat_prompts, atol=1e-5))
