"""Media inputs: decode, check and downscale images; read, mix to mono and resample audio.

Knows nothing of models or sessions: each function takes an input's value and
its index (errors name it) and returns what a processor takes, or raises
`InvalidArgument` that names the input and says what is allowed.

Every size is checked from the header before anything is decoded: an image's
width and height, a sound file's frames, rate and channels. The limits are one
process-wide `MediaLimits` value (a deployment setting: `app.py` flags set it
with `set_media_limits`); a model's own bound (an audio encoder's window) can
only make them tighter.

What is accepted, and what is refused (docs/reliability.md has the list):
- images: PNG, JPEG, WebP, GIF (first frame), MPO; at most `max_image_pixels`,
  `max_image_bytes` and an aspect ratio of `max_image_aspect`. PIL's own
  decompression-bomb error becomes the same `InvalidArgument` as ours.
- audio: numeric waveforms (integer samples are scaled from their type's range)
  and files libsndfile reads (WAV, FLAC, OGG/Vorbis/Opus, MP3, AIFF, ...);
  `min_sample_rate`..`max_sample_rate`, at most `max_audio_channels`,
  `min_audio_seconds`..`max_audio_seconds` and `max_audio_samples` decoded samples. NaN or infinite
  samples are refused; a waveform louder than full scale (peak above 1.0) is
  scaled down to peak 1.0, so int16 values passed as floats still sound right.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
import re
import threading
from dataclasses import dataclass

import numpy as np

from .base import InvalidArgument, MultimodalInput, _is_pil

IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "MPO")  # MPO: JPEG from phone cameras
AUDIO_FORMATS = "WAV, FLAC, OGG (Vorbis, Opus), MP3 or AIFF"
MAX_IMAGE_PIXELS = 50_000_000  # the default limit; see MediaLimits
MAX_IMAGE_BYTES = 50 << 20
MAX_AUDIO_SECONDS = 30.0  # used when the feature extractor states no chunk length


@dataclass(frozen=True)
class MediaLimits:
    """What one image or sound may be. Checked before decoding; the message names the limit."""

    max_image_pixels: int = MAX_IMAGE_PIXELS
    max_image_bytes: int = MAX_IMAGE_BYTES
    max_image_aspect: float = 100.0  # a 1 x 10^7 strip, upscaled to a processor's short side, is a bomb too
    max_audio_seconds: float = MAX_AUDIO_SECONDS  # the model's own window may be shorter
    min_audio_seconds: float = 0.05  # shorter clips give some encoders no frame at all (Qwen2-Audio: < 25 ms)
    max_audio_bytes: int = 100 << 20
    max_audio_samples: int = 64_000_000  # decoded, all channels: 256 MB of float32
    max_audio_channels: int = 16
    min_sample_rate: int = 1_000
    max_sample_rate: int = 768_000

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise InvalidArgument(f"media limit {f.name} must be a positive number, got {v!r}")
        if self.min_sample_rate > self.max_sample_rate:
            raise InvalidArgument("media limits: min_sample_rate is above max_sample_rate")
        if self.max_image_aspect < 1:
            raise InvalidArgument(f"media limit max_image_aspect must be >= 1, got {self.max_image_aspect}")


_limits = MediaLimits()
_limits_lock = threading.Lock()


def media_limits() -> MediaLimits:
    """The limits in force."""
    return _limits


def set_media_limits(limits: MediaLimits | None = None, **changes) -> MediaLimits:
    """Replace the limits (a `MediaLimits`, or changed fields of the current one).
    Returns the previous limits, so a caller (a test) can put them back."""
    global _limits
    with _limits_lock:
        old = _limits
        _limits = dataclasses.replace(limits or old, **changes)
        return old


def _named(value) -> str:
    """ ' name.png' for a path, '' otherwise: messages name the file a person attached."""
    if isinstance(value, (str, os.PathLike)):
        return f" {os.path.basename(os.fspath(value))}"
    return ""


# --------------------------------------------------------------------------- images


def load_image(value, index: int, cap: dict, resample=None):
    """A PIL RGB image from a PIL image, path or bytes (first frame of a GIF),
    downscaled to at most what the processor keeps, with the processor's own
    `resample` filter so that its resize to the same size changes nothing."""
    from PIL import Image, UnidentifiedImageError

    lim = _limits
    name = _named(value)
    if _is_pil(value):
        img = value
    elif isinstance(value, (str, os.PathLike, bytes)):
        if isinstance(value, bytes):
            size, src = len(value), io.BytesIO(value)
        else:
            if not os.path.isfile(value):
                raise InvalidArgument(f"input {index}: image file not found: {os.fspath(value)}")
            size, src = os.path.getsize(value), value
        if size == 0:
            raise InvalidArgument(f"input {index}: image{name} is an empty file")
        if size > lim.max_image_bytes:
            raise InvalidArgument(f"input {index}: image{name} of {size:,} bytes exceeds the limit of "
                                  f"{lim.max_image_bytes:,} bytes")
        try:
            img = Image.open(src)  # reads the header only
        except Image.DecompressionBombError as e:  # PIL's own guard, above twice its MAX_IMAGE_PIXELS
            px = re.search(r"\((\d+) pixels\)", str(e))
            what = f"{int(px.group(1)):,} pixels" if px else "too many pixels"
            raise InvalidArgument(f"input {index}: image{name} of {what} exceeds the limit of "
                                  f"{lim.max_image_pixels:,} pixels") from None
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as e:
            raise InvalidArgument(f"input {index}: not a readable image{name} ({e}); "
                                  "send PNG, JPEG, WebP or GIF") from e
        if img.format not in IMAGE_FORMATS:
            raise InvalidArgument(
                f"input {index}: image format {img.format} is not supported (use PNG, JPEG, WebP or GIF)"
            )
    else:
        raise InvalidArgument(f"input {index}: an image must be a PIL image, a path or bytes, "
                              f"got {type(value).__name__}")
    w, h = img.size
    if w < 1 or h < 1:
        raise InvalidArgument(f"input {index}: image{name} is empty ({w}x{h})")
    if w * h > lim.max_image_pixels:
        raise InvalidArgument(f"input {index}: image{name} of {w}x{h} pixels exceeds the limit of "
                              f"{lim.max_image_pixels:,} pixels")
    if max(w, h) / min(w, h) > lim.max_image_aspect:
        raise InvalidArgument(f"input {index}: image{name} of {w}x{h} pixels is too narrow: the longer side "
                              f"may be at most {lim.max_image_aspect:g} times the shorter")
    target = _target_size(w, h, cap)
    try:
        if getattr(img, "is_animated", False):  # not n_frames: that walks every frame
            img.seek(0)  # animated GIF/WebP: the first frame
        if target != (w, h) and img.format == "JPEG":
            img.draft("RGB", target)  # decode at reduced scale: less memory
        img.load()
        img = img.convert("RGB")
    except Image.DecompressionBombError as e:
        raise InvalidArgument(f"input {index}: image{name} exceeds the limit of {lim.max_image_pixels:,} "
                              f"pixels ({e})") from None
    except (OSError, ValueError, SyntaxError, EOFError, IndexError, MemoryError) as e:
        raise InvalidArgument(f"input {index}: corrupt image{name} ({type(e).__name__}: {e})") from e
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


# --------------------------------------------------------------------------- audio


def load_audio(value, sample_rate, index: int, target_rate: int, max_seconds: float) -> np.ndarray:
    """A mono float32 waveform at `target_rate` from a numpy array or a sound file.

    `max_seconds` is the model's bound; the deployment's `max_audio_seconds` can lower it.
    """
    import soundfile as sf
    import soxr

    lim = _limits
    max_seconds = min(max_seconds, lim.max_audio_seconds)
    name = _named(value)
    if isinstance(value, (str, os.PathLike, bytes)):
        if isinstance(value, bytes):
            size = len(value)
        else:
            if not os.path.isfile(value):
                raise InvalidArgument(f"input {index}: audio file not found: {os.fspath(value)}")
            size = os.path.getsize(value)
        if size == 0:
            raise InvalidArgument(f"input {index}: sound file{name} is empty")
        if size > lim.max_audio_bytes:
            raise InvalidArgument(f"input {index}: sound file{name} of {size:,} bytes exceeds the limit of "
                                  f"{lim.max_audio_bytes:,} bytes")
        src = (lambda: io.BytesIO(value)) if isinstance(value, bytes) else (lambda: value)
        try:
            info = sf.info(src())  # the header: nothing is decoded yet
        except (sf.LibsndfileError, RuntimeError, OSError, ValueError, TypeError, EOFError) as e:
            raise InvalidArgument(f"input {index}: not a readable sound file{name} ({e}); "
                                  f"send {AUDIO_FORMATS}") from e
        _check_audio_shape(index, name, info.channels, info.frames, info.samplerate, max_seconds, lim)
        try:
            data, rate = sf.read(src(), dtype="float32", always_2d=True)
        except (sf.LibsndfileError, RuntimeError, OSError, ValueError, TypeError, EOFError, MemoryError) as e:
            raise InvalidArgument(f"input {index}: not a readable sound file{name} ({e}); "
                                  f"send {AUDIO_FORMATS}") from e
        if data.shape[0] == 0:
            raise InvalidArgument(f"input {index}: sound file{name} holds no samples")
        frames = data.T  # (channels, frames)
    elif isinstance(value, np.ndarray):
        if value.dtype == np.bool_ or not (np.issubdtype(value.dtype, np.integer)
                                           or np.issubdtype(value.dtype, np.floating)):
            raise InvalidArgument(f"input {index}: audio waveform must be real numbers (float or int), "
                                  f"got {value.dtype}")
        if value.ndim not in (1, 2):
            raise InvalidArgument(f"input {index}: audio waveform must be 1-D or (channels, samples), "
                                  f"got shape {value.shape}")
        frames = value if value.ndim == 2 else value[None, :]
        rate = sample_rate
        if isinstance(rate, bool) or not isinstance(rate, (int, np.integer)):
            raise InvalidArgument(f"input {index}: a waveform needs an int sample_rate, got {rate!r}")
        _check_audio_shape(index, name, frames.shape[0], frames.shape[1], int(rate), max_seconds, lim)
        if np.issubdtype(frames.dtype, np.integer):  # int16 PCM and friends: scale from the type's range
            frames = frames / float(np.iinfo(frames.dtype).max + 1)
    else:
        raise InvalidArgument(f"input {index}: audio must be a numpy waveform or a path, got {type(value).__name__}")
    if not np.isfinite(frames).all():
        raise InvalidArgument(f"input {index}: audio{name} holds NaN or infinite samples; only finite "
                              "samples are accepted")
    # Mix to mono in float64: float32 sums of huge values overflow to inf.
    wave = frames.mean(axis=0, dtype=np.float64) if frames.shape[0] > 1 else frames[0].astype(np.float64)
    peak = float(np.abs(wave).max())
    if peak > 1.0:  # louder than full scale: scaled to peak 1.0 (docs/reliability.md)
        wave = wave / peak
    wave = wave.astype(np.float32)
    if rate != target_rate:
        wave = soxr.resample(wave, rate, target_rate)
    if wave.size == 0:
        raise InvalidArgument(f"input {index}: audio{name} is too short to resample to {target_rate} Hz")
    return np.ascontiguousarray(wave, dtype=np.float32)


def _check_audio_shape(index, name, channels, frames, rate, max_seconds, lim: MediaLimits) -> None:
    if channels < 1 or frames < 1:
        raise InvalidArgument(f"input {index}: audio{name} is empty ({channels} channel(s), {frames} samples)")
    if channels > lim.max_audio_channels:
        raise InvalidArgument(
            f"input {index}: audio{name} has {channels} channels; at most {lim.max_audio_channels} are "
            "accepted (a waveform is 1-D or (channels, samples), not (samples, channels))")
    if not lim.min_sample_rate <= rate <= lim.max_sample_rate:
        raise InvalidArgument(f"input {index}: audio{name} sample rate {rate} Hz is outside "
                              f"{lim.min_sample_rate:,}..{lim.max_sample_rate:,} Hz")
    seconds = frames / rate
    if seconds < lim.min_audio_seconds:
        raise InvalidArgument(f"input {index}: audio{name} of {seconds:.3f} s is shorter than the minimum of "
                              f"{lim.min_audio_seconds:g} s")
    if seconds > max_seconds:
        raise InvalidArgument(f"input {index}: audio{name} of {seconds:.1f} s exceeds the limit of "
                              f"{max_seconds:g} s")
    if channels * frames > lim.max_audio_samples:
        raise InvalidArgument(f"input {index}: audio{name} of {channels} x {frames:,} samples exceeds the "
                              f"limit of {lim.max_audio_samples:,} samples")
