"""Everything a model touches; knows nothing of Gradio.

The contract lives in `base`; adapters in `hf_text` and `hf_multimodal`.
"""

from .base import (
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
from .loading import load_engine

__all__ = [
    "ContextFull", "DecodeResult", "Engine", "EngineError", "InvalidArgument", "MultimodalInput",
    "NotSupported", "SamplingConfig", "ServingCapacity", "Session", "SessionPoisoned", "load_engine",
]
