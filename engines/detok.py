"""Streaming detokenization that never emits a broken UTF-8 character."""

from __future__ import annotations

from typing import Callable, Sequence

REPLACEMENT = "\ufffd"
CONTEXT = 6  # ids of left context, so a piece gets its leading space right


class StreamDecoder:
    """Feed ids one at a time; `step` returns the new text, or "" while the
    bytes of a character are still incomplete.

    Uses `tokenizers`' DecodeStream when the tokenizer has a Rust backend;
    otherwise the prefix/read-offset method (decode a small window twice and
    emit the difference), which works with any `decode` function.
    """

    def __init__(self, tokenizer, context: Sequence[int] = ()):
        context = list(context[-CONTEXT:])
        backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
        if backend is not None and hasattr(backend, "decode"):
            from tokenizers.decoders import DecodeStream

            self._backend = backend
            self._stream = DecodeStream(ids=context, skip_special_tokens=False)
        else:
            self._stream = None
            self._decode: Callable = lambda ids: tokenizer.decode(ids, skip_special_tokens=False)
            self._ids = context
            self._prefix = 0
            self._read = len(context)

    def step(self, token_id: int) -> str:
        if self._stream is not None:
            return self._stream.step(self._backend, token_id) or ""
        self._ids.append(token_id)
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        if len(after) > len(before) and not after.endswith(REPLACEMENT):
            self._prefix, self._read = self._read, len(self._ids)
            return after[len(before) :]
        return ""
