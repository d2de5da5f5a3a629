"""Widget values -> Conversation arguments, with plain-words validation.

Knows nothing of Gradio objects or tensors: it takes the MultimodalTextbox's
dict (`{"text": str, "files": [paths]}`) and control values, and returns
`MultimodalInput` parts and a `SamplingConfig`, or raises `BadInput` with a
message fit to show a person. Recordings become text through the transcriber
it is handed (`speech_to_text`); it never loads a model itself.
"""

from __future__ import annotations

import math
import mimetypes
import os
from dataclasses import dataclass

from engines import InvalidArgument, MultimodalInput, SamplingConfig
from engines.speech import LANGUAGES, SpeechError

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp"}
AUDIO_EXTS = {".wav", ".flac", ".ogg", ".oga", ".mp3", ".m4a", ".webm"}
DEFAULT_MAX_FILE_MB = 20


class BadInput(ValueError):
    """The user's input cannot be sent; the message says why and what to do."""


def describe_modalities(modalities) -> str:
    kinds = [k for k in ("text", "image", "audio") if k in modalities]
    return " and ".join(kinds) if len(kinds) < 3 else "text, images and audio"


def file_kind(path: str) -> str | None:
    """"image", "audio" or None (unsupported), from the extension, then the mime type."""
    ext = os.path.splitext(path)[1].lower()
    if ext in IMAGE_EXTS:
        return "image"
    if ext in AUDIO_EXTS:
        return "audio"
    mime = mimetypes.guess_type(path)[0] or ""
    if mime.startswith("image/"):
        return "image"
    if mime.startswith("audio/"):
        return "audio"
    return None


def parse_box(value, modalities, model_name: str, max_file_mb: float = DEFAULT_MAX_FILE_MB,
              allow_empty: bool = False, speech: bool = False) -> list[MultimodalInput]:
    """The textbox value as parts: media first, then the text (the common chat layout).

    Raises BadInput for an empty message, an unsupported or oversized file, or
    a modality the model cannot take. With `speech`, audio is to be transcribed
    (`speech_to_text`), so it passes whatever the model takes.
    """
    value = value or {}
    if isinstance(value, str):
        value = {"text": value, "files": []}
    text = value.get("text") or ""
    files = [f if isinstance(f, str) else (f.get("path") if isinstance(f, dict) else str(f))
             for f in (value.get("files") or [])]
    if not text.strip() and not files and not allow_empty:
        raise BadInput("The message is empty: type something (or attach a file) and send again.")
    parts: list[MultimodalInput] = []
    for path in files:
        name = os.path.basename(path)
        try:
            size = os.path.getsize(path)
        except OSError:
            raise BadInput(f"{name} could not be read; attach it again.") from None
        if size > max_file_mb * 1024 * 1024:
            raise BadInput(
                f"{name} is {size / 1048576:.1f} MB, over the {max_file_mb:g} MB upload limit. "
                "Attach a smaller file; your text is kept."
            )
        kind = file_kind(path)
        if kind is None:
            raise BadInput(
                f"{name} is not a supported file type. Attach images "
                f"({', '.join(sorted(e[1:] for e in IMAGE_EXTS))}) or audio "
                f"({', '.join(sorted(e[1:] for e in AUDIO_EXTS))}). Your text is kept."
            )
        if kind not in modalities and not (kind == "audio" and speech):
            what = "images" if kind == "image" else "audio (recordings or files)"
            raise BadInput(
                f"{model_name} cannot take {what}: it accepts {describe_modalities(modalities)} only. "
                f"Remove {name} and send again, or start the app with a model that takes {kind} "
                "(--model). Your text is kept."
            )
        parts.append(MultimodalInput.image(path) if kind == "image" else MultimodalInput.audio(path))
    if text.strip():  # whitespace beside an image is no message of its own
        parts.append(MultimodalInput.text(text))
    return parts


SPOKEN_MARK = "🎤 "


@dataclass(frozen=True, eq=False, repr=False)
class Spoken(MultimodalInput):
    """Text heard in a recording: plain text to the model, marked 🎤 in the chat."""

    @staticmethod
    def of(text: str) -> "Spoken":
        return Spoken("text", MultimodalInput.text(text).value)


def speech_to_text(parts, transcriber, language=None) -> tuple[list[MultimodalInput], str]:
    """`parts` with each audio part replaced by the text `transcriber` heard in it
    (`engines.speech.Transcriber`), and a note for the status line.

    Raises BadInput when a clip holds no words, cannot be read or is too short;
    the message says why, and that the typed text is kept.
    """
    out, notes = [], []
    for i, p in enumerate(parts):
        if p.kind != "audio":
            out.append(p)
            continue
        try:
            heard = transcriber.transcribe_full(p.value, p.sample_rate, language)
        except (SpeechError, InvalidArgument) as e:
            raise BadInput(f"{e} Your text is kept.") from None
        more = any(q.kind in ("text", "audio") for q in parts[i + 1:])
        out.append(Spoken.of(heard.text + ("\n\n" if more else "")))
        lang = LANGUAGES.get(heard.language, heard.language)
        note = (f"🎤 Transcribed {heard.duration_s:.1f} s of audio ({lang}{', detected' if heard.detected else ''}) "
                f"in {heard.elapsed_s:.1f} s.")
        if heard.cut_from_s is not None:
            length = "longer" if math.isinf(heard.cut_from_s) else f"{heard.cut_from_s:.1f} s long"
            note += f" The recording is {length}: only its first {heard.duration_s:.1f} s were transcribed (the limit)."
        notes.append(note)
    return out, " ".join(notes)


def parse_stop_strings(text: str | None) -> tuple[str, ...]:
    """One stop string per line; `\\n` and `\\t` escapes allowed; blank lines ignored."""
    out = []
    for line in (text or "").splitlines():
        if line.strip():
            out.append(line.replace("\\n", "\n").replace("\\t", "\t"))
    return tuple(out)


def make_sampling(temperature, top_p, top_k, repetition_penalty, seed) -> SamplingConfig:
    """A SamplingConfig from control values; blank or negative seed means random."""
    try:
        if seed is None or (isinstance(seed, float) and math.isnan(seed)) or seed == "" or float(seed) < 0:
            seed = None
        elif not math.isfinite(float(seed)):
            raise BadInput(f"seed must be a whole number (-1 = random), got {seed!r}")
        else:
            seed = int(seed)
        if not math.isfinite(float(top_k or 0)):
            raise BadInput(f"top_k must be a whole number >= 0 (0 = off), got {top_k!r}")
        return SamplingConfig(
            temperature=float(temperature if temperature is not None else 0.0),
            top_p=float(top_p if top_p is not None else 1.0),
            top_k=int(top_k or 0),
            repetition_penalty=float(repetition_penalty if repetition_penalty is not None else 1.0),
            seed=seed,
        )
    except (InvalidArgument, TypeError, ValueError, OverflowError) as e:
        raise BadInput(f"Sampling settings: {e}") from None


def clamp_new_tokens(n, cap: int) -> int:
    try:
        n = int(n)
    except (TypeError, ValueError, OverflowError):
        raise BadInput(f"max new tokens must be a whole number, got {n!r}") from None
    if n < 1:
        raise BadInput(f"max new tokens must be at least 1, got {n}")
    return min(n, cap)


@dataclass(frozen=True)
class Knobs:
    """The seven sampling controls' values, as the widgets (or an API caller) give them."""

    temperature: object = 0.7
    top_p: object = 0.95
    top_k: object = 0
    rep: object = 1.0
    seed: object = -1
    max_new: object = 64
    stops: object = ""

    def settings(self, cap: int) -> tuple[SamplingConfig, int, tuple[str, ...]]:
        """(sampling, max new tokens at most `cap`, stop strings); BadInput in plain words."""
        return (make_sampling(self.temperature, self.top_p, self.top_k, self.rep, self.seed),
                clamp_new_tokens(self.max_new, cap), parse_stop_strings(self.stops))
