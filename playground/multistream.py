"""Several replies streaming at once, one decode step for each per round.

Knows nothing of history, rendering or the tree: it gets sessions already at
the prompt (forks of one prefill) and one empty reply turn each, and fills the
turns in. Each round is one `engine.decode_batch` over the replies still
going, so an engine that can batch forwards them together (engines/base.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterator

from engines import ContextFull, MultimodalInput, SamplingConfig

from .stopstrings import StopMatcher


@dataclass
class Reply:
    """One reply of a compare: its session, the turn it fills, how it samples."""

    session: object
    turn: object  # an assistant Turn: token_ids, token_info and parts grow here
    sampling: SamplingConfig
    matcher: StopMatcher
    n: int = 0  # tokens made
    finish: str | None = None  # a finish reason once it ended


@dataclass
class Progress:
    """Shared figures for the stats line."""

    t_first: float | None = None  # when the first token of any reply arrived
    t_last: float | None = None
    tokens: int = 0


def stream(engine, replies: list[Reply], max_new_tokens: int, stop_asked, token_info: Callable,
           progress: Progress) -> Iterator[tuple[int, str]]:
    """Decode every reply until each ends; yields (reply index, visible text piece).

    `stop_asked` (a threading.Event) ends all of them at the next round.
    """
    live = list(replies)
    while live:
        if stop_asked.is_set():
            for r in live:
                r.finish = "stopped"
            break
        try:
            results = engine.decode_batch([r.session for r in live], [r.sampling for r in live])
        except ContextFull:  # the replies sit at one position, so all of them are full
            for r in live:
                r.finish = "context_full"
            break
        pieces = []
        for r, res in zip(live, results):
            if res.is_terminal:
                r.finish = "eos" if res.is_eos else "stopped"
                continue
            r.n += 1
            r.turn.token_ids.append(res.token_id)
            r.turn.token_info.append(token_info(r.session, res))
            visible, hit = r.matcher.feed(res.text_piece)
            if visible:
                r.turn.parts = [MultimodalInput.text(r.turn.text + visible)]
                pieces.append((replies.index(r), visible))
            if hit:
                r.finish = "stop_string"
            elif r.n >= max_new_tokens:
                r.finish = "length"
        now = time.perf_counter()
        progress.tokens += sum(1 for res in results if not res.is_terminal)
        progress.t_first = progress.t_first or (now if progress.tokens else None)
        progress.t_last = now
        live = [r for r in live if r.finish is None]
        yield from pieces
    for k, r in enumerate(replies):
        tail = "" if r.finish == "stop_string" else r.matcher.flush()
        if tail:
            r.turn.parts = [MultimodalInput.text(r.turn.text + tail)]
            yield k, tail
