"""What sits in a session's KV, and moving it to a target by exact prefix.

The session owns the resident ids (`session.tokens`). This module owns the one
thing the ids cannot say: which media content fills which positions (two
images can expand to the same placeholder ids). Knows nothing of turns, the
template or the UI: it is handed the target's inputs, already rendered.
"""

from __future__ import annotations

from engines import MultimodalInput

from .prefix import plan_prefix
from .turns import Stats


class Residency:
    """Keys of resident positions and the move to a target (keep the longest exact
    prefix, seek there, prefill the rest). One per conversation.

    Args:
        tokenize: `engine.tokenize`.
    """

    def __init__(self, tokenize):
        self._tokenize = tokenize
        self._media: list[tuple[int, int, str]] = []  # (start, end, content digest) of resident media blocks
        self._media_ids: dict = {}  # media key -> expanded ids: each medium is processed once

    def keys_of(self, inputs) -> tuple[list, list]:
        """Per-position keys of `inputs` (a plain id for text, ("media", digest, id) inside
        a media block), and the (input, its ids) pieces."""
        keys, pieces = [], []
        for inp in inputs:
            if inp.kind in ("text", "tokens"):
                ids = self._tokenize([inp])
                keys.extend(ids)
            else:
                k = inp.key()
                if k not in self._media_ids:
                    self._media_ids[k] = self._tokenize([inp])
                ids = self._media_ids[k]
                keys.extend(("media", k[1], t) for t in ids)
            pieces.append((inp, ids))
        return keys, pieces

    def resident_keys(self, session) -> list:
        """The keys of what `session` holds: its ids, with the media blocks this residency put there."""
        keys = list(session.tokens)
        for start, end, digest in self._media:
            if end <= len(keys):
                keys[start:end] = [("media", digest, t) for t in keys[start:end]]
        return keys

    def move_to(self, session, keys: list, pieces: list) -> Stats:
        """Seek `session` to the longest exact resident prefix of the target and prefill the rest."""
        rebuilt = not session.can_seek(session.position)
        if rebuilt:  # poisoned by a failed forward: rebuild from the transcript
            self.emptied(session)
        plan = plan_prefix(self.resident_keys(session), keys, session.can_seek)
        if plan.fallback:
            self.emptied(session)
        else:
            self.seek(session, plan.keep)
        cached = None
        if plan.prefill:
            session.prefill(slice_inputs(pieces, plan.keep))
            self._media += _media_blocks(pieces, keys, plan.keep)
            cached = getattr(session, "last_cached", None)  # a server restart shows here: reused, yet not cached
        return Stats(plan.keep, plan.prefill, plan.fallback or rebuilt, server_cached=cached)

    def seek_if_prefix(self, session, keys: list) -> Stats | None:
        """Seek back to `keys` when they are exactly a resident prefix (a rewind); None when not."""
        plan = plan_prefix(self.resident_keys(session), keys, session.can_seek)
        if plan.fallback or plan.prefill or not session.can_seek(plan.keep):
            return None
        self.seek(session, plan.keep)
        return Stats(plan.keep, 0, False)

    def seek(self, session, pos: int) -> None:
        session.seek(pos)
        self._media = [b for b in self._media if b[1] <= pos]

    def emptied(self, session=None) -> None:
        """`session` (if given) is reset; nothing of it is resident any more."""
        if session is not None:
            session.reset()
        self._media = []


def _media_blocks(pieces, keys, start: int) -> list[tuple[int, int, str]]:
    out, pos = [], 0
    for inp, ids in pieces:
        if inp.kind not in ("text", "tokens") and pos >= start and ids:
            out.append((pos, pos + len(ids), keys[pos][1]))
        pos += len(ids)
    return out


def slice_inputs(pieces, start: int) -> list[MultimodalInput]:
    """The inputs from position `start` on; text is passed as its exact ids."""
    out, pos, run = [], 0, []
    for inp, ids in pieces:
        end = pos + len(ids)
        if end > start:
            if inp.kind in ("text", "tokens"):
                run.extend(ids[max(0, start - pos):])
            else:
                assert pos >= start, "a cut inside a media block"
                if run:
                    out.append(MultimodalInput.tokens(run))
                    run = []
                out.append(inp)
        pos = end
    if run:
        out.append(MultimodalInput.tokens(run))
    return out
