"""Building a transformers multimodal model and its processor on a machine
without torchvision.

Knows nothing of sessions, engines or inputs: it returns a processor and a
model. What it works around (checked with transformers 5.23): a Qwen2-VL,
Qwen2.5-VL or SmolVLM `AutoProcessor` also builds a video processor, which
needs torchvision; Gemma 3n's vision tower is a timm model, and timm needs
torchvision too.
"""

from __future__ import annotations

import contextlib
import importlib.util
import threading

import torch

from .base import NotSupported

UNSUPPORTED = {
    "voxtral": "Voxtral's processor takes audio only through mistral-common chat requests, not as "
               "per-input features, so it does not fit this adapter yet",
}

IMAGES_ONLY = {  # model type -> processor class whose video half needs torchvision
    "qwen2_vl": "Qwen2VLProcessor",
    "qwen2_5_vl": "Qwen2_5_VLProcessor",
    "smolvlm": "SmolVLMProcessor",
}


def check_supported(config, name: str) -> None:
    """Raise `NotSupported`, before any weights are read, for a family this adapter cannot take."""
    if config.model_type in UNSUPPORTED:
        raise NotSupported(f"{name}: {UNSUPPORTED[config.model_type]}")


def load_processor(source, config):
    """AutoProcessor, except where it would also build a video processor, which
    needs torchvision (Qwen2-VL, Qwen2.5-VL, SmolVLM): there, images only."""
    import transformers

    if config.model_type in IMAGES_ONLY:
        return images_only(getattr(transformers, IMAGES_ONLY[config.model_type])).from_pretrained(source)
    return transformers.AutoProcessor.from_pretrained(source)


def load_model(source, config, device, dtype):
    """The image/audio-text-to-text model of `source`, with what cannot be built here left out."""
    with vision_tower_left_out(config):
        return model_class(config).from_pretrained(source, dtype=dtype).to(device)


def images_only(cls):
    """`cls` without its video processor: image processor and tokenizer only."""

    class ImagesOnly(cls):
        # Explicit parameters: transformers reads accepted settings off __init__'s code.
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, image_seq_len=None, **kw):
            if image_seq_len is not None:  # SmolVLM
                kw["image_seq_len"] = image_seq_len
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kw)

    ImagesOnly.__name__ = ImagesOnly.__qualname__ = cls.__name__  # saved as the real class
    return ImagesOnly


class NoVisionTower(torch.nn.Module):
    """Stands in for a vision tower that cannot be built here; the engine then takes no images."""


_build_lock = threading.Lock()


@contextlib.contextmanager
def vision_tower_left_out(config):
    """Gemma 3n's vision tower is a timm model, and timm needs torchvision: without
    timm, build the model with the tower left out so its audio and text paths work."""
    if config.model_type != "gemma3n" or importlib.util.find_spec("timm") is not None:
        yield
        return
    from transformers.models.gemma3n import modeling_gemma3n as mod

    real = mod.AutoModel

    class AutoModelWithoutVision:
        @staticmethod
        def from_config(cfg, **kw):
            if cfg.model_type == "gemma3n_vision":
                return NoVisionTower()
            return real.from_config(cfg, **kw)

    with _build_lock:
        mod.AutoModel = AutoModelWithoutVision
        try:
            yield
        finally:
            mod.AutoModel = real


def model_class(config):
    from transformers import AutoModelForImageTextToText, AutoModelForMultimodalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    if config.model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        return AutoModelForImageTextToText
    return AutoModelForMultimodalLM


def has_vision(model) -> bool:
    """Whether `model` has a vision tower that was built (not a `NoVisionTower`)."""
    inner = getattr(model, "model", model)
    towers = [getattr(inner, n, None) for n in ("vision_tower", "visual", "vision_model")]
    return any(t is not None and not isinstance(t, NoVisionTower) for t in towers)
