"""transformers image/audio-text-to-text models behind the Engine / Session contract.

Knows nothing of Gradio or of conversations. Built on `hf_text`: the same
session (`hf_session`), cache and sampling; this engine adds what media need:

- each image or audio input becomes one *media block*: the processor expands
  the family's marker (e.g. `<|vision_start|><|image_pad|><|vision_end|>`) into
  placeholder ids plus features (pixel values, mel features), which the model
  merges into its embeddings at prefill;
- the session records each block, so `can_seek` refuses a cut inside one and a
  seek to its end re-runs it;
- decoding and checking image and audio values lives in `media`, merging
  features in `hf_features`, building model and processor in `hf_multimodal_load`;
- per-conversation model state lives in the session (`ModelState`): M-RoPE
  positions (Qwen2-VL's `rope_deltas`) and Gemma 3's image-token types are
  computed per session and passed explicitly, so the shared model object holds none.

Differences from the contract: none. The model never samples a media
placeholder id (its logit is pinned to the dtype's minimum): a placeholder
without features behind it would be meaningless. Without torchvision (as
here): Qwen2-VL / Qwen2.5-VL take images only (their video processor needs
it) and Gemma 3n takes audio only (its timm vision tower needs it).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Sequence

import torch

from . import hf_features as hf, kv
from .base import EngineError, InvalidArgument, MultimodalInput, ServingCapacity, check_inputs
from .chat import PartsContent
from .hf_multimodal_load import check_supported, has_vision, load_model, load_processor
from .hf_session import Prepared
from .hf_text import HFTextEngine
from .media import MAX_AUDIO_SECONDS, check_media_value, load_audio, load_image

MEMO_SIZE = 16  # processed media kept per engine, by content hash

MROPE_FAMILIES = ("qwen2_vl", "qwen2_5_vl")
TOKEN_TYPE_FAMILIES = ("gemma3",)  # image blocks attend bidirectionally, by token type


def load_multimodal(source, name, config, device, dtype, max_context, max_sessions, chat_template):
    """Load a processor and an image/audio-text-to-text model from `source`."""
    check_supported(config, name)
    try:
        processor = load_processor(source, config)
        model = load_model(source, config, device, dtype)
    except EngineError:
        raise
    except Exception as e:
        raise EngineError(f"cannot load {name} as a multimodal model: {e}") from e
    return HFMultimodalEngine(
        model, processor, name=name, max_context=max_context, max_sessions=max_sessions,
        chat_template=chat_template,
    )


class HFMultimodalEngine(HFTextEngine):
    """A transformers multimodal LM and its processor, on one device and dtype."""

    batchable = False  # media blocks and M-RoPE state are per session (batch.py)

    def __init__(self, model, processor, **kw):
        tokenizer = getattr(processor, "tokenizer", processor)
        kw["chat_template"] = kw.get("chat_template") or getattr(processor, "chat_template", None)
        super().__init__(model, tokenizer, **kw)
        self.chat_tokenizer = PartsContent(tokenizer)
        self.processor = processor
        cfg = model.config
        self.family = cfg.model_type
        self.image_processor = getattr(processor, "image_processor", None)
        self.feature_extractor = getattr(processor, "feature_extractor", None)
        mods = {"text", "tokens"}
        if self.image_processor is not None and has_vision(model):
            mods.add("image")
        if self.feature_extractor is not None and hasattr(cfg, "audio_config"):
            mods.add("audio")
        self.modalities = frozenset(mods)
        self.markers = {k: hf.marker(processor, k) for k in ("image", "audio") if k in mods}
        self.placeholder_ids = hf.placeholder_ids(cfg)
        self.image_token_id = hf.first_attr(cfg, "image_token_id", "image_token_index")
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
            per_token = kv.bytes_per_token(text_cfg, self.dtype) * (layers - shared) // layers
            self.capacity = ServingCapacity(self.capacity.max_sessions, self.max_context, per_token,
                                            per_token * self.max_context)
        self._memo: OrderedDict = OrderedDict()
        self._memo_lock = threading.Lock()

    # -- planning helpers

    def prepare(self, inputs: Sequence[MultimodalInput]) -> Prepared:
        """Validate inputs; media become blocks of placeholder ids plus features."""
        ids: list[int] = []
        spans, blocks, waves = [], [], []
        for i, inp in enumerate(check_inputs(inputs)):
            if inp.kind in ("image", "audio") and inp.kind in self.modalities:
                block_ids, feats, wave = self._media(inp, i)
                if wave is not None:
                    waves.append((i, wave))
                spans.append((len(ids), len(ids) + len(block_ids)))
                blocks.append((block_ids, feats))
                ids.extend(block_ids)
                continue
            part = self._text_ids(inp, i)
            held = sorted(set(part) & self.placeholder_ids)
            if held:
                raise InvalidArgument(
                    f"input {i} holds the media placeholder id {held[0]} "
                    f"({self.tokenizer.convert_ids_to_tokens(held[0])!r}); pass media as image/audio inputs"
                )
            ids.extend(part)
        extras = hf.merge([f for _, f in blocks], self.family)
        if len(waves) > 1:
            # Clips of different lengths are padded as the feature extractor pads a batch
            # (padding is not neutral in every audio encoder): process them together.
            out = self._process(waves[0][0], self.markers["audio"] * len(waves), audio=[w for _, w in waves],
                                sampling_rate=self.sample_rate)
            extras.update(hf.features(out))
        return Prepared(ids, extras, spans, blocks)

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
            image = load_image(inp.value, index, self.image_cap(), getattr(self.image_processor, "resample", None))
            out = self._process(index, self.markers["image"], images=[image])
        else:
            wave = load_audio(inp.value, inp.sample_rate, index, self.sample_rate, self.max_audio_seconds)
            out = self._process(index, self.markers["audio"], audio=[wave], sampling_rate=self.sample_rate)
        ids = out["input_ids"][0].tolist()
        if not set(ids) & self.placeholder_ids:
            raise InvalidArgument(f"input {index}: the processor gave no {inp.kind} placeholder ids for it")
        feats = hf.features(out)
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

    def image_cap(self) -> dict:
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

    def new_model_state(self) -> "ModelState | None":
        return ModelState(self) if self.mrope or self.token_types else None

    # -- the model (called with self.lock held)

    def forward(self, ids, cache, extras) -> torch.Tensor:
        kw = {k: hf.to_model(v, self.device, self.dtype) for k, v in extras.items()}
        logits = super().forward(ids, cache, kw)
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


class ModelState:
    """One conversation's model state that transformers would keep on the shared
    model: Qwen2-VL's M-RoPE text positions, and Gemma 3's token types (read by
    absolute position). The session keeps it and asks it for each forward's extras."""

    def __init__(self, engine: HFMultimodalEngine):
        self._engine = engine
        self._rope_next: list[int] = []  # M-RoPE: next text position after each resident id
        self._pending: list[int] | None = None  # positions of the chunk being forwarded

    def extras(self, resident: list[int], ids: list[int], extras: dict) -> dict:
        """`extras` for forwarding `ids` after the `resident` ones, plus what this state adds."""
        eng = self._engine
        extras = dict(extras)
        self._pending = None
        if eng.mrope:
            del self._rope_next[len(resident):]  # a seek dropped these
            offset = self._rope_next[-1] if self._rope_next else 0
            pos = eng.mrope_positions(ids, extras, offset)
            extras["position_ids"] = pos
            self._pending = (pos.amax(dim=0)[0].cummax(dim=0).values + 1).tolist()
        if eng.token_types and eng.image_token_id in ids:
            # Gemma 3 reads token types by absolute position, so give them from position 0.
            full = torch.tensor([resident + ids])
            extras["token_type_ids"] = (full == eng.image_token_id).long()
        return extras

    def advance(self) -> None:
        """The chunk of the last `extras` call was forwarded and is resident."""
        if self._pending is not None:
            self._rope_next.extend(self._pending)
            self._pending = None

    def rope_deltas(self, position: int) -> int | None:
        if not self._engine.mrope:
            return None
        return (self._rope_next[-1] if self._rope_next else 0) - position

    def copy(self) -> "ModelState":
        new = ModelState(self._engine)
        new._rope_next = list(self._rope_next)
        return new

