"""Read a GGUF file's metadata and check that the file is whole, in pure Python.

Knows nothing of llama.cpp or torch. It runs before llama.cpp sees the file,
so a truncated or foreign file becomes a clear `EngineError` instead of a
crash inside C++. The `gguf` package reads the same header, but it indexes
every array element and takes seconds on a 49k-token vocabulary; this skips
arrays it does not need and takes milliseconds.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path

from .base import EngineError

MAGIC = b"GGUF"
# GGUF value types: id -> struct format (scalars); 8 = string, 9 = array.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
_KEEP_ARRAYS = ("general.languages",)  # small arrays worth reading; the vocabulary is not


class _Reader:
    def __init__(self, data: bytes, path: Path):
        self.data, self.pos, self.path = data, 0, path

    def take(self, fmt: str):
        size = struct.calcsize("<" + fmt)
        if self.pos + size > len(self.data):
            raise EngineError(f"{self.path.name} is truncated: its GGUF header ends early (at byte {self.pos})")
        value = struct.unpack_from("<" + fmt, self.data, self.pos)
        self.pos += size
        return value[0] if len(value) == 1 else value

    def string(self) -> str:
        n = self.take("Q")
        if self.pos + n > len(self.data):
            raise EngineError(f"{self.path.name} is truncated: a string in its GGUF header runs past the end")
        raw = self.data[self.pos : self.pos + n]
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def skip_array(self, etype: int, n: int) -> None:
        if etype in _SCALARS:
            self.pos += n * struct.calcsize("<" + _SCALARS[etype])
        elif etype == _STRING:
            data, pos, unpack = self.data, self.pos, struct.unpack_from
            for _ in range(n):
                pos += 8 + unpack("<Q", data, pos)[0]
            self.pos = pos
        else:
            for _ in range(n):
                self.value(etype, keep=False)
        if self.pos > len(self.data):
            raise EngineError(f"{self.path.name} is truncated: an array in its GGUF header runs past the end")

    def value(self, vtype: int, keep: bool = True):
        if vtype in _SCALARS:
            return self.take(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, n = self.take("I"), self.take("Q")
            if not keep:  # skip arrays (the vocabulary) without building them
                self.skip_array(etype, n)
                return None
            items = [self.value(etype, keep) for _ in range(n)]
            return items if keep else None
        raise EngineError(f"{self.path.name} has an unknown GGUF value type {vtype} (corrupt or not a GGUF file)")


def read_metadata(path: str | Path) -> dict:
    """The key/value metadata of a GGUF file, after checking that it is whole.

    Raises `EngineError` naming the file when it is not a GGUF, is truncated,
    or its tensor data runs past the end of the file.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
    except (OSError, ValueError) as e:
        raise EngineError(f"cannot read {path}: {e}") from e
    try:
        return _parse(data, size, path)
    except struct.error as e:
        raise EngineError(f"{path.name} is truncated or corrupt: {e}") from e
    finally:
        if isinstance(data, mmap.mmap):
            data.close()


def _parse(data, size: int, path: Path) -> dict:
    if data[:4] != MAGIC:
        raise EngineError(f"{path.name} is not a GGUF model file (it does not start with 'GGUF')")
    r = _Reader(data, path)
    r.pos = 4
    version = r.take("I")
    if version not in (2, 3):
        raise EngineError(f"{path.name} is GGUF version {version}; llama.cpp reads versions 2 and 3")
    n_tensors, n_kv = r.take("Q"), r.take("Q")
    if n_tensors > 1 << 20 or n_kv > 1 << 20:
        raise EngineError(f"{path.name} has an implausible GGUF header ({n_tensors} tensors, {n_kv} keys): corrupt")
    meta: dict = {}
    for _ in range(n_kv):
        key = r.string()
        vtype = r.take("I")
        keep = vtype != _ARRAY or key in _KEEP_ARRAYS
        meta[key] = r.value(vtype, keep)
    if n_tensors == 0:
        raise EngineError(f"{path.name} holds no tensors: it is not a model")
    end = 0
    for _ in range(n_tensors):
        r.string()
        n_dims = r.take("I")
        if n_dims > 8:
            raise EngineError(f"{path.name} has a tensor with {n_dims} dimensions: corrupt")
        dims = [r.take("Q") for _ in range(n_dims)]
        r.take("I")  # ggml type
        offset = r.take("Q")
        end = max(end, offset + (1 if dims else 0))
    align = int(meta.get("general.alignment", 32))
    data_start = (r.pos + align - 1) // align * align
    if data_start + end > size:
        raise EngineError(
            f"{path.name} is truncated: its tensors need more than {data_start + end} bytes, "
            f"the file has {size}"
        )
    return meta


def arch_value(meta: dict, name: str, default=None):
    """`{architecture}.{name}` from the metadata, e.g. arch_value(meta, "context_length")."""
    return meta.get(f"{meta.get('general.architecture', '')}.{name}", default)


def kv_bytes_per_token(meta: dict, bytes_per_value: int = 2) -> int:
    """KV-cache bytes one token costs (llama.cpp's default cache is f16)."""
    layers = int(arch_value(meta, "block_count", 0) or 0)
    heads = arch_value(meta, "attention.head_count", 1) or 1
    heads = max(heads) if isinstance(heads, list) else heads
    kv_heads = arch_value(meta, "attention.head_count_kv", heads) or heads
    kv_heads = max(kv_heads) if isinstance(kv_heads, list) else kv_heads
    embd = int(arch_value(meta, "embedding_length", 0) or 0)
    k_len = arch_value(meta, "attention.key_length") or (embd // heads if heads else 0)
    v_len = arch_value(meta, "attention.value_length") or k_len
    return int(layers * kv_heads * (k_len + v_len) * bytes_per_value)


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level BPE writes each byte as a printable character; this undoes it."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def token_bytes(path: str | Path) -> list[bytes | None]:
    """Each vocabulary entry's bytes (None for control tokens), from the GGUF's
    `tokenizer.ggml.tokens`: byte-level BPE ("gpt2") and SentencePiece ("llama")."""
    path = Path(path)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        r = _Reader(data, path)
        r.pos = 8
        _, n_kv = r.take("Q"), r.take("Q")
        tokens = types = model = None
        for _ in range(n_kv):
            key = r.string()
            vtype = r.take("I")
            keep = key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type") or vtype != _ARRAY
            value = r.value(vtype, keep)
            if key == "tokenizer.ggml.tokens":
                tokens = value
            elif key == "tokenizer.ggml.token_type":
                types = value
            elif key == "tokenizer.ggml.model":
                model = value
    if tokens is None:
        raise EngineError(f"{path.name} has no tokenizer.ggml.tokens")
    types = types or [1] * len(tokens)
    out: list[bytes | None] = []
    if model == "gpt2":
        dec = _byte_decoder()
        for t, ty in zip(tokens, types):
            out.append(bytes(dec[c] for c in t) if ty == 1 and all(c in dec for c in t) else None)
    else:  # SentencePiece: "▁" is a space, "<0xAB>" a raw byte
        for t, ty in zip(tokens, types):
            if ty == 6 and len(t) == 6 and t.startswith("<0x"):
                out.append(bytes([int(t[3:5], 16)]))
            else:
                out.append(t.replace("\u2581", " ").encode() if ty == 1 else None)
    return out
