"""Tiny random-weight multimodal models, built offline from config classes.

Each builder writes a checkpoint directory (weights, a BPE tokenizer trained
here with `tokenizers` carrying the family's special tokens, a PIL image
processor or feature extractor, a chat template) that `load_engine` then loads
through the real loading path. Nothing is downloaded. Models run in float64 so
near-flat random logits do not flip greedy ties between chunkings.
"""

from __future__ import annotations

import atexit
import functools
import io
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from transformers.utils import logging as hf_logging

from engines import load_engine

hf_logging.disable_progress_bar()  # weight loading/saving bars would flood test output

CORPUS = [
    "What is the capital of France? Paris is the capital of France.",
    "Write a haiku about the sea. Waves fold into foam, the tide hums.",
    "List three colours of the rainbow: red, green and blue.",
    "Describe this image. Listen to this sound. What do you hear? What do you see?",
    "Part B, which will be dropped. Part C instead. Hello and more.",
    "The quick brown fox jumps over the lazy dog 0123456789.",
] * 4

# One generic chat template: list content renders media with the family's marker.
TEMPLATE = (
    "{% for m in messages %}{{ BOS_MARK if loop.first else '' }}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for p in m['content'] %}"
    "{% if p['type'] == 'text' %}{{ p['text'] }}{% elif p['type'] == 'image' %}IMAGE_MARK"
    "{% elif p['type'] == 'audio' %}AUDIO_MARK{% endif %}{% endfor %}{% endif %}EOT\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _root() -> Path:
    root = Path(tempfile.mkdtemp(prefix="tiny-mm-"))
    atexit.register(shutil.rmtree, root, True)
    return root


_ROOT = functools.lru_cache(maxsize=1)(_root)


def make_tokenizer(specials: list[str], extra: dict | None = None, bos="<s>", eos="<|im_end|>"):
    """A byte-level BPE trained on CORPUS, with `specials` as special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    base = [bos, eos, "<pad>", "<|im_start|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=base + specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token="<pad>",
        extra_special_tokens=extra or {},
    )


def _template(image_mark="", audio_mark="", bos="<s>", eot="<|im_end|>"):
    t = TEMPLATE.replace("BOS_MARK", repr(bos)).replace("EOT", eot)
    return t.replace("IMAGE_MARK", image_mark).replace("AUDIO_MARK", audio_mark)


def _text(vocab, **kw):
    cfg = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
               bos_token_id=0, eos_token_id=1, pad_token_id=2, tie_word_embeddings=False)
    cfg.update(kw)
    return cfg


def _save(name, model, processor) -> Path:
    out = _ROOT() / name
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def _init(model_cls, config):
    torch.manual_seed(0)
    model = model_cls(config).to(torch.float64)
    # Random-init std 0.02 gives near-identical logits; widen so tokens differ.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    return model.float()


# --------------------------------------------------------------------------- families


def build_llama_text() -> Path:
    """A text-only Llama, for the compiled path (engines/compiled.py)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = make_tokenizer([])
    tok.chat_template = _template()
    return _save("llama-text", _init(LlamaForCausalLM, LlamaConfig(**_text(len(tok)))), tok)


def build_llava() -> Path:
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration,
                              LlavaProcessor)
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    tok = make_tokenizer(["<image>"])
    tok.chat_template = _template("<image>")
    ip = LlavaImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    proc = LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=8, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1, chat_template=tok.chat_template)
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, image_size=32, patch_size=8, projection_dim=16),
        text_config=LlamaConfig(**_text(len(tok))),
        image_token_id=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    return _save("llava", _init(LlavaForConditionalGeneration, cfg), proc)


def build_qwen2_vl(version: str = "2") -> Path:
    """Qwen2-VL, or Qwen2.5-VL with version="2.5" (windowed vision attention)."""
    import transformers
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from engines.hf_multimodal_load import images_only

    tok = make_tokenizer(["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"],
                         bos="<|endoftext|>")
    tok.chat_template = _template("<|vision_start|><|image_pad|><|vision_end|>", bos="")
    # 8-pixel patches merged 2x2: a 32x32 image gives a 4x4 grid, 4 placeholder ids.
    ip = Qwen2VLImageProcessorPil(patch_size=8, merge_size=2, temporal_patch_size=2,
                                  min_pixels=16 * 16, max_pixels=48 * 48)
    v = tok.convert_tokens_to_ids
    vision = dict(depth=1, num_heads=2, patch_size=8, spatial_merge_size=2, temporal_patch_size=2)
    if version == "2":
        vision.update(embed_dim=16, hidden_size=32, mlp_ratio=2)
        config_cls, model_cls = transformers.Qwen2VLConfig, transformers.Qwen2VLForConditionalGeneration
    else:
        vision.update(hidden_size=16, intermediate_size=32, out_hidden_size=32, window_size=32,
                      fullatt_block_indexes=[0])
        config_cls, model_cls = transformers.Qwen2_5_VLConfig, transformers.Qwen2_5_VLForConditionalGeneration
    cfg = config_cls(
        text_config=_text(len(tok), rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                     "mrope_section": [2, 1, 1]}),
        vision_config=vision,
        image_token_id=v("<|image_pad|>"), video_token_id=v("<|video_pad|>"),
        vision_start_token_id=v("<|vision_start|>"), vision_end_token_id=v("<|vision_end|>"),
    )
    # Its video processor needs torchvision: save the images-only processor the engine loads.
    proc_cls = images_only(transformers.Qwen2VLProcessor if version == "2" else transformers.Qwen2_5_VLProcessor)
    proc = proc_cls(image_processor=ip, tokenizer=tok, chat_template=tok.chat_template)
    return _save("qwen2_vl" if version == "2" else "qwen2_5_vl", _init(model_cls, cfg), proc)


def build_idefics3(family: str = "idefics3") -> Path:
    """Idefics3, or SmolVLM (the same design; its processor adds video) with family="smolvlm"."""
    import transformers

    from engines.hf_multimodal_load import images_only

    tok = make_tokenizer(["<image>", "<fake_token_around_image>", "<global-img>", "<end_of_utterance>"]
                         + [f"<row_{r}_col_{c}>" for r in range(1, 4) for c in range(1, 4)])
    tok.chat_template = _template("<image>")
    # 32-pixel tiles of 8-pixel patches, pixel-shuffled by 2: 4 ids per tile; a
    # 64-pixel image is split into 2x2 tiles plus a global view.
    sizes = dict(size={"longest_edge": 64}, max_image_size={"longest_edge": 32}, do_image_splitting=True)
    cfg = dict(
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        text_config=_text(len(tok), model_type="llama"), scale_factor=2,
        image_token_id=tok.convert_tokens_to_ids("<image>"),
    )
    if family == "idefics3":
        from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil as IP

        proc_cls, cfg_cls, model_cls = (transformers.Idefics3Processor, transformers.Idefics3Config,
                                        transformers.Idefics3ForConditionalGeneration)
    else:
        from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil as IP

        proc_cls, cfg_cls, model_cls = (images_only(transformers.SmolVLMProcessor), transformers.SmolVLMConfig,
                                        transformers.SmolVLMForConditionalGeneration)
    proc = proc_cls(image_processor=IP(**sizes), tokenizer=tok, image_seq_len=4, chat_template=tok.chat_template)
    return _save(family, _init(model_cls, cfg_cls(**cfg)), proc)


def build_gemma3(sliding_window: int = 24) -> Path:
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    tok = make_tokenizer(["<start_of_image>", "<end_of_image>", "<image_soft_token>"],
                         extra={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                                "image_token": "<image_soft_token>"}, bos="<bos>", eos="<end_of_turn>")
    tok.chat_template = _template("<start_of_image>", bos="<bos>", eot="<end_of_turn>")
    ip = Gemma3ImageProcessorPil(size={"height": 32, "width": 32})
    proc = Gemma3Processor(image_processor=ip, tokenizer=tok, image_seq_length=4, chat_template=tok.chat_template)
    v = tok.convert_tokens_to_ids
    cfg = Gemma3Config(
        text_config=dict(_text(len(tok)), model_type="gemma3_text", head_dim=8, query_pre_attn_scalar=8,
                         sliding_window=sliding_window, layer_types=["sliding_attention", "full_attention"]),
        vision_config=dict(model_type="siglip_vision_model", hidden_size=16, intermediate_size=32,
                           num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8),
        mm_tokens_per_image=4, boi_token_index=v("<start_of_image>"), eoi_token_index=v("<end_of_image>"),
        image_token_index=v("<image_soft_token>"),
    )
    return _save("gemma3", _init(Gemma3ForConditionalGeneration, cfg), proc)


def build_qwen2_audio() -> Path:
    from transformers import (Qwen2AudioConfig, Qwen2AudioForConditionalGeneration, Qwen2AudioProcessor,
                              WhisperFeatureExtractor)

    tok = make_tokenizer(["<|audio_bos|>", "<|AUDIO|>", "<|audio_eos|>"], bos="<|endoftext|>")
    tok.chat_template = _template(audio_mark="<|audio_bos|><|AUDIO|><|audio_eos|>", bos="")
    # 2-second windows of 40 mel bins: 200 frames -> 100 encoder positions -> 50 pooled ids at most.
    fe = WhisperFeatureExtractor(feature_size=40, sampling_rate=16000, hop_length=160, chunk_length=2, n_fft=400)
    proc = Qwen2AudioProcessor(feature_extractor=fe, tokenizer=tok, chat_template=tok.chat_template)
    cfg = Qwen2AudioConfig(
        audio_config=dict(num_mel_bins=40, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=32,
                          d_model=16, max_source_positions=100),
        text_config=dict(_text(len(tok)), model_type="qwen2"),
        audio_token_index=tok.convert_tokens_to_ids("<|AUDIO|>"),
    )
    return _save("qwen2_audio", _init(Qwen2AudioForConditionalGeneration, cfg), proc)


def build_gemma3n_audio(shared_kv: int = 0) -> Path:
    """Gemma 3n's audio and text path; its vision tower (timm) is left out. With
    `shared_kv`, that many last layers reuse earlier layers' KV, as real Gemma 3n does."""
    from tokenizers import AddedToken
    from transformers import Gemma3nConfig, Gemma3nForConditionalGeneration, Gemma3nProcessor
    from transformers.models.gemma3n.feature_extraction_gemma3n import Gemma3nAudioFeatureExtractor
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    from engines.hf_multimodal_load import vision_tower_left_out

    marks = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>",
             "boa_token": "<start_of_audio>", "eoa_token": "<end_of_audio>", "audio_token": "<audio_soft_token>"}
    tok = make_tokenizer(["<start_of_image>", "<start_of_audio>"], bos="<bos>", eos="<end_of_turn>")
    # Gemma 3n's vocabulary: text ids, then 4 vision ids, then 4 audio ids (each embedded by its own table).
    text_vocab = 512
    fill = lambda n: [AddedToken(f"<unused{len(tok) + i}>", special=True) for i in range(n)]  # noqa: E731
    tok.add_tokens(fill(text_vocab - len(tok)), special_tokens=True)
    for names in (["<end_of_image>", "<image_soft_token>"], ["<end_of_audio>", "<audio_soft_token>"]):
        tok.add_tokens([AddedToken(n, special=True) for n in names], special_tokens=True)
        tok.add_tokens(fill(2), special_tokens=True)
    tok = type(tok)(tokenizer_object=tok.backend_tokenizer, bos_token="<bos>", eos_token="<end_of_turn>",
                    pad_token="<pad>", extra_special_tokens=marks)
    assert len(tok) == text_vocab + 8 and tok.convert_tokens_to_ids("<audio_soft_token>") == text_vocab + 5
    tok.chat_template = _template(audio_mark="<audio_soft_token>", bos="<bos>", eot="<end_of_turn>")
    fe = Gemma3nAudioFeatureExtractor(feature_size=32)
    ip = SiglipImageProcessorPil(size={"height": 32, "width": 32})
    proc = Gemma3nProcessor(feature_extractor=fe, image_processor=ip, tokenizer=tok, audio_seq_length=188,
                            image_seq_length=4, chat_template=tok.chat_template)
    v = tok.convert_tokens_to_ids
    cfg = Gemma3nConfig(
        text_config=dict(_text(text_vocab + 8), vocab_size_per_layer_input=text_vocab, hidden_size_per_layer_input=8,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=24,
                         num_hidden_layers=2 + shared_kv, num_kv_shared_layers=shared_kv,
                         layer_types=(["sliding_attention", "full_attention"] * 2)[: 2 + shared_kv],
                         laurel_rank=4, altup_num_inputs=2, activation_sparsity_pattern=[0.0] * (2 + shared_kv),
                         intermediate_size=[64] * (2 + shared_kv), max_position_embeddings=1024, pad_token_id=2,
                         eos_token_id=1, bos_token_id=0),
        vision_config=dict(hidden_size=16, vocab_size=4, vocab_offset=text_vocab),
        audio_config=dict(vocab_size=4, vocab_offset=text_vocab + 4, input_feat_size=32, hidden_size=16,
                          conf_num_attention_heads=2, conf_num_hidden_layers=1, sscp_conv_channel_size=[8, 4],
                          conf_attention_chunk_size=12, conf_attention_context_left=13),
        audio_soft_tokens_per_image=188, vision_soft_tokens_per_image=4,
        boi_token_id=v("<start_of_image>"), eoi_token_id=v("<end_of_image>"), image_token_id=v("<image_soft_token>"),
        boa_token_id=v("<start_of_audio>"), eoa_token_id=v("<end_of_audio>"), audio_token_id=v("<audio_soft_token>"),
    )
    with vision_tower_left_out(cfg):
        model = _init(Gemma3nForConditionalGeneration, cfg)
    return _save(f"gemma3n_audio{'_shared_kv' if shared_kv else ''}", model, proc)


# --------------------------------------------------------------------------- media and cases


def image(seed: int, size=(48, 40)) -> Image.Image:
    """A deterministic noisy gradient, different per seed."""
    rng = np.random.default_rng(seed)
    w, h = size
    base = np.linspace(0, 255, w * h * 3).reshape(h, w, 3)
    return Image.fromarray(((base + rng.integers(0, 96, (h, w, 3))) % 256).astype(np.uint8))


def image_bytes(seed: int, fmt="PNG", size=(48, 40)) -> bytes:
    buf = io.BytesIO()
    image(seed, size).save(buf, format=fmt)
    return buf.getvalue()


def tone(seed: int, seconds=0.6, rate=16000, channels=1) -> np.ndarray:
    """A deterministic chirp plus noise; (channels, samples) when channels > 1."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    wave = 0.4 * np.sin(2 * np.pi * (200 + 150 * seed) * t * (1 + t)) + 0.05 * rng.standard_normal(t.size)
    wave = wave.astype(np.float32)
    return np.stack([wave, wave[::-1].copy()]) if channels > 1 else wave


def media_part(kind: str, seed: int, **kw) -> dict:
    if kind == "image":
        return {"type": "image", "image": image(seed, **kw)}
    return {"type": "audio", "audio": tone(seed, **kw), "sample_rate": kw.get("rate", 16000)}


def media_prompts(kind: str):
    """prompts[0]: one medium; prompts[1]: two different media (another size or
    rate); prompts[2]: text only."""
    second = {"size": (70, 30)} if kind == "image" else {"rate": 22050, "seconds": 0.9}

    def prompts(engine):
        msgs = [
            [media_part(kind, 1), {"type": "text", "text": "What do you see?"}],
            [{"type": "text", "text": "Compare"}, media_part(kind, 2), {"type": "text", "text": " and "},
             media_part(kind, 3, **second)],
            "List three colours of the rainbow.",
        ]
        return [engine.render([{"role": "user", "content": m}]) for m in msgs]

    return prompts


BUILDERS = {
    "llava": (build_llava, "image"),
    "qwen2_vl": (build_qwen2_vl, "image"),
    "qwen2_5_vl": (functools.partial(build_qwen2_vl, "2.5"), "image"),
    "idefics3": (build_idefics3, "image"),
    "smolvlm": (functools.partial(build_idefics3, "smolvlm"), "image"),
    "gemma3": (build_gemma3, "image"),
    "qwen2_audio": (build_qwen2_audio, "audio"),
    "gemma3n_audio": (build_gemma3n_audio, "audio"),
}
# Built on demand by tests/test_multimodal.py, not in the contract suite's cases.
EXTRA_BUILDERS = {"gemma3n_audio_shared_kv": (functools.partial(build_gemma3n_audio, 2), "audio")}


@functools.lru_cache(maxsize=None)
def tiny_engine(family: str, max_sessions: int = 4):
    """The family's tiny model, built once per process and loaded through `load_engine`."""
    engine = load_engine(str(_built(family)), device="cpu", dtype="float64", max_sessions=max_sessions)
    # Matrices this small gain nothing from threads, and on a busy CPU each
    # OpenMP barrier can wait milliseconds for a core: one thread is 100x faster.
    engine.num_threads = 1
    return engine


@functools.lru_cache(maxsize=None)
def compiled_engine():
    """The tiny text Llama loaded with compile=True: fixed-size caches, compiled decode step."""
    engine = load_engine(str(build_llama_text()), device="cpu", dtype="float64", compile=True)
    engine.num_threads = 1
    return engine


@functools.lru_cache(maxsize=None)
def _built(family: str) -> Path:
    return {**BUILDERS, **EXTRA_BUILDERS}[family][0]()


def __getattr__(name):
    # Lazy, so that tests.cases (which imports this module) and this module can
    # each be imported first without a cycle.
    if name == "MULTIMODAL_CASES":
        from tests.cases import EngineCase

        cases = [EngineCase(f"tiny-{fam}", functools.partial(tiny_engine, fam), media_prompts(kind), atol=1e-9)
                 for fam, (_, kind) in BUILDERS.items()]
        globals()["MULTIMODAL_CASES"] = cases
        return cases
    raise AttributeError(name)
