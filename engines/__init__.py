"""Everything a model touches; knows nothing of Gradio.

The contract lives in `base` and imports nothing heavy. Backends load lazily:
`load_engine` imports torch and transformers only for the transformers
backend, and xllamacpp only for llama.cpp.
"""

from .base import (
    Busy,
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
)

__all__ = [
    "Busy", "ContextFull", "DecodeResult", "Engine", "EngineError", "InvalidArgument", "MultimodalInput",
    "NotSupported", "SamplingConfig", "ServingCapacity", "Session", "SessionPoisoned", "load_engine",
]


def load_engine(*args, **kwargs):
    """See `engines.loading.load_engine` (imported on first use: it knows every backend)."""
    from .loading import load_engine as load

    return load(*args, **kwargs)
