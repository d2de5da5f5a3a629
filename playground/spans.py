"""Where each turn sits in the KV: its [start, end) span and its media blocks' spans.

Knows nothing of sessions or the template: it is handed functions that render
turns (`closed`, `open_reply`) and count their keys (`keys_of`), and the KV
position. Best effort: a template that cannot render a prefix on its own (no
user turn yet) leaves spans unset.
"""

from __future__ import annotations

from typing import Callable

from engines import EngineError


def fingerprint(turn) -> tuple:
    """Everything about a turn that its render depends on."""
    return turn.role, tuple(p.key() for p in turn.parts), tuple(turn.token_ids or ())


class SpanBook:
    """Sets `turn.span` and `turn.media_spans`, remembering turn ends by prefix.

    Turn k ends where `turns[:k]` rendered alone ends. That depends only on those
    turns, so ends are remembered by prefix and only new or changed turns are rendered
    (rendering every prefix after every action was O(turns^2) in tokens)."""

    def __init__(self):
        self._memo: tuple[list, list] = ([], [])  # (fingerprints, turn ends) of the last pass

    def assign(self, turns: list, position: int, setting: tuple, closed: Callable, open_reply: Callable,
               keys_of: Callable) -> None:
        """`setting` is what every render depends on (raw mode, template); `closed(turns)` renders
        turns as a closed conversation, `open_reply(before, reply)` with the reply's exact ids
        left open; `keys_of(inputs)` gives (keys, pieces)."""
        for t in turns:
            t.span, t.media_spans = None, []
        if not turns:
            return
        try:
            self._assign(turns, position, setting, closed, open_reply, keys_of)
        except EngineError:
            for t in turns:
                t.span, t.media_spans = None, []

    def _assign(self, turns, position, setting, closed, open_reply, keys_of) -> None:
        fps = [setting] + [fingerprint(t) for t in turns]
        old_fps, old_ends = self._memo
        same = 0
        while same < min(len(fps), len(old_fps)) and fps[same] == old_fps[same]:
            same += 1
        ends, memo = [], []
        last = turns[-1]
        for k in range(1, len(turns) + 1):
            if k == len(turns) and last.role == "assistant":  # its exact ids, not a closed turn
                ends.append(len(keys_of(open_reply(turns[:-1], last))[0]))
                memo.append(None)
                continue
            end = old_ends[k - 1] if k < same and old_ends[k - 1] is not None else None
            if end is None:
                end = len(keys_of(closed(turns[:k]))[0])
            ends.append(end)
            memo.append(end)
        self._memo = (fps, memo)
        start = 0
        for t, end in zip(turns, ends):
            if end <= position:
                t.span = (start, end)
            start = end
        owners = {id(p): t for t in turns for p in t.parts if p.kind in ("image", "audio")}
        if not owners:
            return
        inputs = open_reply(turns[:-1], last) if last.role == "assistant" else closed(turns)
        pos = 0
        for inp, ids in keys_of(inputs)[1]:
            t = owners.get(id(inp))
            if t is not None and pos + len(ids) <= position:
                t.media_spans.append((inp.kind, pos, pos + len(ids)))
            pos += len(ids)
