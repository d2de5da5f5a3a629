"""transformers image/audio-text-to-text models behind the Engine / Session contract.

Knows nothing of Gradio or of conversations. Built on `hf_text`: the same
session, cache and sampling; this module adds what media need:

- each image or audio input becomes one *media block*: the processor expands
  the family's marker (e.g. `<|vision_start|><|image_pad|><|vision_end|>`) into
  placeholder ids plus features (pixel values, mel features), which the model
  merges into its embeddings at prefill;
- `media_spans` record each block, so `can_seek` refuses a cut inside one;
- decoding and checking image and audio values lives in `media`;
- per-conversation model state lives in the session: M-RoPE positions
  (Qwen2-VL's `rope_deltas`) and Gemma 3's image-token types are computed per
  session and passed explicitly, so the shared model object holds none.

Differences from the contract: none. The model never samples a media
placeholder id (its logit is pinned to the dtype's minimum): a placeholder
without features behind it would be meaningless. Without torchvision (as
here): Qwen2-VL / Qwen2.5-VL take images only (their video processor needs
it) and Gemma 3n takes audio only (its timm vision tower needs it).
"""

from __future__ import annotations

import contextlib
import importlib.util
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Sequence

import torch

from . import kv
from .base import EngineError, InvalidArgument, MultimodalInput, NotSupported, ServingCapacity, SessionPoisoned
from .chat import render_messages
from .base import check_inputs as _check_inputs
from .hf_text import HFTextEngine, HFTextSession, Prepared, _kv_bytes_per_token, use_threads
from .media import MAX_AUDIO_SECONDS, check_media_value, load_audio, load_image

MEMO_SIZE = 16  # processed media kept per engine, by content hash

MROPE_FAMILIES = ("qwen2_vl", "qwen2_5_vl")
IDEFICS_FAMILIES = ("idefics2", "idefics3", "smolvlm")  # pixel tensors batch images on dim 1
TOKEN_TYPE_FAMILIES = ("gemma3",)  # image blocks attend bidirectionally, by token type


@dataclass
class MediaPrepared(Prepared):
    """`Prepared` plus each block's own ids and features, so a seek to a block's
    end can re-run the whole block."""

    blocks: list[tuple[list[int], dict]] = field(default_factory=list)


# --------------------------------------------------------------------------- loading


UNSUPPORTED = {
    "voxtral": "Voxtral's processor takes audio only through mistral-common chat requests, not as "
               "per-input features, so it does not fit this adapter yet",
}


def load_multimodal(source, name, config, device, dtype, max_context, max_sessions, chat_template):
    """Load a processor and an image/audio-text-to-text model from `source`."""
    if config.model_type in UNSUPPORTED:
        raise NotSupported(f"{name}: {UNSUPPORTED[config.model_type]}")
    try:
        processor = load_processor(source, config)
        with vision_tower_left_out(config):
            model = _model_class(config).from_pretrained(source, dtype=dtype).to(device)
    except EngineError:
        raise
    except Exception as e:
        raise EngineError(f"cannot load {name} as a multimodal model: {e}") from e
    return HFMultimodalEngine(
        model, processor, name=name, max_context=max_context, max_sessions=max_sessions,
        chat_template=chat_template,
    )


IMAGES_ONLY = {  # model type -> processor class whose video half needs torchvision
    "qwen2_vl": "Qwen2VLProcessor",
    "qwen2_5_vl": "Qwen2_5_VLProcessor",
    "smolvlm": "SmolVLMProcessor",
}


def load_processor(source, config):
    """AutoProcessor, except where it would also build a video processor, which
    needs torchvision (Qwen2-VL, Qwen2.5-VL, SmolVLM): there, images only."""
    import transformers

    if config.model_type in IMAGES_ONLY:
        return images_only(getattr(transformers, IMAGES_ONLY[config.model_type])).from_pretrained(source)
    return transformers.AutoProcessor.from_pretrained(source)


def images_only(cls):
    """`cls` without its video processor: image processor and tokenizer only."""

    class ImagesOnly(cls):
        # Explicit parameters: transformers reads accepted settings off __init__'s code.
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, image_seq_len=None, **kw):
            if image_seq_len is not None:  # SmolVLM
                kw["image_seq_len"] = image_seq_len
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kw)

    ImagesOnly.__name__ = ImagesOnly.__qualname__ = cls.__name__  # saved as the real class
    return ImagesOnly


class NoVisionTower(torch.nn.Module):
    """Stands in for a vision tower that cannot be built here; the engine then takes no images."""


_build_lock = threading.Lock()


@contextlib.contextmanager
def vision_tower_left_out(config):
    """Gemma 3n's vision tower is a timm model, and timm needs torchvision: without
    timm, build the model with the tower left out so its audio and text paths work."""
    if config.model_type != "gemma3n" or importlib.util.find_spec("timm") is not None:
        yield
        return
    from transformers.models.gemma3n import modeling_gemma3n as mod

    real = mod.AutoModel

    class AutoModelWithoutVision:
        @staticmethod
        def from_config(cfg, **kw):
            if cfg.model_type == "gemma3n_vision":
                return NoVisionTower()
            return real.from_config(cfg, **kw)

    with _build_lock:
        mod.AutoModel = AutoModelWithoutVision
        try:
            yield
        finally:
            mod.AutoModel = real


def _model_class(config):
    from transformers import AutoModelForImageTextToText, AutoModelForMultimodalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    if config.model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        return AutoModelForImageTextToText
    return AutoModelForMultimodalLM


# --------------------------------------------------------------------------- engine


class HFMultimodalEngine(HFTextEngine):
    """A transformers multimodal LM and its processor, on one device and dtype."""

    def __init__(self, model, processor, **kw):
        tokenizer = getattr(processor, "tokenizer", processor)
        kw["chat_template"] = kw.get("chat_template") or getattr(processor, "chat_template", None)
        super().__init__(model, tokenizer, **kw)
        self.processor = processor
        cfg = model.config
        self.family = cfg.model_type
        self.image_processor = getattr(processor, "image_processor", None)
        self.feature_extractor = getattr(processor, "feature_extractor", None)
        mods = {"text", "tokens"}
        if self.image_processor is not None and _has_vision(model):
            mods.add("image")
        if self.feature_extractor is not None and hasattr(cfg, "audio_config"):
            mods.add("audio")
        self.modalities = frozenset(mods)
        self.markers = {k: _marker(processor, k) for k in ("image", "audio") if k in mods}
        self.placeholder_ids = _placeholder_ids(cfg)
        self.image_token_id = _first_attr(cfg, "image_token_id", "image_token_index")
        self.mrope = self.family in MROPE_FAMILIES
        self.token_types = self.family in TOKEN_TYPE_FAMILIES
        fe = self.feature_extractor
        self.sample_rate = getattr(fe, "sampling_rate", None)
        chunk = getattr(fe, "chunk_length", None)
        self.max_audio_seconds = float(chunk) if chunk else MAX_AUDIO_SECONDS
        text_cfg = cfg.get_text_config()
        shared = getattr(text_cfg, "num_kv_shared_layers", 0) or 0
        if shared:  # Gemma 3n: the last layers reuse earlier layers' KV and store none
            layers = text_cfg.num_hidden_layers
            per_token = _kv_bytes_per_token(text_cfg, self.dtype) * (layers - shared) // layers
            self.capacity = ServingCapacity(self.capacity.max_sessions, self.max_context, per_token,
                                            per_token * self.max_context)
        self._memo: OrderedDict = OrderedDict()
        self._memo_lock = threading.Lock()

    # -- planning helpers

    def render(self, messages, add_generation_prompt=True, chat_template=None):
        """As the text engine, but each message's content reaches the template as a
        list of parts: multimodal templates (SmolVLM, LLaVA) iterate over parts."""
        template = chat_template or self.chat_template
        if not template:
            raise NotSupported(f"{self.name} has no chat template; pass chat_template= or prefill raw text")
        return render_messages(_PartsContent(self.tokenizer), messages, add_generation_prompt, template,
                               self.modalities)

    def prepare(self, inputs: Sequence[MultimodalInput]) -> MediaPrepared:
        """Validate inputs; media become blocks of placeholder ids plus features."""
        inputs = _check_inputs(inputs)
        ids: list[int] = []
        spans, blocks, waves = [], [], []
        for i, inp in enumerate(inputs):
            if inp.kind not in self.modalities:
                raise NotSupported(
                    f"input {i} is {inp.kind}, but {self.name} takes only {', '.join(sorted(self.modalities))}"
                )
            if inp.kind in ("image", "audio"):
                block_ids, feats, wave = self._media(inp, i)
                if wave is not None:
                    waves.append((i, wave))
                spans.append((len(ids), len(ids) + len(block_ids)))
                blocks.append((block_ids, feats))
                ids.extend(block_ids)
                continue
            if inp.kind == "text":
                part = self.tokenizer.encode(inp.value, add_special_tokens=False)
            else:
                part = list(inp.value)
                bad = [t for t in part if t >= self.vocab_size]
                if bad:
                    raise InvalidArgument(
                        f"input {i} has token id {bad[0]}, outside the vocabulary of {self.vocab_size}"
                    )
            held = sorted(set(part) & self.placeholder_ids)
            if held:
                raise InvalidArgument(
                    f"input {i} holds the media placeholder id {held[0]} "
                    f"({self.tokenizer.convert_ids_to_tokens(held[0])!r}); pass media as image/audio inputs"
                )
            ids.extend(part)
        extras = _merge([f for _, f in blocks], self.family)
        if len(waves) > 1:
            # Clips of different lengths are padded as the feature extractor pads a batch
            # (padding is not neutral in every audio encoder): process them together.
            out = self._process(waves[0][0], self.markers["audio"] * len(waves), audio=[w for _, w in waves],
                                sampling_rate=self.sample_rate)
            extras.update((k, v) for k, v in out.items() if torch.is_tensor(v) and k not in _TEXT_KEYS)
        return MediaPrepared(ids, extras, spans, blocks)

    def _media(self, inp: MultimodalInput, index: int) -> tuple[list[int], dict, object]:
        """(placeholder ids, features, waveform or None) of one media input, memoized by content."""
        check_media_value(inp, index)
        key = inp.key()
        with self._memo_lock:
            if key in self._memo:
                self._memo.move_to_end(key)
                ids, feats, wave = self._memo[key]
                return list(ids), feats, wave
        wave = None
        if inp.kind == "image":
            image = load_image(inp.value, index, self._image_cap(), getattr(self.image_processor, "resample", None))
            out = self._process(index, self.markers["image"], images=[image])
        else:
            wave = load_audio(inp.value, inp.sample_rate, index, self.sample_rate, self.max_audio_seconds)
            out = self._process(index, self.markers["audio"], audio=[wave], sampling_rate=self.sample_rate)
        ids = out["input_ids"][0].tolist()
        if not set(ids) & self.placeholder_ids:
            raise InvalidArgument(f"input {index}: the processor gave no {inp.kind} placeholder ids for it")
        feats = {k: v for k, v in out.items() if torch.is_tensor(v) and k not in _TEXT_KEYS}
        with self._memo_lock:
            self._memo[key] = (ids, feats, wave)
            while len(self._memo) > MEMO_SIZE:
                self._memo.popitem(last=False)
        return list(ids), feats, wave

    def _process(self, index, marker, **media):
        try:
            return self.processor(text=[marker], return_tensors="pt", add_special_tokens=False, **media)
        except (ValueError, TypeError, RuntimeError) as e:  # the processor's own checks (sizes, rates)
            raise InvalidArgument(f"input {index}: the processor rejected it: {e}") from e

    def _image_cap(self) -> dict:
        """The largest size the image processor keeps; bigger images are downscaled first."""
        ip = self.image_processor
        size = getattr(ip, "size", None) or {}
        get = lambda k: size.get(k) if hasattr(size, "get") else None  # noqa: E731
        if hasattr(ip, "temporal_patch_size"):  # Qwen2-VL family: size bounds are pixel counts
            px = get("longest_edge") or getattr(ip, "max_pixels", None)
            return {"pixels": px} if px else {}
        cap = {}
        if get("longest_edge"):
            cap["long"] = get("longest_edge")
        if get("shortest_edge"):
            cap["short"] = get("shortest_edge")
        if get("height") and get("width"):
            cap["short"] = max(get("height"), get("width"))
        return cap

    # -- the model (called with self.lock held)

    def forward(self, ids, cache, extras, session) -> torch.Tensor:
        use_threads(self, len(ids))
        kw = {k: _to(v, self.device, self.dtype) for k, v in extras.items()}
        input_ids = torch.tensor([ids], dtype=torch.long, device=self.device)
        out = self.model(input_ids=input_ids, past_key_values=cache, use_cache=True, logits_to_keep=1, **kw)
        logits = out.logits[0, -1]
        if self.placeholder_ids:
            logits[sorted(self.placeholder_ids)] = torch.finfo(logits.dtype).min
        return logits

    def mrope_positions(self, ids: list[int], extras: dict, offset: int) -> torch.Tensor:
        """3-D M-RoPE positions (3, 1, len) of a chunk that starts at text position `offset`."""
        n = len(ids)
        grid = extras.get("image_grid_thw")
        if grid is None:
            return (torch.arange(n) + offset).view(1, 1, -1).expand(3, 1, -1)
        input_ids = torch.tensor([ids])
        types = (input_ids == self.image_token_id).int()
        pos, _ = self.model.model.get_rope_index(input_ids, mm_token_type_ids=types, image_grid_thw=grid)
        return pos + offset


class _PartsContent:
    """A tokenizer whose chat template receives str content as one text part."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer

    def apply_chat_template(self, messages, **kw):
        parts = [dict(m, content=[{"type": "text", "text": m["content"]}]) if isinstance(m.get("content"), str)
                 else m for m in messages]
        return self._tokenizer.apply_chat_template(parts, **kw)


class HFMultimodalSession(HFTextSession):
    """One conversation on an `HFMultimodalEngine`. Also holds the conversation's
    M-RoPE positions and each media block's features (for a seek to its end)."""

    def _clear(self) -> None:
        super()._clear()
        self._rope_next: list[int] = []  # M-RoPE: next text position after each resident id
        self._blocks: dict[tuple[int, int], tuple[list[int], dict]] = {}

    @property
    def rope_deltas(self) -> int | None:
        """Qwen2-VL's per-conversation offset of positions from token indices."""
        if not self._engine.mrope:
            return None
        return (self._rope_next[-1] if self._rope_next else 0) - self.position

    def _run(self, ids: list[int], extras: dict, stoppable: bool = False) -> bool:
        eng = self._engine
        extras = dict(extras)
        nxt = None
        if eng.mrope:
            del self._rope_next[self.position :]  # a seek dropped these
            offset = self._rope_next[-1] if self._rope_next else 0
            pos = eng.mrope_positions(ids, extras, offset)
            extras["position_ids"] = pos
            nxt = (pos.amax(dim=0)[0].cummax(dim=0).values + 1).tolist()
        if eng.token_types and eng.image_token_id in ids:
            # Gemma 3 reads token types by absolute position, so give them from position 0.
            full = torch.tensor([self._ids + ids])
            extras["token_type_ids"] = (full == eng.image_token_id).long()
        if not super()._run(ids, extras, stoppable):
            return False  # stopped before the forward: nothing moved
        if nxt is not None:
            self._rope_next.extend(nxt)
        return True

    def prefill(self, inputs, num_bos=0, num_eos=0) -> int:
        before = len(self._media_spans)
        out = super().prefill(inputs, num_bos, num_eos)
        new = self._media_spans[before:]
        if new:  # keep each block's features for a later seek to its end
            self._blocks.update(zip(new, self._engine.prepare(inputs).blocks))  # media memoized: cheap
        return out

    def can_seek(self, pos: int) -> bool:
        if not super().can_seek(pos):
            return False
        span = self._block_ending_at(pos)
        return span is None or span[0] >= kv.seek_floor(self._cache)

    def seek(self, pos: int) -> None:
        span = self._block_ending_at(pos) if isinstance(pos, int) and not isinstance(pos, bool) else None
        if span is None or not self.can_seek(pos):
            return super().seek(pos)
        # The block's last id is a placeholder whose embedding came from the
        # features: crop to the block's start and re-run the whole block.
        self._usable()
        self._stop.clear()
        a, _ = span
        block_ids, feats = self._blocks[span]
        del self._ids[a:]
        self._media_spans = [s for s in self._media_spans if s[1] <= a]
        try:
            kv.crop_to(self._cache, a)
        except Exception as e:
            self._poisoned = e
            raise SessionPoisoned(f"cache crop failed: {e!r}; call reset()") from e
        self._run(list(block_ids), feats)
        self._media_spans.append(span)
        self._after_move()

    def _copy_into(self, new) -> None:
        super()._copy_into(new)
        new._rope_next = list(self._rope_next)
        new._blocks = dict(self._blocks)  # features are never changed in place: shared

    def _block_ending_at(self, pos):
        if pos == self.position:
            return None
        return next((s for s in self._media_spans if s[1] == pos and s in self._blocks), None)


HFMultimodalEngine.session_class = HFMultimodalSession


# --------------------------------------------------------------------------- helpers

_TEXT_KEYS = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids")


def _merge(feats: list[dict], family: str) -> dict:
    """One prefill's features: each block's tensors concatenated in order."""
    if not feats:
        return {}
    dim1 = family in IDEFICS_FAMILIES
    out = {}
    for k in feats[0]:
        parts = [f[k] for f in feats]
        d = 1 if dim1 and k in ("pixel_values", "pixel_attention_mask") else 0
        out[k] = parts[0] if len(parts) == 1 else torch.cat(_pad_dims(parts, d), dim=d)
    return out


def _pad_dims(parts, dim):
    """Blocks may differ in other sizes (Idefics tiles, Gemma 3n audio frames): zero-pad
    them; the masks that come with them mark the padding invalid."""
    shape = [max(p.shape[i] for p in parts) for i in range(parts[0].dim())]
    out = []
    for p in parts:
        pad = []
        for i in reversed(range(p.dim())):
            pad += [0, 0 if i == dim else shape[i] - p.shape[i]]
        out.append(torch.nn.functional.pad(p, pad) if any(pad) else p)
    return out


def _to(v, device, dtype):
    return v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device)


def _marker(processor, kind: str) -> str:
    """The text a chat template writes for one image/audio part; the processor expands it
    (Gemma 3: `<start_of_image>`; Gemma 3n: `<audio_soft_token>`; Qwen: wrapped pads)."""
    tok = getattr(processor, f"{kind}_token", None)
    if tok is None:
        raise EngineError(f"the processor has no {kind} token")
    if kind == "image" and "<|vision_start|>" in processor.tokenizer.get_vocab():
        return f"<|vision_start|>{tok}<|vision_end|>"
    bos, eos = getattr(processor, f"{kind}_bos_token", None), getattr(processor, f"{kind}_eos_token", None)
    if bos and eos:
        return f"{bos}{tok}{eos}"
    return tok


def _placeholder_ids(cfg) -> set[int]:
    ids = set()
    for c in (cfg, cfg.get_text_config()):
        for k in ("image_token_id", "image_token_index", "audio_token_id", "audio_token_index", "video_token_id"):
            v = getattr(c, k, None)
            if isinstance(v, int):
                ids.add(v)
    return ids


def _first_attr(obj, *names):
    return next((getattr(obj, n) for n in names if getattr(obj, n, None) is not None), None)


def _has_vision(model) -> bool:
    inner = getattr(model, "model", model)
    towers = [getattr(inner, n, None) for n in ("vision_tower", "visual", "vision_model")]
    return any(t is not None and not isinstance(t, NoVisionTower) for t in towers)
