"""Multimodal behaviour of engines/hf_multimodal.py on tiny offline models, per family.

Oracles: a no-cache full forward of the model with the same features, and a
fresh session prefilled with the same inputs in one call. The shared contract
suite (tests/test_contract.py) runs over these families too.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from engines import InvalidArgument, MultimodalInput as MI, NotSupported, SamplingConfig
from engines.media import load_image
from tests.cases import greedy_ids, hf_kv_held
from tests.tiny_models import BUILDERS, image, image_bytes, tiny_engine, tone

GREEDY = SamplingConfig()
ATOL = 1e-9  # float64: chunked and one-shot prefill agree to rounding
FAMILIES = list(BUILDERS)
IMAGE_FAMILIES = [f for f, (_, kind) in BUILDERS.items() if kind == "image"]
AUDIO_FAMILIES = [f for f, (_, kind) in BUILDERS.items() if kind == "audio"]

@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param, BUILDERS[request.param][1], tiny_engine(request.param)

def medium(kind, seed, **kw):
    return MI.image(image(seed, **kw)) if kind == "image" else MI.audio(tone(seed, **kw), 16000)

def prompt_with(kind, seed, **kw):
    return [MI.text("Look:"), medium(kind, seed, **kw), MI.text(" What is it?")]

def fresh(engine, inputs):
    s = engine.create_session()
    s.prefill(inputs)
    return s

def close(a, b, atol=ATOL):
    err = (a.double() - b.double()).abs().max().item()
    assert err <= atol, f"logits differ by {err:.2e}"

def full_forward(engine, ids, extras):
    """The reference: the model on the whole sequence, no cache, with media features."""
    input_ids = torch.tensor([ids])
    kw = {k: v.to(engine.dtype) if v.is_floating_point() else v for k, v in extras.items()}
    is_media = input_ids == engine.image_token_id
    if engine.mrope:
        kw["mm_token_type_ids"] = is_media.int()  # the model computes its own 3-D positions
    if engine.token_types and "pixel_values" in kw:
        kw["token_type_ids"] = is_media.long()
    inner = engine.model.model
    with torch.no_grad():
        logits = engine.model(input_ids=input_ids, use_cache=False, **kw).logits[0, -1].clone()
    if hasattr(inner, "rope_deltas"):
        inner.rope_deltas = None  # the reference must not leave state behind
    logits[sorted(engine.placeholder_ids)] = torch.finfo(logits.dtype).min
    return logits

# --------------------------------------------------------------------------- oracle

def test_decode_logits_equal_a_no_cache_full_forward_with_features(family):
    name, kind, engine = family
    # A second medium of another size or length: features of differing shapes are padded and merged.
    other = {"size": (70, 30)} if kind == "image" else {"seconds": 0.9}
    prompt = [MI.text("Compare"), medium(kind, 2), MI.text(" and"), medium(kind, 3, **other), MI.text(" now.")]
    with engine.create_session() as s:
        s.prefill(prompt[:2])  # chunked: the second medium arrives in a later prefill
        s.prefill(prompt[2:])
        gen = greedy_ids(s, 6)
        prep = engine.prepare(prompt)
        assert s.tokens == prep.ids + gen
        want = full_forward(engine, s.tokens, prep.extras)
        close(s.pending_logits, want)
        # The features matter: without them the reference differs.
        if kind == "image":
            changed = engine.prepare([MI.text("Compare"), medium(kind, 7), MI.text(" and"),
                                      medium(kind, 3, **other), MI.text(" now.")])
            assert changed.ids == prep.ids
            assert (full_forward(engine, s.tokens, changed.extras) - want).abs().max() > 1e-6

@pytest.mark.parametrize("fam", ["idefics3", "gemma3n_audio", "qwen2_vl", "llava"])
def test_merged_features_equal_the_processor_on_all_media_at_once(fam):
    engine, kind = tiny_engine(fam), BUILDERS[fam][1]
    # No bigger than the processors keep: an image we downscale first is resampled twice.
    other = {"size": (60, 30)} if kind == "image" else {"seconds": 0.9}
    media = [medium(kind, 2), medium(kind, 3, **other)]
    ours = engine.prepare(media).extras
    values = [image(2), image(3, **other)] if kind == "image" else [tone(2), tone(3, **other)]
    key = "images" if kind == "image" else "audio"
    theirs = engine.processor(text=[engine.markers[kind] * 2], **{key: values}, return_tensors="pt",
                              add_special_tokens=False)
    assert ours.keys() <= theirs.keys()
    for k, v in ours.items():
        assert torch.equal(v, theirs[k]), k

def test_media_spans_cover_exactly_the_expanded_blocks(family):
    name, kind, engine = family
    prompt = prompt_with(kind, 1)
    head = engine.tokenize(prompt[:1])
    block = engine.tokenize(prompt[1:2])
    with fresh(engine, prompt) as s:
        assert s.media_spans == [(len(head), len(head) + len(block))]
        assert set(block) & engine.placeholder_ids
        assert not set(s.tokens[: len(head)]) & engine.placeholder_ids

# --------------------------------------------------------------------------- seek

def test_seek_around_and_after_a_media_block_equals_a_fresh_session(family):
    name, kind, engine = family
    prompt = prompt_with(kind, 1)
    with fresh(engine, prompt) as s:
        greedy_ids(s, 4)
        (a, b), = s.media_spans
        ids = s.tokens
    refs = {
        a: [MI.tokens(ids[:a])],
        b: [MI.tokens(ids[:a]), prompt[1]],
        b + 2: [MI.tokens(ids[:a]), prompt[1], MI.tokens(ids[b : b + 2])],
        len(ids) - 1: [MI.tokens(ids[:a]), prompt[1], MI.tokens(ids[b:-1])],
    }
    for pos, inputs in refs.items():
        with fresh(engine, prompt) as s, fresh(engine, inputs) as ref:
            greedy_ids(s, 4)
            assert s.can_seek(pos)
            s.seek(pos)
            assert s.tokens == ids[:pos]
            assert s.media_spans == ([(a, b)] if pos >= b else [])
            close(s.pending_logits, ref.pending_logits)
            assert greedy_ids(s, 3) == greedy_ids(ref, 3)

def test_seek_into_a_media_block_is_refused_and_changes_nothing(family):
    name, kind, engine = family
    with fresh(engine, prompt_with(kind, 1)) as s:
        (a, b), = s.media_spans
        before = s.tokens, s.pending_logits.clone()
        for pos in (a + 1, (a + b) // 2, b - 1):
            assert not s.can_seek(pos)
            with pytest.raises(NotSupported, match="inside the media block"):
                s.seek(pos)
        assert s.tokens == before[0]
        assert torch.equal(s.pending_logits, before[1])
        assert s.can_seek(a) and s.can_seek(b)

def test_gemma3_sliding_window_floor_is_announced_by_can_seek():
    engine = tiny_engine("gemma3")
    window = engine.model.config.get_text_config().sliding_window
    words = MI.text(" one two three four five six seven eight nine ten" * 4)
    prompt = prompt_with("image", 1) + [words]
    with fresh(engine, prompt) as s:
        n = s.position
        (a, b), = s.media_spans
        deep = n - 2 * window
        assert deep - b > window
        # The first rewind can go back past a window: the sliding layers kept their past.
        assert s.can_seek(deep)
        s.seek(deep)
        with fresh(engine, [MI.tokens(s.tokens[:a]), prompt[1], MI.tokens(s.tokens[b:])]) as ref:
            close(s.pending_logits, ref.pending_logits)
        # After a crop a sliding layer keeps only its window: a deeper cut is refused up front.
        assert not s.can_seek(deep - 1)
        with pytest.raises(NotSupported, match="sliding-window floor"):
            s.seek(deep - 1)
        assert s.position == deep and s.can_seek(0) and s.can_seek(deep)
        assert not s.can_seek(b)  # the media block's end is below the floor too

@pytest.mark.parametrize("error", [KeyboardInterrupt("mid-crop"), RuntimeError("crop broke")], ids=["interrupt", "error"])
def test_a_failed_crop_at_a_media_block_end_poisons_the_session(error, monkeypatch):
    from engines import SessionPoisoned, kv

    def fail(*args):
        raise error

    engine = tiny_engine("llava")
    with fresh(engine, prompt_with("image", 1)) as s:
        (a, b), = s.media_spans
        monkeypatch.setattr(kv, "crop_to", fail)
        with pytest.raises(SessionPoisoned if isinstance(error, Exception) else KeyboardInterrupt):
            s.seek(b)
        monkeypatch.undo()
        with pytest.raises(SessionPoisoned, match="reset"):
            s.decode_one(GREEDY)
        s.reset()
        s.prefill(prompt_with("image", 1))
        assert s.media_spans == [(a, b)]

# --------------------------------------------------------------------------- sessions

def test_two_sessions_with_different_media_interleaved_equal_their_solo_runs(family):
    name, kind, engine = family
    pa, pb = prompt_with(kind, 4), prompt_with(kind, 5)
    assert engine.tokenize(pa) == engine.tokenize(pb)  # same placeholders, different content
    more = lambda seed: [MI.text(" And"), medium(kind, seed)]  # noqa: E731
    solo = []
    for p, seed in ((pa, 6), (pb, 7)):
        with fresh(engine, p) as s:
            s.prefill(more(seed))
            solo.append((greedy_ids(s, 6), s.tokens, s.pending_logits.clone()))
    a, b = engine.create_session(), engine.create_session()
    a.prefill(pa), b.prefill(pb), a.prefill(more(6)), b.prefill(more(7))
    got = [[], []]
    for _ in range(6):
        for k, s in enumerate((a, b)):
            got[k].append(s.decode_one(GREEDY).token_id)
    for k, s in enumerate((a, b)):
        assert got[k] == solo[k][0] and s.tokens == solo[k][1]
        close(s.pending_logits, solo[k][2])
    a.close(), b.close()
    assert (solo[0][2] - solo[1][2]).abs().max() > 1e-6  # the media made a difference

def test_qwen2_vl_rope_deltas_live_in_the_session():
    engine = tiny_engine("qwen2_vl")
    inner = engine.model.model
    with fresh(engine, prompt_with("image", 1)) as a, fresh(engine, [MI.text("plain text only")]) as b:
        (s0, s1), = a.media_spans
        grid = engine.prepare([medium("image", 1)]).extras["image_grid_thw"][0].tolist()
        # An image block of t*h*w/4 ids advances the text position by max(h, w)/2.
        n_img = s1 - s0 - 2
        assert a.rope_deltas == max(grid[1], grid[2]) // 2 - n_img
        assert b.rope_deltas == 0
        assert inner.rope_deltas is None  # the shared model holds no conversation state
        a.seek(s0)
        assert a.rope_deltas == 0

# --------------------------------------------------------------------------- media identity

def test_a_changed_image_with_identical_ids_has_a_different_key_and_logits():
    engine = tiny_engine("llava")
    one, two = MI.image(image(1)), MI.image(image(2))
    assert engine.tokenize([one]) == engine.tokenize([two])
    assert one.key() != two.key() and one != two
    assert MI.image(image(1)) == one  # equal content, equal input: the cache may be reused
    with fresh(engine, [MI.text("x"), one]) as a, fresh(engine, [MI.text("x"), two]) as b:
        assert a.tokens == b.tokens
        assert (a.pending_logits - b.pending_logits).abs().max() > 1e-6

@pytest.mark.parametrize("fam", ["qwen2_vl", "qwen2_audio"])
def test_a_conversation_never_reuses_the_cache_past_a_changed_medium(fam):
    from playground import Conversation

    engine, kind = tiny_engine(fam), BUILDERS[fam][1]
    conv = Conversation(engine)
    "".join(conv.send([medium(kind, 1), MI.text("What is it?")], GREEDY, max_new_tokens=4))
    (a, b), = conv.session.media_spans
    "".join(conv.edit(0, [medium(kind, 1), MI.text("What is it?")], GREEDY, max_new_tokens=4))
    assert conv.last_stats.reused >= b  # same content: the block stays in the cache
    "".join(conv.edit(0, [medium(kind, 2), MI.text("What is it?")], GREEDY, max_new_tokens=4))
    assert conv.last_stats.reused <= a  # same ids, new content: prefilled again from the block start
    prompt = engine.render([{"role": "user", "content": [{"type": kind, "input": medium(kind, 2)},
                                                          {"type": "text", "text": "What is it?"}]}])
    with fresh(engine, prompt) as ref:
        assert conv.session.tokens[: ref.position] == ref.tokens
        conv.session.seek(ref.position)  # the cached prompt holds the new medium's features
        close(conv.session.pending_logits, ref.pending_logits)

def test_a_changed_audio_with_identical_ids_has_a_different_key_and_logits():
    engine = tiny_engine("qwen2_audio")
    one, two = MI.audio(tone(1), 16000), MI.audio(tone(2), 16000)
    assert engine.tokenize([one]) == engine.tokenize([two]) and one != two
    with fresh(engine, [MI.text("x"), one]) as a, fresh(engine, [MI.text("x"), two]) as b:
        assert (a.pending_logits - b.pending_logits).abs().max() > 1e-6

# --------------------------------------------------------------------------- rendering

# SmolVLM's template style: content is always iterated as a list of parts.
PARTS_ONLY = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}: "
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)

def test_render_keeps_media_in_order_for_a_template_that_iterates_parts():
    engine = tiny_engine("idefics3")
    pic1, pic2 = image(1), image(2)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image", "image": pic1}, {"type": "text", "text": "and"},
                                     {"type": "image", "image": pic2}]},
        {"role": "assistant", "content": "ignored", "token_ids": [40, 41]},
        {"role": "user", "content": "Which one?"},
    ]
    inputs = engine.render(messages, chat_template=PARTS_ONLY)
    kinds = [i.kind for i in inputs]
    assert kinds == ["text", "image", "text", "image", "text", "tokens", "text"]
    assert inputs[1] == MI.image(pic1) and inputs[3] == MI.image(pic2)
    assert inputs[0].value.endswith("Be brief.<end_of_utterance>\nUser: ")
    assert inputs[-1].value.endswith("User: Which one?<end_of_utterance>\nAssistant:")
    with fresh(engine, inputs) as s:
        assert s.tokens == engine.tokenize(inputs) and len(s.media_spans) == 2

# --------------------------------------------------------------------------- image inputs

@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF"])
def test_image_formats_paths_and_bytes_are_accepted(fmt, tmp_path):
    engine = tiny_engine("llava")
    data = image_bytes(1, fmt)
    path = tmp_path / f"x.{fmt.lower()}"
    path.write_bytes(data)
    want = engine.tokenize([MI.image(image(1))])
    for value in (data, str(path), path):
        assert engine.tokenize([MI.image(value)]) == want

def test_an_animated_gif_uses_its_first_frame():
    engine = tiny_engine("llava")
    buf = io.BytesIO()
    image(1).save(buf, format="GIF", save_all=True, append_images=[image(9)], duration=100)
    first = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")  # frame 0 as GIF decodes it
    got = engine.prepare([MI.image(buf.getvalue())]).extras["pixel_values"]
    want = engine.prepare([MI.image(first)]).extras["pixel_values"]
    assert torch.equal(got, want)

def test_a_large_image_is_downscaled_to_what_the_processor_keeps():
    big = Image.new("RGB", (3000, 2000), (10, 200, 30))
    for fam, bound in (("idefics3", lambda w, h: max(w, h) <= 64), ("llava", lambda w, h: min(w, h) <= 32),
                       ("qwen2_vl", lambda w, h: w * h <= 48 * 48)):
        engine = tiny_engine(fam)
        small = load_image(big, 0, engine.image_cap())
        assert bound(*small.size), (fam, small.size)
        assert abs(small.size[0] / small.size[1] - 1.5) < 0.1  # aspect kept
        with fresh(engine, [MI.text("x"), MI.image(big)]) as s:
            assert s.media_spans

def _bad_images(tmp_path):
    fake = tmp_path / "notes.png"
    fake.write_text("these are not pixels")
    bmp = io.BytesIO()
    image(1).save(bmp, format="BMP")
    yield "corrupt png", MI.image(image_bytes(1)[:60] + b"\x00" * 40), "input 1: (not a readable|corrupt) image"
    yield "text named .png", MI.image(str(fake)), "input 1: not a readable image"
    yield "missing file", MI.image(str(tmp_path / "nope.png")), "input 1: image file not found"
    yield "bmp", MI.image(bmp.getvalue()), "input 1: image format BMP is not supported"
    yield "wrong type", MI("image", 12345), "input 1: an image must be a PIL image, a path or bytes"

@pytest.mark.parametrize("fam", IMAGE_FAMILIES)
def test_bad_images_raise_invalid_argument_naming_the_input(fam, tmp_path):
    engine = tiny_engine(fam)
    with fresh(engine, [MI.text("hello")]) as s:
        before = s.tokens, s.pending_logits.clone()
        for name, bad, message in _bad_images(tmp_path):
            with pytest.raises(InvalidArgument, match=message):
                s.prefill([MI.text("see"), bad])
            assert s.tokens == before[0] and torch.equal(s.pending_logits, before[1]), name
        with pytest.raises(NotSupported, match="input 0 is audio"):
            s.prefill([MI.audio(tone(1), 16000)])
    with pytest.raises(InvalidArgument, match="must be a PIL image"):
        MI.image(3.5)

def test_text_holding_a_placeholder_token_is_refused():
    engine = tiny_engine("llava")
    with pytest.raises(InvalidArgument, match="input 0 holds the media placeholder"):
        engine.tokenize([MI.text("sneaky <image> text")])

# --------------------------------------------------------------------------- audio inputs

@pytest.mark.parametrize("fam", AUDIO_FAMILIES)
@pytest.mark.parametrize("fmt", ["WAV", "FLAC", "OGG"])
def test_sound_files_stereo_and_other_rates_are_read_and_resampled(fmt, fam, tmp_path):
    engine = tiny_engine(fam)
    rate = 44100
    stereo = tone(1, seconds=0.6, rate=rate, channels=2)
    path = tmp_path / f"x.{fmt.lower()}"
    sf.write(path, stereo.T, rate, format=fmt)
    from_file = engine.tokenize([MI.audio(str(path))])
    from_bytes = engine.tokenize([MI.audio(path.read_bytes())])
    from_array = engine.tokenize([MI.audio(tone(1, seconds=0.6, rate=16000), 16000)])
    assert from_file == from_bytes == from_array  # same duration, same number of ids
    # Stereo is averaged to mono: the two channels give the features of their mean.
    mono = engine.prepare([MI.audio(stereo.mean(axis=0), rate)]).extras["input_features"]
    both = engine.prepare([MI.audio(stereo, rate)]).extras["input_features"]
    assert torch.equal(mono, both)

def _bad_audio(tmp_path, limit):
    fake = tmp_path / "song.wav"
    fake.write_text("not a sound")
    yield "empty", MI.audio(np.zeros(0, np.float32), 16000), "input 1: audio is empty"
    yield "corrupt", MI.audio(b"RIFF\x00\x00\x00\x00WAVEjunk"), "input 1: not a readable sound file"
    yield "text named .wav", MI.audio(str(fake)), "input 1: not a readable sound file"
    yield "missing", MI.audio(str(tmp_path / "none.wav")), "input 1: audio file not found"
    yield "too long", MI.audio(tone(1, seconds=limit + 1), 16000), r"input 1: audio of .* s exceeds the limit"
    yield "nan", MI.audio(np.full(800, np.nan, np.float32), 16000), "input 1: audio holds NaN"
    yield "wrong type", MI("audio", [0.1, 0.2], 16000), "input 1: audio must be a numpy waveform or a path"

@pytest.mark.parametrize("fam", AUDIO_FAMILIES)
def test_bad_audio_raises_invalid_argument_naming_the_input(fam, tmp_path):
    engine = tiny_engine(fam)
    with fresh(engine, [MI.text("hello")]) as s:
        before = s.tokens, s.pending_logits.clone()
        for name, bad, message in _bad_audio(tmp_path, engine.max_audio_seconds):
            with pytest.raises(InvalidArgument, match=message):
                s.prefill([MI.text("hear"), bad])
            assert s.tokens == before[0] and torch.equal(s.pending_logits, before[1]), name
        with pytest.raises(NotSupported, match="input 0 is image"):
            s.prefill([MI.image(image(1))])

def test_modalities_come_from_model_and_processor():
    for fam, (_, kind) in BUILDERS.items():
        assert tiny_engine(fam).modalities == {"text", "tokens", kind}, fam

def test_voxtral_is_refused_at_load_with_the_reason(tmp_path):
    from transformers import VoxtralConfig

    from engines import load_engine

    VoxtralConfig().save_pretrained(tmp_path)  # a config alone: refused before any weights are read
    with pytest.raises(NotSupported, match="Voxtral's processor"):
        load_engine(str(tmp_path), device="cpu")

def test_gemma3n_with_shared_kv_layers_decodes_seeks_and_sizes_its_cache():
    engine = tiny_engine("gemma3n_audio_shared_kv")
    cfg = engine.model.config.get_text_config()
    assert cfg.num_kv_shared_layers == 2
    prompt = prompt_with("audio", 1)
    with fresh(engine, prompt) as s:
        gen = greedy_ids(s, 5)
        close(s.pending_logits, full_forward(engine, s.tokens, engine.prepare(prompt).extras))
        held, _ = hf_kv_held(engine, s)
        assert held / s.position == engine.capacity.kv_bytes_per_token  # shared layers store nothing
        (a, b), = s.media_spans
        s.seek(b + 1)
        with fresh(engine, [MI.tokens(s.tokens[:a]), prompt[1], MI.tokens(s.tokens[b:])]) as ref:
            close(s.pending_logits, ref.pending_logits)
            assert greedy_ids(s, 4) == greedy_ids(ref, 4)
        assert gen
