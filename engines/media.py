"""Media inputs: decode, check and downscale images; read, mix to mono and resample audio.

Knows nothing of models or sessions: each function takes an input's value and
its index (errors name it) and returns what a processor takes, or raises
`InvalidArgument`.
"""

from __future__ import annotations

import io
import os

import numpy as np

from .base import InvalidArgument, MultimodalInput, _is_pil

IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "MPO")  # MPO: JPEG from phone cameras
MAX_IMAGE_PIXELS = 50_000_000  # refuse decompression bombs before decoding
MAX_IMAGE_BYTES = 50 << 20
MAX_AUDIO_SECONDS = 30.0  # used when the feature extractor states no chunk length


def load_image(value, index: int, cap: dict, resample=None):
    """A PIL RGB image from a PIL image, path or bytes (first frame of a GIF),
    downscaled to at most what the processor keeps, with the processor's own
    `resample` filter so that its resize to the same size changes nothing."""
    from PIL import Image, UnidentifiedImageError

    if _is_pil(value):
        img = value
    elif isinstance(value, (str, os.PathLike, bytes)):
        if isinstance(value, bytes):
            if len(value) > MAX_IMAGE_BYTES:
                raise InvalidArgument(f"input {index}: image of {len(value)} bytes exceeds {MAX_IMAGE_BYTES}")
            src = io.BytesIO(value)
        else:
            if not os.path.isfile(value):
                raise InvalidArgument(f"input {index}: image file not found: {os.fspath(value)}")
            src = value
        try:
            img = Image.open(src)
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
            raise InvalidArgument(f"input {index}: not a readable image ({e})") from e
        if img.format not in IMAGE_FORMATS:
            raise InvalidArgument(
                f"input {index}: image format {img.format} is not supported (use PNG, JPEG, WebP or GIF)"
            )
    else:
        raise InvalidArgument(f"input {index}: an image must be a PIL image, a path or bytes, "
                              f"got {type(value).__name__}")
    w, h = img.size
    if w * h > MAX_IMAGE_PIXELS:
        raise InvalidArgument(f"input {index}: image of {w}x{h} pixels exceeds the limit of {MAX_IMAGE_PIXELS}")
    if w < 1 or h < 1:
        raise InvalidArgument(f"input {index}: image is empty ({w}x{h})")
    target = _target_size(w, h, cap)
    try:
        if getattr(img, "n_frames", 1) > 1:
            img.seek(0)  # animated GIF/WebP: the first frame
        if target != (w, h) and img.format == "JPEG":
            img.draft("RGB", target)  # decode at reduced scale: less memory
        img.load()
        img = img.convert("RGB")
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise InvalidArgument(f"input {index}: corrupt image ({e})") from e
    if img.size != target:
        img = img.resize(_target_size(*img.size, cap), Image.Resampling.BICUBIC if resample is None else resample)
    return img


def check_media_value(inp: MultimodalInput, index: int) -> None:
    """Types first: a content hash of an unknown type cannot be taken."""
    v = inp.value
    if inp.kind == "image" and not (_is_pil(v) or isinstance(v, (str, os.PathLike, bytes))):
        raise InvalidArgument(f"input {index}: an image must be a PIL image, a path or bytes, got {type(v).__name__}")
    if inp.kind == "audio" and not isinstance(v, (np.ndarray, str, os.PathLike, bytes)):
        raise InvalidArgument(f"input {index}: audio must be a numpy waveform or a path, got {type(v).__name__}")


def _target_size(w: int, h: int, cap: dict) -> tuple[int, int]:
    """Scale down (never up) so the image is no larger than the processor keeps."""
    scale = [1.0]
    if "long" in cap:
        scale.append(cap["long"] / max(w, h))
    if "short" in cap:  # the processor resizes the short side to this
        scale.append(cap["short"] / min(w, h))
    if "pixels" in cap:
        scale.append((cap["pixels"] / (w * h)) ** 0.5)
    s = min(scale)
    if s >= 1.0:
        return w, h
    return max(1, round(w * s)), max(1, round(h * s))


def load_audio(value, sample_rate, index: int, target_rate: int, max_seconds: float) -> np.ndarray:
    """A mono float32 waveform at `target_rate` from a numpy array or a sound file."""
    import soundfile as sf
    import soxr

    if isinstance(value, (str, os.PathLike, bytes)):
        if not isinstance(value, bytes) and not os.path.isfile(value):
            raise InvalidArgument(f"input {index}: audio file not found: {os.fspath(value)}")
        try:
            data, rate = sf.read(io.BytesIO(value) if isinstance(value, bytes) else value,
                                 dtype="float32", always_2d=True)
        except (sf.LibsndfileError, RuntimeError, OSError, ValueError, TypeError) as e:
            raise InvalidArgument(f"input {index}: not a readable sound file ({e})") from e
        wave = data.mean(axis=1)  # (frames, channels) -> mono
    elif isinstance(value, np.ndarray):
        if not np.issubdtype(value.dtype, np.number):
            raise InvalidArgument(f"input {index}: audio waveform must be numeric, got {value.dtype}")
        wave = value.astype(np.float32)
        if wave.ndim == 2:
            wave = wave.mean(axis=0)  # (channels, samples) -> mono
        rate = sample_rate
    else:
        raise InvalidArgument(f"input {index}: audio must be a numpy waveform or a path, got {type(value).__name__}")
    if wave.size == 0:
        raise InvalidArgument(f"input {index}: audio is empty")
    if not np.isfinite(wave).all():
        raise InvalidArgument(f"input {index}: audio holds NaN or infinite samples")
    seconds = wave.size / rate
    if seconds > max_seconds:
        raise InvalidArgument(f"input {index}: audio of {seconds:.1f} s exceeds the limit of {max_seconds:.0f} s")
    if rate != target_rate:
        wave = soxr.resample(wave, rate, target_rate)
    return np.ascontiguousarray(wave, dtype=np.float32)
