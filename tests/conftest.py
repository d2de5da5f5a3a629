"""Shared fixtures. The default model is loaded once per test run."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may download at test time
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
# One llama.cpp compute thread: the tests measure behaviour, and the test process's own
# threads (Gradio, clients, streams) share the 2 cores; 2 spinning threads ran 5-10x slower.
os.environ.setdefault("PLAYGROUND_THREADS", "1")

from tests.cases import CASES, default_engine  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--bench", action="store_true", help="also run the slow benchmark smoke runs (marker bench)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--bench"):
        return
    skip = pytest.mark.skip(reason="a slow benchmark smoke run: pass --bench")
    for item in items:
        if "bench" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def smol():
    """The real embedded default, SmolLM2-135M-Instruct, on the default device."""
    return default_engine()


@pytest.fixture(scope="session", params=CASES, ids=[c.id for c in CASES])
def case(request):
    """(case, engine) for every engine the contract suite covers."""
    c = request.param
    return c, c.make_engine()


@pytest.fixture(scope="session")
def artifacts() -> Path:
    out = ROOT / "artifacts"
    out.mkdir(exist_ok=True)
    return out
