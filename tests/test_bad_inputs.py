"""Hostile inputs, generated here: broken and oversized images and sounds, decompression
bombs, malformed transcripts, absurd API arguments, stop storms and disconnects.

Every media and transcript case runs twice: through a `Conversation` on a tiny
multimodal model, and through the launched UI (gradio_client, the file uploaded as
a person would). Each must end within CASE_LIMIT_S in one of two ways:
- accepted: the reply works (and the decision is the documented one), or
- refused: an `EngineError` (or a "⚠️" status) that names the input and says what
  is allowed, with the conversation unchanged, still usable, the typed text kept
  and the server alive.
Never another exception, a hang, or a poisoned conversation. What is accepted and
what is refused is listed in docs/reliability.md; `expect` below holds the same.
"""

from __future__ import annotations

import base64
import io
import json
import re
import struct
import subprocess
import sys
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import soundfile as sf
from gradio_client import Client, handle_file
from PIL import Image

from engines import EngineError, InvalidArgument, MultimodalInput as MI, SamplingConfig
from engines.media import media_limits, set_media_limits
from playground import Conversation
from playground.sessions import RateLimit
from tests.tiny_models import image as noisy_image, tiny_engine, tone
from tests.ui_harness import GREEDY, reply_text, running_app, shown, wait_until

CASE_LIMIT_S = 10.0
GREEDY_CFG = SamplingConfig()
UNCHANGED = {"__type__": "update"}
EMPTY_STORE = {"messages": []}
IMAGE_FAMILY, AUDIO_FAMILY = "llava", "qwen2_audio"  # AUDIO: a 2 s window, 16 kHz
UI_TABS = 6  # cases go through the UI in this many tabs at once: the calls wait more than they compute


# =========================================================================== case builders


@dataclass
class Case:
    """One hostile input. `make(tmp)` returns the medium: bytes, a PIL image, or (array, rate).
    expect: "refuse" (match: a regex the message must hold), "accept", or "either"
    (a damaged file that may still decode: accepted, or refused naming the input)."""

    id: str
    kind: str  # "image" | "audio"
    make: Callable
    expect: str
    match: str = ""
    ext: str = ""  # the file name's extension in the UI ("" : not a file, Conversation only)
    limits: dict = field(default_factory=dict)  # media limits in force for this case


def encode_image(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def encode_audio(wave: np.ndarray, rate: int, fmt: str = "WAV", subtype: str | None = None) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, wave.T if wave.ndim == 2 else wave, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


def png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def png_header_only(w: int, h: int) -> bytes:
    """A PNG whose header claims w x h pixels, with one tiny (wrong) IDAT: a bomb's shape."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + png_chunk(b"IEND", b""))


def png_real_bomb(side: int) -> bytes:
    """A real decompression bomb: a side x side 1-bit PNG of zeros, tens of KB on disk."""
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    row = b"\0" * (1 + (side + 7) // 8)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(row * side, 9))
            + png_chunk(b"IEND", b""))


def jpeg_claiming(w: int, h: int) -> bytes:
    """A small JPEG whose frame header (SOF0) is patched to claim w x h."""
    data = bytearray(encode_image(noisy_image(3, (16, 16)), "JPEG", quality=80))
    at = data.index(b"\xff\xc0")
    data[at + 5:at + 9] = struct.pack(">HH", h, w)
    return bytes(data)


def gif_claiming(w: int, h: int) -> bytes:
    data = bytearray(encode_image(noisy_image(4, (16, 16)).convert("P"), "GIF"))
    data[6:10] = struct.pack("<HH", w, h)  # logical screen
    at = data.index(b"\x2c")  # image descriptor
    data[at + 5:at + 9] = struct.pack("<HH", w, h)
    return bytes(data)


def webp_claiming(w: int, h: int) -> bytes:
    """An extended-format WebP header (VP8X) with a w x h canvas and no image data."""
    vp8x = struct.pack("<I", 0) + (w - 1).to_bytes(3, "little") + (h - 1).to_bytes(3, "little")
    body = b"WEBP" + b"VP8X" + struct.pack("<I", len(vp8x)) + vp8x
    return b"RIFF" + struct.pack("<I", len(body)) + body


def animated_gif(frames: int) -> bytes:
    imgs = [noisy_image(i, (8, 8)).convert("P") for i in range(frames)]
    return encode_image(imgs[0], "GIF", save_all=True, append_images=imgs[1:], duration=10)


def flipped(data: bytes, seed: int, n: int = 6) -> bytes:
    """`n` random bytes flipped, past the first 8 (so the format is still recognised)."""
    rng = np.random.default_rng(seed)
    out = bytearray(data)
    for at in rng.integers(8, len(out), n):
        out[at] ^= int(rng.integers(1, 256))
    return bytes(out)


def wav_with_rate(rate: int, frames: int = 1600) -> bytes:
    """A mono 16-bit WAV whose header says `rate` (written by hand: libsndfile refuses odd rates)."""
    data = (np.sin(np.arange(frames) / 5) * 8000).astype("<i2").tobytes()
    fmt = struct.pack("<HHIIHH", 1, 1, rate, rate * 2, 2, 16)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data
    return b"RIFF" + struct.pack("<I", len(body)) + body


def wav_lying_about_length() -> bytes:
    """A WAV whose data chunk claims 4 GB but holds 0.2 s."""
    data = bytearray(encode_audio(tone(5, 0.2, 16000), 16000, subtype="PCM_16"))
    at = data.index(b"data")
    data[at + 4:at + 8] = struct.pack("<I", 0xFFFFFFF0)
    return bytes(data)


SMALL_PNG = encode_image(noisy_image(1, (64, 48)), "PNG")
CLIP = tone(1, 0.6, 16000)  # a good 0.6 s sound


def image_cases() -> list[Case]:
    cases: list[Case] = []
    base = {
        "PNG": SMALL_PNG,
        "JPEG": encode_image(noisy_image(2, (64, 48)), "JPEG", quality=85),
        "GIF": encode_image(noisy_image(3, (64, 48)).convert("P"), "GIF"),
        "WEBP": encode_image(noisy_image(4, (64, 48)), "WEBP", quality=80),
    }
    for fmt, data in base.items():
        ext = ".jpg" if fmt == "JPEG" else "." + fmt.lower()
        cases.append(Case(f"image-{fmt}-ok", "image", lambda d=data: d, "accept", ext=ext))
        for cut in (8, 20, 40, len(data) // 4, len(data) // 2, len(data) - 12, len(data) - 1):
            cases.append(Case(f"image-{fmt}-truncated-{cut}", "image", lambda d=data, c=cut: d[:c], "either",
                              r"input \d+: (not a readable image|corrupt image|image .*)", ext))
        for seed in range(4):
            cases.append(Case(f"image-{fmt}-bitflip-{seed}", "image", lambda d=data, s=seed: flipped(d, s), "either",
                              r"input \d+: (not a readable image|corrupt image|image .*)", ext))
    refuse_image = r"input \d+: not a readable image.*send PNG, JPEG, WebP or GIF"
    mislabelled = {
        "wav-as-png": (encode_audio(CLIP, 16000), ".png"),
        "text-as-png": (b"these are not pixels\n" * 20, ".png"),
        "json-as-jpg": (b'{"role": "user", "content": "hi"}', ".jpg"),
        "html-as-gif": (b"<!doctype html><html><body>hi</body></html>", ".gif"),
        "pdf-as-png": (b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n", ".png"),
        "zip-as-webp": (b"PK\x03\x04" + b"\0" * 100, ".webp"),
        "elf-as-png": (b"\x7fELF\x02\x01\x01" + b"\0" * 120, ".png"),
        "svg-as-png": (b'<svg xmlns="http://www.w3.org/2000/svg" width="9000" height="9000"/>', ".png"),
    }
    for name, (data, ext) in mislabelled.items():
        cases.append(Case(f"image-{name}", "image", lambda d=data: d, "refuse", refuse_image, ext))
    for fmt in ("BMP", "TIFF", "ICO"):
        data = encode_image(noisy_image(5, (32, 32)), fmt)
        cases.append(Case(f"image-{fmt}-format", "image", lambda d=data: d, "refuse",
                          rf"input \d+: image format {fmt} is not supported \(use PNG, JPEG, WebP or GIF\)",
                          ".png"))
    cases.append(Case("image-empty-file", "image", lambda: b"", "refuse", r"input \d+: image.* is an empty file",
                      ".png"))
    for mode in ("L", "LA", "P", "RGBA", "I;16", "1"):
        data = encode_image(Image.new(mode, (40, 30)), "PNG")
        cases.append(Case(f"image-mode-{mode}", "image", lambda d=data: d, "accept", ext=".png"))
    cmyk = encode_image(Image.new("CMYK", (40, 30), (10, 20, 30, 40)), "JPEG")
    cases.append(Case("image-cmyk-jpeg", "image", lambda d=cmyk: d, "accept", ext=".jpg"))
    for w, h, expect in ((1, 1, "accept"), (1, 100, "accept"), (101, 1, "refuse"), (1, 5000, "refuse")):
        data = encode_image(Image.new("RGB", (w, h), (200, 10, 10)), "PNG")
        cases.append(Case(f"image-{w}x{h}", "image", lambda d=data: d, expect,
                          r"input \d+: image.* of \d+x\d+ pixels is too narrow: the longer side may be at most 100 "
                          r"times the shorter", ".png"))
    big = encode_image(Image.new("RGB", (4000, 3000), (10, 120, 200)), "PNG")
    cases.append(Case("image-4000x3000-downscaled", "image", lambda d=big: d, "accept", ext=".png"))
    gif = animated_gif(300)
    cases.append(Case("image-gif-300-frames", "image", lambda d=gif: d, "accept", ext=".gif"))
    over = r"input \d+: image.* of [\d,x]+ pixels exceeds the limit of 50,000,000 pixels"
    for w, h in ((8000, 8000), (10000, 10000), (14000, 14000), (20000, 20000), (65535, 65535)):
        cases.append(Case(f"image-png-header-{w}x{h}", "image", lambda w=w, h=h: png_header_only(w, h), "refuse",
                          over, ".png"))
    cases.append(Case("image-png-real-bomb-20000", "image", lambda: png_real_bomb(20000), "refuse", over, ".png"))
    cases.append(Case("image-jpeg-claims-65000", "image", lambda: jpeg_claiming(65000, 65000), "refuse", over, ".jpg"))
    cases.append(Case("image-gif-claims-65535", "image", lambda: gif_claiming(65535, 65535), "refuse", over, ".gif"))
    cases.append(Case("image-webp-claims-16384", "image", lambda: webp_claiming(16384, 16384), "refuse",
                      r"input \d+: (image.* exceeds the limit of 50,000,000 pixels|not a readable image)", ".webp"))
    # Deployment limits (set_media_limits, app.py --max-image-pixels): lowered, they bite.
    cases.append(Case("image-over-lowered-pixel-limit", "image", lambda: encode_image(noisy_image(6, (200, 100)), "PNG"),
                      "refuse", r"input \d+: image.* of 200x100 pixels exceeds the limit of 10,000 pixels", ".png",
                      {"max_image_pixels": 10_000}))
    other = encode_image(noisy_image(7, (64, 48)), "PNG")  # not seen before: the engine memoizes media
    cases.append(Case("image-over-lowered-byte-limit", "image", lambda: other, "refuse",
                      r"input \d+: image.* of [\d,]+ bytes exceeds the limit of 1,000 bytes", ".png",
                      {"max_image_bytes": 1000}))
    # In-memory images (API callers): no file in the UI.
    cases.append(Case("image-pil-0x0", "image", lambda: Image.new("RGB", (0, 0)), "refuse",
                      r"input \d+: image is empty \(0x0\)"))
    cases.append(Case("image-pil-1bit-20000", "image", lambda: Image.new("1", (20000, 20000)), "refuse", over))
    cases.append(Case("image-pil-I16", "image", lambda: Image.new("I;16", (30, 30)), "accept"))
    cases.append(Case("image-not-an-image", "image", lambda: np.zeros((4, 4, 3)), "refuse",
                      r"image input must be a PIL image, a path or bytes"))
    return cases


def audio_cases() -> list[Case]:
    cases: list[Case] = []
    base = {
        "WAV": (encode_audio(CLIP, 16000, "WAV", "PCM_16"), ".wav"),
        "FLAC": (encode_audio(CLIP, 16000, "FLAC"), ".flac"),
        "OGG": (encode_audio(CLIP, 16000, "OGG"), ".ogg"),
    }
    damaged = r"input \d+: (not a readable sound file|audio.* (is empty|holds no samples|is shorter than|holds NaN))"
    for fmt, (data, ext) in base.items():
        cases.append(Case(f"audio-{fmt}-ok", "audio", lambda d=data: d, "accept", ext=ext))
        for cut in (4, 12, 44, 100, len(data) // 2, len(data) - 1):
            cases.append(Case(f"audio-{fmt}-truncated-{cut}", "audio", lambda d=data, c=cut: d[:c], "either",
                              damaged, ext))
        for seed in range(4):
            cases.append(Case(f"audio-{fmt}-bitflip-{seed}", "audio", lambda d=data, s=seed: flipped(d, s), "either",
                              damaged, ext))
    refuse_sound = r"input \d+: not a readable sound file.*send WAV, FLAC, OGG"
    for name, (data, ext) in {
        "png-as-wav": (SMALL_PNG, ".wav"),
        "text-as-wav": (b"not a sound at all\n" * 40, ".wav"),
        "json-as-mp3": (b'{"messages": []}', ".mp3"),
        "mp4-as-m4a": (b"\0\0\0\x18ftypmp42\0\0\0\0mp42isom" + b"\0" * 200, ".m4a"),
        "riff-not-wave": (b"RIFF\x24\0\0\0AVI LIST" + b"\0" * 64, ".wav"),
    }.items():
        cases.append(Case(f"audio-{name}", "audio", lambda d=data: d, "refuse", refuse_sound, ext))
    cases.append(Case("audio-empty-file", "audio", lambda: b"", "refuse", r"input \d+: sound file.* is empty", ".wav"))
    cases.append(Case("audio-wav-header-claims-4GB", "audio", wav_lying_about_length, "either", damaged, ".wav"))
    rate_msg = r"input \d+: audio.* sample rate \d+ Hz is outside 1,000\.\.768,000 Hz"
    for rate, expect in ((1, "refuse"), (999, "refuse"), (1000, "accept"), (8000, "accept"), (96000, "accept"),
                         (768001, "refuse"), (4_000_000, "refuse")):
        frames = max(200, min(rate, 16000))  # at least 0.05 s where the rate allows
        if rate < 1000:
            frames = 10
        cases.append(Case(f"audio-wav-rate-{rate}", "audio", lambda r=rate, f=frames: wav_with_rate(r, f), expect,
                          rate_msg, ".wav"))
        cases.append(Case(f"audio-array-rate-{rate}", "audio",
                          lambda r=rate, f=frames: (tone(2, f / r, r) if r >= 1000 else np.zeros(f, np.float32), r),
                          expect, rate_msg))
    cases.append(Case("audio-array-rate-1e9", "audio", lambda: (np.zeros(1000, np.float32), 10**9), "refuse", rate_msg))
    chan_msg = r"input \d+: audio.* has \d+ channels; at most 16 are accepted"
    for channels, expect in ((1, "accept"), (2, "accept"), (16, "accept"), (17, "refuse"), (64, "refuse")):
        wave = np.stack([tone(k, 0.3, 16000) for k in range(channels)])
        cases.append(Case(f"audio-array-{channels}ch", "audio", lambda w=wave: (w, 16000), expect, chan_msg))
        if channels in (2, 17):
            cases.append(Case(f"audio-wav-{channels}ch", "audio", lambda w=wave: encode_audio(w, 16000, "WAV", "FLOAT"),
                              expect, chan_msg, ".wav"))
    cases.append(Case("audio-array-transposed", "audio", lambda: (np.stack([CLIP, CLIP]).T.copy(), 16000), "refuse",
                      chan_msg + r".*not \(samples, channels\)"))
    nan_msg = r"input \d+: audio.* holds NaN or infinite samples; only finite samples are accepted"
    for name, fill in (("all-nan", np.nan), ("one-nan", "one"), ("inf", np.inf), ("minus-inf", -np.inf)):
        wave = CLIP.copy()
        if fill == "one":
            wave[1234] = np.nan
        else:
            wave[:] = fill
        cases.append(Case(f"audio-array-{name}", "audio", lambda w=wave: (w, 16000), "refuse", nan_msg))
        cases.append(Case(f"audio-wav-{name}", "audio", lambda w=wave: encode_audio(w, 16000, "WAV", "FLOAT"),
                          "refuse", nan_msg, ".wav"))
    # Loudness: louder than full scale is scaled to peak 1.0 (docs/reliability.md), not refused.
    cases.append(Case("audio-array-amplitude-1e30", "audio", lambda: (CLIP * np.float32(1e30), 16000), "accept"))
    cases.append(Case("audio-array-float64-1e300", "audio", lambda: (CLIP.astype(np.float64) * 1e300, 16000), "accept"))
    cases.append(Case("audio-wav-float-amplitude-1000", "audio",
                      lambda: encode_audio(CLIP * 1000, 16000, "WAV", "FLOAT"), "accept", ext=".wav"))
    cases.append(Case("audio-array-silence", "audio", lambda: (np.zeros(16000, np.float32), 16000), "accept"))
    for dtype in ("int16", "int32", "uint8", "float16"):
        cases.append(Case(f"audio-array-{dtype}", "audio",
                          lambda d=dtype: ((CLIP * 100).astype(d), 16000), "accept"))
    real = r"input \d+: audio waveform must be real numbers \(float or int\)"
    cases.append(Case("audio-array-bool", "audio", lambda: (CLIP > 0, 16000), "refuse", real))
    cases.append(Case("audio-array-complex", "audio", lambda: (CLIP.astype(np.complex64), 16000), "refuse", real))
    cases.append(Case("audio-array-3d", "audio", lambda: (CLIP.reshape(2, 3, -1), 16000), "refuse",
                      r"audio waveform must be 1-D or \(channels, samples\)"))
    cases.append(Case("audio-list", "audio", lambda: ([0.1, 0.2, 0.3], 16000), "refuse",
                      r"audio input must be a numpy waveform or a path"))
    cases.append(Case("audio-array-rate-float", "audio", lambda: (CLIP, 16000.5), "refuse",
                      r"a waveform needs a positive int sample_rate"))
    long_msg = r"input \d+: audio.* of [\d.]+ s exceeds the limit of 2 s"
    cases.append(Case("audio-array-3s-over-window", "audio", lambda: (tone(3, 3.0, 16000), 16000), "refuse", long_msg))
    cases.append(Case("audio-wav-3s-over-window", "audio", lambda: encode_audio(tone(3, 3.0, 16000), 16000), "refuse",
                      long_msg, ".wav"))
    cases.append(Case("audio-flac-120s-silence", "audio",
                      lambda: encode_audio(np.zeros(120 * 8000, np.float32), 8000, "FLAC"), "refuse", long_msg, ".flac"))
    short = r"input \d+: audio.* of 0\.\d+ s is shorter than the minimum of 0\.05 s"
    cases.append(Case("audio-array-10-samples", "audio", lambda: (CLIP[:10].copy(), 16000), "refuse", short))
    cases.append(Case("audio-wav-10-samples", "audio", lambda: encode_audio(CLIP[:10], 16000), "refuse", short, ".wav"))
    cases.append(Case("audio-array-empty", "audio", lambda: (np.zeros(0, np.float32), 16000), "refuse",
                      r"input \d+: audio is empty"))
    cases.append(Case("audio-array-0-channels", "audio", lambda: (np.zeros((0, 100), np.float32), 16000), "refuse",
                      r"input \d+: audio is empty"))
    # Deployment limits (app.py --max-audio-seconds), lowered: they bite before the model's window.
    cases.append(Case("audio-over-lowered-seconds", "audio", lambda: encode_audio(tone(4, 1.0, 16000), 16000),
                      "refuse", r"input \d+: audio.* of 1\.0 s exceeds the limit of 0\.5 s", ".wav",
                      {"max_audio_seconds": 0.5}))
    other = encode_audio(tone(9, 0.4, 16000), 16000, "WAV", "PCM_16")  # not seen before: the engine memoizes media
    cases.append(Case("audio-over-lowered-bytes", "audio", lambda: other, "refuse",
                      r"input \d+: sound file.* of [\d,]+ bytes exceeds the limit of 1,000 bytes", ".wav",
                      {"max_audio_bytes": 1000}))
    return cases


IMAGE_CASES, AUDIO_CASES = image_cases(), audio_cases()
MEDIA_CASES = IMAGE_CASES + AUDIO_CASES


def medium(case: Case, tmp: Path) -> MI:
    value = case.make()
    if case.kind == "image":
        return MI.image(value)
    if isinstance(value, bytes):
        return MI.audio(value)
    wave, rate = value
    return MI.audio(wave, rate)


class limits:
    """Media limits for one case, restored afterwards."""

    def __init__(self, **changes):
        self.changes = changes

    def __enter__(self):
        self.old = set_media_limits(**self.changes) if self.changes else None

    def __exit__(self, *exc):
        if self.old is not None:
            set_media_limits(self.old)


def outcome_problem(case_id, expect, refused_msg, match, elapsed) -> str | None:
    """None when the outcome is acceptable, else what is wrong."""
    if elapsed > CASE_LIMIT_S:
        return f"{case_id}: took {elapsed:.1f} s"
    if refused_msg is None:
        return f"{case_id}: accepted, expected a refusal matching {match!r}" if expect == "refuse" else None
    if expect == "accept":
        return f"{case_id}: refused ({refused_msg!r}), expected it accepted"
    if match and not re.search(match, refused_msg, re.S):
        return f"{case_id}: message {refused_msg!r} does not match {match!r}"
    return None


# =========================================================================== fixtures


@pytest.fixture(scope="module")
def engines_():
    # Engines of their own: other modules' tiny engines hold their own slots.
    return {"image": tiny_engine(IMAGE_FAMILY, max_sessions=10), "audio": tiny_engine(AUDIO_FAMILY, max_sessions=9)}


@pytest.fixture(scope="module")
def apps(engines_):
    """One launched app per medium, sharing the module's engines. The upload limit sits above
    the transcript limit (5 MB) so that a 50 MB transcript reaches the handler's own check."""
    with running_app(engines_["image"], max_sessions=UI_TABS, max_new_tokens_cap=8, max_transcript_mb=5,
                     launch_kwargs={"max_file_size": "64mb"}) as img, \
            running_app(engines_["audio"], max_sessions=UI_TABS, max_new_tokens_cap=8,
                        launch_kwargs={"max_file_size": "64mb"}) as aud:
        yield {"image": img, "audio": aud}


@pytest.fixture(autouse=True)
def free_tabs(request):
    """Each test's tabs are freed afterwards (the apps cap their tabs)."""
    yield
    for name in ("apps", "stop_app"):
        if name in request.fixturenames:
            value = request.getfixturevalue(name)
            for _, demo in (value.values() if isinstance(value, dict) else [value]):
                for key in demo.sessions.keys():
                    demo.sessions.close(key)


@pytest.fixture(autouse=True)
def default_media_limits():
    old = set_media_limits()
    yield
    set_media_limits(old)


def snapshot(conv):
    return [(t.role, [p.key() for p in t.parts], list(t.token_ids or [])) for t in conv.turns], conv.session.tokens


def still_works(conv) -> str | None:
    try:
        reply = "".join(conv.send([MI.text("hello again")], GREEDY_CFG, max_new_tokens=2))
        conv.reset()
        return None if conv.last_stats is not None or reply is not None else "no stats"
    except Exception as e:  # noqa: BLE001
        return f"the conversation no longer works: {type(e).__name__}: {e}"


# =========================================================================== media through a Conversation


@pytest.mark.parametrize("kind", ["image", "audio"])
def test_hostile_media_through_a_conversation(kind, engines_, tmp_path):
    engine = engines_[kind]
    conv = Conversation(engine)
    conv.send([MI.text("hi")], GREEDY_CFG, max_new_tokens=2).close()
    problems, tally, slowest = [], {"accepted": 0, "refused": 0}, []
    for case in [c for c in MEDIA_CASES if c.kind == kind]:
        before = snapshot(conv)
        refused = None
        t0 = time.perf_counter()
        with limits(**case.limits):
            try:
                gen = conv.send([medium(case, tmp_path), MI.text("what is this?")], GREEDY_CFG, max_new_tokens=2)
                "".join(gen)
            except EngineError as e:
                refused = str(e)
            except Exception as e:  # noqa: BLE001 - the failure this suite exists to catch
                problems.append(f"{case.id}: {type(e).__name__} escaped: {e}")
                continue
        elapsed = time.perf_counter() - t0
        tally["refused" if refused is not None else "accepted"] += 1
        slowest.append((round(elapsed, 2), case.id))
        problem = outcome_problem(case.id, case.expect, refused, case.match, elapsed)
        if problem:
            problems.append(problem)
        if refused is not None and snapshot(conv) != before:
            problems.append(f"{case.id}: refused, but the conversation changed")
        broken = still_works(conv)
        if broken:
            problems.append(f"{case.id}: {broken}")
            conv = Conversation(engine)
        conv.send([MI.text("hi")], GREEDY_CFG, max_new_tokens=2).close()
    n = len([c for c in MEDIA_CASES if c.kind == kind])
    print(f"\n{kind}: {n} cases through a Conversation: {tally}; slowest {sorted(slowest, reverse=True)[:3]}")
    conv.close()
    assert not problems, "\n".join(problems)


# =========================================================================== media through the UI


def ui_call(c: Client, api: str, *args, **kw):
    params = {**GREEDY, "max_new": 2, "stored": EMPTY_STORE, **kw}
    if api in ("/reset", "/undo", "/rewind", "/import"):
        params = {k: params[k] for k in ("system_prompt", "raw", "stored")}
    return c.predict(*args, api_name=api, **params)


def run_ui_cases(c: Client, demo, cases, tmp: Path, problems: list, tally: dict) -> None:
    """Send each case's file in one tab; check the outcome, the box, the conversation."""
    tab = None
    for case in cases:
        path = tmp / f"{case.id}{case.ext}"
        path.write_bytes(case.make())
        box = {"text": f"about {case.id}", "files": [handle_file(str(path))]}
        tab = demo.sessions.get(c.session_hash)
        before = [(t.role, t.text) for t in tab.conv.turns] if tab is not None else []
        t0 = time.perf_counter()
        with limits(**case.limits):
            try:
                out = ui_call(c, "/send", box)
            except Exception as e:  # noqa: BLE001
                problems.append(f"{case.id}: the call failed: {type(e).__name__}: {e}")
                continue
        elapsed = time.perf_counter() - t0
        tally.setdefault("slowest", []).append((round(elapsed, 2), case.id))
        tab = demo.sessions.get(c.session_hash)
        status = shown(out).status
        refused = status[2:].strip() if status.startswith("⚠") else None
        tally["refused" if refused is not None else "accepted"] += 1
        problem = outcome_problem(case.id, case.expect, refused, case.match, elapsed)
        if problem:
            problems.append(problem)
        if refused is not None:
            if path.name not in refused and not re.search(r"input \d+", refused):
                problems.append(f"{case.id}: the message names neither the file nor the input: {refused!r}")
            if shown(out).box != UNCHANGED:
                problems.append(f"{case.id}: refused, but the box was changed (typed text lost): {shown(out).box!r}")
            if tab is not None and [(t.role, t.text) for t in tab.conv.turns] != before:
                problems.append(f"{case.id}: refused, but the conversation changed")
        else:
            if tab is None or tab.conv.turns[-1].role != "assistant":
                problems.append(f"{case.id}: accepted, but no reply")
            tab.conv.reset()  # room for the next case (the UI's Reset is tested elsewhere)
    # The server is alive and the tab still works.
    out = ui_call(c, "/send", {"text": "still there?", "files": []})
    if shown(out).status.startswith("⚠") or not reply_text(shown(out).chat):
        problems.append(f"after the cases the tab no longer answers: {shown(out).status!r}")


@pytest.mark.parametrize("kind", ["image", "audio"])
def test_hostile_media_through_the_ui(kind, apps, tmp_path):
    """UI_TABS tabs share the cases (the server's own concurrency); cases that lower a
    process-wide limit run alone, afterwards."""
    url, demo = apps[kind]
    cases = [x for x in MEDIA_CASES if x.kind == kind and x.ext]
    shared, alone = [x for x in cases if not x.limits], [x for x in cases if x.limits]
    clients = [Client(url, verbose=False, download_files=False) for _ in range(UI_TABS)]
    problems, tally = [], {"accepted": 0, "refused": 0}
    threads = [threading.Thread(target=run_ui_cases, args=(c, demo, shared[k::UI_TABS], tmp_path, problems, tally))
               for k, c in enumerate(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    run_ui_cases(clients[0], demo, alone, tmp_path, problems, tally)
    slowest = sorted(tally.pop("slowest"), reverse=True)[:3]
    print(f"\n{kind}: {len(cases)} cases through the UI: {tally}; slowest {slowest}")
    assert not problems, "\n".join(problems)


# =========================================================================== transcripts


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def transcript_cases(engine) -> list[tuple[str, object, str, str]]:
    """(id, messages, expect, match). expect: "refuse", "accept" or "note" (accepted with a note)."""
    hi = {"role": "user", "content": "hi"}
    reply_ids = engine.tokenize([MI.text("Hello there")])
    good = [hi, {"role": "assistant", "content": "Hello there", "token_ids": reply_ids}]
    role = r"message \d+ needs a role of system, user, assistant"
    cases = [("valid", good, "accept", ""), ("empty-list", [], "accept", "")]
    for name, messages in (("dict", {"messages": good}), ("string", "hi"), ("none", None), ("number", 5)):
        cases.append((f"not-a-list-{name}", messages, "refuse", r"messages must be a list"))
    for name, m in (("string", "hi"), ("number", 5), ("none", None), ("list", [hi])):
        cases.append((f"message-is-{name}", [m], "refuse", role))
    for r in ("tool", "function", "wizard", "", None, 5, "USER", "system ", ["user"]):
        cases.append((f"role-{r!r}", [{"role": r, "content": "hi"}], "refuse", role))
    cases.append(("role-missing", [{"content": "hi"}], "refuse", role))
    cases.append(("system-not-first", [hi, {"role": "system", "content": "be brief"}], "refuse",
                  r"message 1: a system message may only come first"))
    content = r"message 0: content must be a str or a non-empty list of parts"
    part_type = r"message 0 part 0: type must be text, image or audio"
    for name, c, match in (
        ("none", None, content), ("number", 5, content), ("dict", {"text": "hi"}, content), ("empty-list", [], content),
        ("empty-string", "", r"message 0 is empty"),
        ("part-number", [5], part_type), ("part-video", [{"type": "video", "data": "AAAA"}], part_type),
        ("part-text-number", [{"type": "text", "text": 5}], part_type),
        ("part-text-missing", [{"type": "text"}], part_type),
        ("image-no-data", [{"type": "image"}], r"message 0 part 0: image must be embedded as base64 'data'"),
        ("image-path", [{"type": "image", "path": "/etc/passwd"}], r"never reads file paths or URLs"),
        ("image-url", [{"type": "image", "url": "http://example.com/x.png"}], r"never reads file paths or URLs"),
        ("image-bad-base64", [{"type": "image", "data": "!!!not base64!!!"}], r"'data' is not valid base64"),
        ("image-text-bytes", [{"type": "image", "data": b64(b"hello")}], r"message 0: input 0: not a readable image"),
        ("image-bomb", [{"type": "image", "data": b64(png_header_only(20000, 20000))}],
         r"message 0: input 0: image of [\d,]+ pixels exceeds the limit of 50,000,000 pixels"),
        ("audio-to-image-model", [{"type": "audio", "data": b64(encode_audio(CLIP, 16000))}],
         r"message 0: input 0 is audio, but .* takes only image, text, tokens"),
        ("tokens-negative", [{"type": "tokens", "ids": [-1]}], r"tokens input must hold non-negative ints"),
        ("tokens-out-of-vocab", [{"type": "tokens", "ids": [10**9]}],
         r"message 0: input 0 has token id 1000000000, outside the vocabulary of \d+"),
        ("tokens-string", [{"type": "tokens", "ids": "abc"}], r"tokens input must hold non-negative ints"),
        ("tokens-number", [{"type": "tokens", "ids": 5}], r"tokens input must be a list of ints"),
        ("tokens-float", [{"type": "tokens", "ids": [1.5]}], r"tokens input must hold non-negative ints"),
        ("text-with-placeholder", "see <image> here", r"message 0: input 0 holds the media placeholder id"),
    ):
        cases.append((f"user-content-{name}", [{"role": "user", "content": c}], "refuse", match))
    reply = r"message 1: assistant content must be a str"
    for name, c in (("number", 5), ("none", None), ("list", [{"type": "text", "text": "x"}])):
        cases.append((f"assistant-content-{name}", [hi, {"role": "assistant", "content": c}], "refuse", reply))
    note = r"token ids not used"
    for name, ids in (("out-of-vocab", [10**9]), ("negative", [-1]), ("string", "abc"), ("number", 5),
                      ("float", [1.5])):
        cases.append((f"assistant-token-ids-{name}",
                      [hi, {"role": "assistant", "content": "Hello", "token_ids": ids}], "note", note))
    cases.append(("assistant-other-tokenizer", [hi, {"role": "assistant", "content": "Hello", "token_ids": reply_ids,
                                                    "model": {"name": "other", "tokenizer": "0123456789abcdef"}}],
                  "note", r"exported by other with a different tokenizer"))
    samp = r"message 1: sampling: "
    for name, sampling, match in (("negative-temperature", {"temperature": -1}, samp + "temperature must be >= 0"),
                                  ("temperature-string", {"temperature": "hot"}, samp + "temperature must be a finite"),
                                  ("unknown-key", {"warmth": 3}, samp + "unknown sampling keys"),
                                  ("not-a-dict", "greedy", samp + "sampling must be a dict"),
                                  ("huge-seed", {"seed": 2**80}, samp + "seed must be an int in 0..2\\*\\*63-1")):
        cases.append((f"sampling-{name}", [hi, {"role": "assistant", "content": "x", "sampling": sampling}],
                      "refuse", match))
    cases.append(("too-long-for-the-context", [{"role": "user", "content": "hello " * 3000}], "refuse",
                  r"exceeds the context of 512|the context is 512"))
    cases.append(("siblings-not-a-list", [hi, {"role": "assistant", "content": "x", "siblings": "nope"}], "refuse",
                  r"message 1: siblings must be a list"))
    return cases


def test_malformed_transcripts_through_a_conversation(engines_):
    engine = engines_["image"]
    problems, tally = [], {"accepted": 0, "refused": 0}
    open_before = engine.open_sessions
    for case_id, messages, expect, match in transcript_cases(engine):
        t0 = time.perf_counter()
        refused, conv = None, None
        try:
            conv = Conversation.from_messages(engine, messages)  # prefill=True: the KV is rebuilt now
        except EngineError as e:
            refused = str(e)
        except Exception as e:  # noqa: BLE001
            problems.append(f"{case_id}: {type(e).__name__} escaped: {e}")
            continue
        elapsed = time.perf_counter() - t0
        tally["refused" if refused is not None else "accepted"] += 1
        problem = outcome_problem(case_id, "accept" if expect == "note" else expect, refused, match, elapsed)
        if problem:
            problems.append(problem)
        if conv is not None:
            notes = " ".join(conv.import_notes)
            if expect == "note" and not re.search(match, notes):
                problems.append(f"{case_id}: imported without the note {match!r} ({notes!r})")
            broken = still_works(conv)
            if broken:
                problems.append(f"{case_id}: {broken}")
            conv.close()
        if engine.open_sessions != open_before:
            problems.append(f"{case_id}: a session slot leaked ({engine.open_sessions} open)")
    print(f"\ntranscripts: {sum(tally.values())} cases through a Conversation: {tally}")
    assert not problems, "\n".join(problems)


def ui_import(c: Client, path: Path):
    return c.predict(handle_file(str(path)), "", False, EMPTY_STORE, api_name="/import")


def test_malformed_transcripts_through_the_ui(engines_, apps, tmp_path):
    """Each file is imported into a tab that holds a conversation: a refused import leaves it as it was."""
    url, demo = apps["image"]
    engine = engines_["image"]
    bad_json = r"The transcript is not valid JSON"
    not_transcript = r"This file is not a transcript: expected a JSON list of messages or an object with \"messages\""
    # Where the UI decides otherwise: it reads files, not lists; the system prompt box replaces a
    # transcript's system messages; the KV is rebuilt by the next action, which then says the
    # context is full.
    ui_expect = {"not-a-list-string": ("refuse", not_transcript), "not-a-list-none": ("refuse", not_transcript),
                 "not-a-list-number": ("refuse", not_transcript), "system-not-first": ("accept", ""),
                 "too-long-for-the-context": ("accept", "")}
    files = []
    for case_id, messages, expect, match in transcript_cases(engine):
        if isinstance(messages, dict) or messages == []:  # an object with "messages" is the export format
            continue
        expect, match = ui_expect.get(case_id, (expect, match))
        files.append((case_id, json.dumps(messages).encode(), expect, match))
    files += [
        ("json-truncated", b'[{"role": "user", "content": "hi"', "refuse", bad_json),
        ("json-trailing-comma", b'[{"role": "user", "content": "hi"},]', "refuse", bad_json),
        ("json-single-quotes", b"[{'role': 'user'}]", "refuse", bad_json),
        ("json-binary", bytes(range(256)) * 4, "refuse", bad_json),
        ("json-latin1", '[{"role": "user", "content": "caf\u00e9"}]'.encode("latin-1"), "refuse", bad_json),
        ("json-empty-file", b"", "refuse", bad_json),
        ("json-utf16", json.dumps([{"role": "user", "content": "hi"}]).encode("utf-16"), "refuse", bad_json),
        ("json-deeply-nested", b"[" * 100_000 + b"]" * 100_000, "refuse", r"nested too deeply|not valid JSON"),
        ("json-object-without-messages", b'{"format": "llm-playground-transcript"}', "refuse", not_transcript),
        ("json-number", b"42", "refuse", not_transcript),
        ("json-export-format", json.dumps({"format": "llm-playground-transcript", "messages": [
            {"role": "user", "content": "hi"}]}).encode(), "accept", ""),
        ("too-many-messages", json.dumps([{"role": "user", "content": "a"}] * 600).encode(), "refuse",
         r"The transcript has 600 messages; a context of 512 tokens cannot hold them"),
        ("file-of-50-MB", b"[" + b'{"role": "user", "content": "' + b"x" * (50 << 20) + b'"}]', "refuse",
         r"is 50\.0 MB, over the 5 MB limit for a transcript"),
    ]
    problems, tally = [], {"accepted": 0, "refused": 0}

    def run(c: Client, chunk):
        ui_call(c, "/send", {"text": "keep me", "files": []})
        kept = [(t.role, t.text) for t in demo.sessions.get(c.session_hash).conv.turns]
        for case_id, data, expect, match in chunk:
            path = tmp_path / f"{case_id}.json"
            path.write_bytes(data)
            t0 = time.perf_counter()
            try:
                out = ui_import(c, path)
            except Exception as e:  # noqa: BLE001
                problems.append(f"{case_id}: the call failed: {type(e).__name__}: {e}")
                continue
            elapsed = time.perf_counter() - t0
            tab = demo.sessions.get(c.session_hash)
            refused = shown(out).status[2:].strip() if shown(out).status.startswith("⚠") else None
            tally["refused" if refused is not None else "accepted"] += 1
            problem = outcome_problem(case_id, "accept" if expect == "note" else expect, refused, match, elapsed)
            if problem:
                problems.append(problem)
            if refused is not None and [(t.role, t.text) for t in tab.conv.turns] != kept:
                problems.append(f"{case_id}: refused, but the tab's conversation changed")
            if refused is None:  # accepted: the tab answers, then gets its conversation back
                out = ui_call(c, "/send", {"text": "and now?", "files": []})
                if shown(out).status.startswith("⚠") and "context is full" not in shown(out).status:
                    problems.append(f"{case_id}: after the import the tab fails: {shown(out).status!r}")
                ui_call(c, "/reset")
                ui_call(c, "/send", {"text": "keep me", "files": []})
                kept = [(t.role, t.text) for t in demo.sessions.get(c.session_hash).conv.turns]

    clients = [Client(url, verbose=False, download_files=False) for _ in range(UI_TABS)]
    threads = [threading.Thread(target=run, args=(c, files[k::UI_TABS])) for k, c in enumerate(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    print(f"\ntranscripts: {len(files)} cases through the UI: {tally}")
    assert not problems, "\n".join(problems)


# =========================================================================== absurd API arguments


def api_cases():
    """(id, call(conv), match): each must raise InvalidArgument naming the argument and its range."""
    nan, inf = float("nan"), float("inf")
    hello = [MI.text("hello")]
    cases = []
    for field_, values, match in (
        ("temperature", (nan, inf, -inf, -1, "hot", None, True), r"temperature must be"),
        ("top_p", (0, 1.5, nan, -1, "x"), r"top_p must be"),
        ("top_k", (-1, 1.5, True, "5", nan), r"top_k must be an int >= 0"),
        ("repetition_penalty", (0, -1, inf, nan), r"repetition_penalty must be"),
        ("seed", (-1, 2**63, 10**30, 1.5, "7", True, nan), r"seed must be an int in 0\.\.2\*\*63-1 or None"),
    ):
        for v in values:
            cases.append((f"sampling-{field_}-{v!r}", lambda c, f=field_, v=v: SamplingConfig(**{f: v}), match))
    for v in (0, -1, -10**12, 1.5, True, "5", None, nan):
        cases.append((f"max-new-{v!r}", lambda c, v=v: c.send(hello, GREEDY_CFG, v),
                      r"max_new_tokens must be an int >= 1"))
    for v in ("stop", [""], [5], None):
        cases.append((f"stop-strings-{v!r}", lambda c, v=v: c.send(hello, GREEDY_CFG, 4, stop_strings=v),
                      r"stop_strings must be a list of non-empty strings"))
    for v in ([], None, "", "   ", [5], [MI.text("  ")], 5):
        cases.append((f"parts-{v!r}", lambda c, v=v: c.send(v, GREEDY_CFG, 4),
                      r"a message needs at least one part|the message is empty|is a \w+, not a MultimodalInput"))
    cases.append(("sampling-not-a-config", lambda c: c.send(hello, {"temperature": 0}, 4),
                  r"sampling must be a SamplingConfig"))
    for i in (-1, 2, 10**9, 1.5, True, "0", None):
        cases.append((f"edit-turn-{i!r}", lambda c, i=i: c.edit(i, hello, GREEDY_CFG, 4), r"turn index .* is outside 0\.\.1"))
    for i, off, match in ((-1, 0, r"turn index -1 is outside"), (5, 0, r"turn index 5 is outside"),
                          (0, 0, r"turn 0 is a user turn; rewind takes an assistant turn"),
                          (1, -1, r"token_offset -1 is outside 0\.\.\d+ for turn 1"),
                          (1, 10**9, r"token_offset 1000000000 is outside"), (1, 1.5, r"token_offset 1.5 is outside"),
                          (1, nan, r"token_offset nan is outside")):
        cases.append((f"rewind-{i!r}-{off!r}", lambda c, i=i, off=off: c.rewind(i, off), match))
    cases.append(("drop-from-99", lambda c: c.drop_from(99), r"turn index 99 is outside 0\.\.2"))
    return cases


def test_absurd_api_arguments_through_a_conversation(engines_):
    engine = engines_["image"]
    conv = Conversation(engine)
    "".join(conv.send([MI.text("hi")], GREEDY_CFG, 3))
    before = snapshot(conv)
    problems = []
    cases = api_cases()
    for case_id, call, match in cases:
        t0 = time.perf_counter()
        try:
            out = call(conv)
            if hasattr(out, "close"):
                out.close()
            problems.append(f"{case_id}: accepted, expected InvalidArgument matching {match!r}")
        except EngineError as e:
            if not re.search(match, str(e)):
                problems.append(f"{case_id}: message {str(e)!r} does not match {match!r}")
        except Exception as e:  # noqa: BLE001
            problems.append(f"{case_id}: {type(e).__name__} escaped: {e}")
        if time.perf_counter() - t0 > CASE_LIMIT_S:
            problems.append(f"{case_id}: took too long")
        if snapshot(conv) != before:
            problems.append(f"{case_id}: the conversation changed")
    # A huge max_new_tokens is the caller's loop, not an error: it runs to the context's end.
    t0 = time.perf_counter()
    "".join(conv.send([MI.text("go on")], SamplingConfig(temperature=1.0, seed=3), 10**12))
    took = time.perf_counter() - t0
    if conv.last_stats.finish_reason not in ("eos", "context_full") or took > CASE_LIMIT_S:
        problems.append(f"max_new 10**12: finished {conv.last_stats.finish_reason!r} in {took:.1f} s")
    # A consumer that walks away mid-stream (a client disconnecting) leaves a usable conversation.
    gen = conv.regenerate(SamplingConfig(temperature=1.0, seed=4), 10**6)
    for _, _piece in zip(range(5), gen):
        pass
    gen.close()
    if conv.last_stats.finish_reason != "stopped" or conv.turns[-1].role != "assistant":
        problems.append(f"abandoned stream: finish {conv.last_stats.finish_reason!r}")
    broken = still_works(conv)
    if broken:
        problems.append(f"after the cases: {broken}")
    conv.close()
    print(f"\napi: {len(cases) + 2} cases through a Conversation")
    assert not problems, "\n".join(problems)


def test_absurd_api_arguments_through_the_ui(apps):
    """What gradio_client can send. (It refuses NaN and inf itself: JSON has none; a raw
    request's NaN reaches `make_sampling`, which refuses non-finite values.)"""
    url, demo = apps["image"]
    c = Client(url, verbose=False, download_files=False)
    ui_call(c, "/send", {"text": "hi", "files": []})
    tab = demo.sessions.get(c.session_hash)
    hi = {"text": "hi", "files": []}
    gradio_range = r"Value .* is (less|greater) than (minimum|maximum) value"
    gradio_type = r"Could not preprocess input component at index \d+ \(a `\w+` component\).*Expected a `float"
    cases = [  # (id, api, args, params, match of the error or ⚠️ status)
        ("temperature-negative", "/send", (hi,), {"temperature": -1}, gradio_range),
        ("temperature-text", "/send", (hi,), {"temperature": "hot"}, gradio_type),
        ("temperature-none", "/send", (hi,), {"temperature": None}, gradio_type),
        ("top-p-zero", "/send", (hi,), {"top_p": 0}, gradio_range),
        ("top-k-negative", "/send", (hi,), {"top_k": -3}, gradio_range),
        ("rep-zero", "/send", (hi,), {"rep": 0}, gradio_range),
        ("max-new-negative", "/send", (hi,), {"max_new": -5}, gradio_range),
        ("max-new-zero", "/send", (hi,), {"max_new": 0}, gradio_range),
        ("max-new-huge", "/send", (hi,), {"max_new": 10**12}, gradio_range),
        ("max-new-text", "/send", (hi,), {"max_new": "lots"}, gradio_type),
        ("seed-huge", "/send", (hi,), {"seed": 1e300}, r"seed must be an int in 0\.\.2\*\*63-1"),
        ("seed-2**70", "/send", (hi,), {"seed": 2**70}, r"seed must be an int in 0\.\.2\*\*63-1"),
        ("seed-text", "/send", (hi,), {"seed": "x"}, r"Could not preprocess input component"),
        ("box-empty", "/send", ({"text": "   ", "files": []},), {}, r"The message is empty"),
        ("box-missing-file", "/send", ({"text": "x", "files": ["/nonexistent/x.png"]},), {},
         r"validation error for MultimodalData"),  # Gradio's own check: a file must be uploaded
        ("edit-turn-huge", "/edit", (10**9, "x"), {}, r"turn index 1000000000 is outside 0\.\.1"),
        ("edit-turn-negative", "/edit", (-3, "x"), {}, r"turn index -3 is outside"),
        ("edit-empty-text", "/edit", (0, ""), {}, r"The edited message is empty"),
        ("rewind-turn-huge", "/rewind", (10**9, 0), None, r"turn index 1000000000 is outside"),
        ("rewind-offset-negative", "/rewind", (1, -1), None, r"token_offset -1 is outside"),
        ("rewind-offset-huge", "/rewind", (1, 10**12), None, r"token_offset 1000000000000 is outside"),
        ("rewind-user-turn", "/rewind", (0, 0), None, r"turn 0 is a user turn"),
    ]
    problems = []
    for case_id, api, args, params, match in cases:
        before = [(t.role, t.text) for t in tab.conv.turns]
        t0 = time.perf_counter()
        try:
            if params is None:  # /rewind takes (turn_index, offset, system_prompt, raw, stored)
                out = c.predict(*args, "", False, EMPTY_STORE, api_name=api)
            else:
                out = ui_call(c, api, *args, **params)
            text, ok = shown(out).status, shown(out).status.startswith("⚠")
        except Exception as e:  # noqa: BLE001 - Gradio's own checks answer with an error message
            text, ok = str(e), True
        if not ok:
            problems.append(f"{case_id}: accepted ({text!r}), expected {match!r}")
        elif not re.search(match, text, re.S):
            problems.append(f"{case_id}: {text!r} does not match {match!r}")
        if time.perf_counter() - t0 > CASE_LIMIT_S:
            problems.append(f"{case_id}: took too long")
        if [(t.role, t.text) for t in tab.conv.turns] != before:
            problems.append(f"{case_id}: the conversation changed")
    # A junk browser-stored transcript does not lock a new tab out.
    d = Client(url, verbose=False, download_files=False)
    out = ui_call(d, "/send", hi, stored="junk")
    if shown(out).status.startswith("⚠"):
        problems.append(f"stored=junk: {shown(out).status!r}")
    out = ui_call(d, "/send", hi, stored={"messages": [{"role": "wizard"}]})
    if shown(out).status.startswith("⚠"):
        problems.append(f"stored with a bad role: {shown(out).status!r}")
    out = ui_call(c, "/send", hi)
    if shown(out).status.startswith("⚠"):
        problems.append(f"after the cases the tab fails: {shown(out).status!r}")
    print(f"\napi: {len(cases) + 3} cases through the UI")
    assert not problems, "\n".join(problems)


# =========================================================================== stop storms, disconnects, limits

LONG = {"text": "Write a very long story about a dragon who learns to bake bread.", "files": []}
GRACE_S = 1.0  # how long a Stop that found nothing running pre-empts later actions (sessions.STOP_GRACE_S)
MAX_NEW = 400  # tokens of a long reply: about 2 s on the tiny model here
DISCONNECTING_CLIENT = """
import sys
from gradio_client import Client
c = Client(sys.argv[1], verbose=False)
print(c.session_hash, flush=True)
job = c.submit({"text": "Write a very long story about the sea.", "files": []}, api_name="/send", temperature=0,
               top_p=1, top_k=0, rep=1, seed=0, max_new=400, stops="", system_prompt="", raw=False,
               stored={"messages": []})
for _ in job:
    print("chunk", flush=True)
"""


@pytest.fixture(scope="module")
def stop_app(engines_):
    """Replies of up to MAX_NEW tokens (the tiny model writes no EOS in them): a Stop that was
    lost shows as a reply that ran to its length instead of one that ended "stopped"."""
    with running_app(engines_["image"], max_sessions=3, max_new_tokens_cap=MAX_NEW) as (url, demo):
        demo.sessions.stop_grace_s = GRACE_S
        yield url, demo


def submit_long(c: Client):
    return c.submit(LONG, api_name="/send", **{**GREEDY, "max_new": MAX_NEW, "stored": EMPTY_STORE})


def check_follow_up(c: Client, demo, problems: list, case_id: str) -> None:
    """The tab works normally afterwards: a Send asked for once the Stop's grace has passed
    is not pre-empted by the earlier Stops."""
    time.sleep(GRACE_S)
    out = c.predict({"text": "Say yes.", "files": []}, api_name="/send", **{**GREEDY, "max_new": 4,
                                                                             "stored": EMPTY_STORE})
    tab = demo.sessions.get(c.session_hash)
    if shown(out).status.startswith("⚠") or "Stopped" in shown(out).status or tab.conv.last_stats.finish_reason == "stopped":
        problems.append(f"{case_id}: the next Send did not run normally: {shown(out).status!r}")


def stop_right_after_first_send(url, demo, delay: float, case_id: str, problems: list, took: list) -> None:
    c = Client(url, verbose=False, download_files=False)
    job = submit_long(c)
    time.sleep(delay)
    t0 = time.perf_counter()
    c.predict(api_name="/stop")
    try:
        out = job.result(timeout=CASE_LIMIT_S)
    except Exception as e:  # noqa: BLE001
        problems.append(f"{case_id}: the stream did not end within {CASE_LIMIT_S} s of the Stop ({e!r})")
        return
    took.append(time.perf_counter() - t0)
    tab = demo.sessions.get(c.session_hash)
    status = shown(out).status
    if status.startswith("⚠"):
        problems.append(f"{case_id}: error status {status!r}")
    elif status.startswith("Stopped before it started"):  # pre-empted: nothing sent, the box untouched
        if shown(out).box != UNCHANGED or (tab is not None and tab.conv.turns):
            problems.append(f"{case_id}: pre-empted, but the box or the conversation changed")
    else:  # it had started: the message is in the conversation, the reply stopped early
        turns = tab.conv.turns
        if [t.role for t in turns] != ["user", "assistant"] or turns[0].text != LONG["text"]:
            problems.append(f"{case_id}: the message was lost: {[(t.role, t.text[:20]) for t in turns]}")
        elif tab.conv.last_stats.finish_reason != "stopped":
            problems.append(f"{case_id}: the reply ran on ({tab.conv.last_stats.finish_reason}, "
                            f"{len(turns[-1].token_ids)} tokens): the Stop was lost")
    check_follow_up(c, demo, problems, case_id)
    demo.sessions.close(c.session_hash)


def test_a_stop_right_after_a_new_tabs_first_send_is_never_lost(stop_app):
    """The issue's failure: 8 of 8 such Stops were lost (the tab did not exist yet)."""
    url, demo = stop_app
    problems, took = [], []
    delays = [0.0, 0.02, 0.05, 0.1] * 2
    for k in range(0, len(delays), 3):  # three new tabs at a time
        threads = [threading.Thread(target=stop_right_after_first_send,
                                    args=(url, demo, d, f"stop-after-{d}s-#{k + j}", problems, took))
                   for j, d in enumerate(delays[k:k + 3])]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    print(f"\nstop right after a new tab's first Send: {len(delays)} cases, the stream ended "
          f"{max(took, default=0) * 1000:.0f} ms after the Stop at most")
    assert not problems, "\n".join(problems)
    assert len(took) == len(delays)


def test_fifty_rapid_stops_and_stops_before_the_tab_exists(stop_app):
    url, demo = stop_app
    problems = []
    # 50 Stops while streaming, from 5 threads at once.
    c = Client(url, verbose=False, download_files=False)
    job = submit_long(c)
    wait_until(lambda: (tab := demo.sessions.get(c.session_hash)) is not None and tab.streaming
               and tab.conv.turns and tab.conv.turns[-1].token_ids, timeout=60)
    t0 = time.perf_counter()
    errors = []

    def storm():
        for _ in range(10):
            try:
                c.predict(api_name="/stop")
            except Exception as e:  # noqa: BLE001
                errors.append(e)

    threads = [threading.Thread(target=storm) for _ in range(5)]
    for t in threads:
        t.start()
    out = job.result(timeout=CASE_LIMIT_S)
    for t in threads:
        t.join(CASE_LIMIT_S)
    took = time.perf_counter() - t0
    if errors or took > CASE_LIMIT_S or shown(out).status.startswith("⚠"):
        problems.append(f"50 Stops while streaming: {len(errors)} failed, {took:.1f} s, status {shown(out).status!r}")
    if demo.sessions.get(c.session_hash).conv.last_stats.finish_reason != "stopped":
        problems.append("50 Stops while streaming: the reply was not stopped")
    check_follow_up(c, demo, problems, "after 50 Stops while streaming")
    # 50 Stops on an idle tab, then a Send: it runs (the Stops came before it was asked for).
    threads = [threading.Thread(target=storm) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(CASE_LIMIT_S)
    check_follow_up(c, demo, problems, "50 Stops on an idle tab")
    demo.sessions.close(c.session_hash)
    # A Stop before the tab exists, then a Send asked for later: it runs.
    d = Client(url, verbose=False, download_files=False)
    d.predict(api_name="/stop")
    check_follow_up(d, demo, problems, "a Stop before the tab existed")
    demo.sessions.close(d.session_hash)
    # ... but a Send that raced it (asked for within the grace) is pre-empted, its text kept.
    e = Client(url, verbose=False, download_files=False)
    e.predict(api_name="/stop")
    out = e.predict(LONG, api_name="/send", **{**GREEDY, "max_new": MAX_NEW, "stored": EMPTY_STORE})
    if not shown(out).status.startswith("Stopped before it started") or shown(out).box != UNCHANGED:
        problems.append(f"a Send racing a Stop: {shown(out).status!r}, box {shown(out).box!r}")
    demo.sessions.close(e.session_hash)
    print(f"\n50 Stops while streaming: the stream ended and the storm returned in {took:.2f} s")
    assert not problems, "\n".join(problems)


def test_a_client_that_disconnects_mid_stream(stop_app):
    url, demo = stop_app
    proc = subprocess.Popen([sys.executable, "-c", DISCONNECTING_CLIENT, url], stdout=subprocess.PIPE, text=True)
    try:
        key = proc.stdout.readline().strip()
        for _ in range(3):
            proc.stdout.readline()  # the reply streams
        tab = demo.sessions.get(key)
        assert tab is not None and tab.streaming
        proc.kill()
        t0 = time.perf_counter()
        took = wait_until(lambda: not tab.streaming, timeout=CASE_LIMIT_S)
    finally:
        proc.kill()
        proc.wait()
    assert tab.conv.last_stats.finish_reason == "stopped" and tab.conv.turns[-1].role == "assistant"
    print(f"\na client killed mid-stream: the server's stream ended {took * 1000:.0f} ms later")
    c = Client(url, verbose=False, download_files=False)  # the server serves the next person
    check_follow_up(c, demo, [], "after a disconnect")
    demo.sessions.close(c.session_hash)
    demo.sessions.close(key)
    assert time.perf_counter() - t0 < 2 * CASE_LIMIT_S


def test_rate_limit_and_prompt_limit(engines_):
    """A script hammering one tab is refused quickly, and other tabs are served meanwhile; a
    message over the prompt limit is refused before anything runs, the typed text kept."""
    engine = engines_["audio"]
    with running_app(engine, max_sessions=2, max_new_tokens_cap=4, rate_limit=RateLimit(30, burst=5),
                     max_prompt_tokens=32) as (url, demo):
        a, b = Client(url, verbose=False, download_files=False), Client(url, verbose=False, download_files=False)
        statuses, t0 = [], time.perf_counter()

        def hammer():
            for _ in range(4):
                statuses.append(ui_call(a, "/reset")[2])

        threads = [threading.Thread(target=hammer) for _ in range(4)]
        for t in threads:
            t.start()
        out = ui_call(b, "/send", {"text": "hi", "files": []})  # another tab is served meanwhile
        for t in threads:
            t.join(CASE_LIMIT_S)
        took = time.perf_counter() - t0
        assert not shown(out).status.startswith("⚠"), shown(out).status
        limited = [s for s in statuses if "Too many actions in this tab" in s]
        assert len(statuses) == 16 and len(limited) >= 8, statuses
        waits = [float(m.group(1)) for s in limited
                 if (m := re.search(r"at most 30 a minute \(5 at once\)\. Try again in ([\d.]+) s", s))]
        assert len(waits) == len(limited), limited
        assert took < CASE_LIMIT_S
        time.sleep(2.1)  # one action every 2 s refills
        assert not ui_call(a, "/reset")[2].startswith("⚠")
        for text, match in (("word " * 100, r"The message is \d+ tokens .*over the limit of 32 tokens per message"),
                            ("x" * 5000, r"The message is 5,000 characters long, far over the limit of 32 tokens")):
            out = ui_call(b, "/send", {"text": text, "files": []})
            assert re.search(match, shown(out).status), shown(out).status
            assert shown(out).box == UNCHANGED, "the typed text was not kept"
        assert [t.role for t in demo.sessions.get(b.session_hash).conv.turns] == ["user", "assistant"]


def test_a_stop_never_waits_behind_another_sessions_forward(engines_):
    """While another session's forward holds the weights, a decode step that is asked to stop
    ends at once without forwarding, and a seeded reply then goes on as if never stopped."""
    engine = engines_["image"]
    sampling = SamplingConfig(temperature=1.0, seed=5)
    prompt = [MI.text("Tell me a story about the sea.")]
    with engine.create_session() as ref:
        ref.prefill(prompt)
        want = [ref.decode_one(sampling).token_id for _ in range(8)]
    with engine.create_session() as s:
        s.prefill(prompt)
        got = [s.decode_one(sampling).token_id for _ in range(3)]
        pos = s.position
        engine.lock.acquire()  # another session's forward pass holds the engine, for 1.5 s
        release = threading.Timer(1.5, engine.lock.release)  # (a regression fails, rather than hangs)
        release.start()
        threading.Timer(0.1, s.stop).start()
        t0 = time.perf_counter()
        r = s.decode_one(sampling)
        took = time.perf_counter() - t0
        release.join()
        assert r.is_terminal and not r.is_eos, r
        assert s.position == pos and took < 1.0, (s.position, pos, took)
        got += [s.decode_one(sampling).token_id for _ in range(5)]
    assert got == want, "the token drawn before the stop was not put back"
