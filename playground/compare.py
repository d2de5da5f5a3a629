"""The compare action's machinery: 2-4 replies to one prompt from one prefill.

Knows nothing of rendering, residency or the branch tree: `Conversation.compare`
checks the call here, makes the prompt resident on its session, and hands this
module that session. Here the session is copied (forked, or prefilled again where
the engine cannot fork), one reply turn made per copy, the replies streamed
together (multistream.py), and the figures kept.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Iterator, Sequence

from engines import InvalidArgument, MultimodalInput, NotSupported, SamplingConfig

from . import multistream
from .residency import slice_inputs
from .stopstrings import StopMatcher
from .turns import Busy, Piece, Stats, Turn

COMPARE_MIN, COMPARE_MAX = 2, 4  # replies one compare may sample


def check_samplings(samplings) -> None:
    if not isinstance(samplings, (list, tuple)) or not COMPARE_MIN <= len(samplings) <= COMPARE_MAX:
        raise InvalidArgument(f"compare takes a list of {COMPARE_MIN} to {COMPARE_MAX} SamplingConfigs")
    for j, c in enumerate(samplings):
        if not isinstance(c, SamplingConfig):
            raise InvalidArgument(f"samplings[{j}] must be a SamplingConfig, got {type(c).__name__}")


def turns_before(turns: list[Turn], new_user: Turn | None) -> list[Turn]:
    """The turns the replies answer: `turns` and `new_user` (a new message) when given,
    else up to the last user turn (a reply it has stays as a sibling)."""
    if new_user is not None:
        return turns + [new_user]
    if turns and turns[-1].role == "user":
        return list(turns)
    if len(turns) >= 2 and turns[-1].role == "assistant" and turns[-2].role == "user":
        return turns[:-1]
    raise InvalidArgument("nothing to compare: there is no user turn to answer; send a message first")


def check_room(engine, replies: int, has_session: bool) -> None:
    """`Busy` up front when the engine cannot hold the sessions `replies` need at once."""
    cap = engine.capacity.max_sessions
    need = replies - 1 + (not has_session)
    free = cap - engine.open_sessions
    if need > free:
        raise Busy(
            f"busy: comparing {replies} replies needs {need} more session(s) at once, but only "
            f"{max(free, 0)} of the engine's {cap} are free; compare fewer replies or try again later"
        )


def copies(engine, session, n: int, target) -> tuple[list, int]:
    """`n` more sessions holding what `session` holds: forks, or, where the engine
    cannot fork, fresh sessions prefilled again with `target` (keys, pieces). Returns
    them and the tokens that second way prefilled."""
    made, extra = [], 0
    try:
        for _ in range(n):
            try:
                made.append(session.fork())
            except NotSupported:
                made.append(engine.create_session())
                made[-1].prefill(slice_inputs(target[1], 0))
                extra += len(target[0])
    except BaseException as e:
        for c in made:
            c.close()
        if isinstance(e, Busy):
            raise Busy(f"busy: a compare needs {n + 1} sessions at once and the engine has no room "
                       f"({e}); compare fewer replies or try again later") from e
        raise
    return made, extra


class Run:
    """One compare in flight: its sessions (the conversation's first), the reply turns
    they fill, and the figures. Made once the prompt is resident on `session`.

    Args:
        stats: the shared prefill's figures; t0: when the action began.
    """

    def __init__(self, engine, session, target, samplings: Sequence[SamplingConfig], stop_strings,
                 stats: Stats, t0: float):
        self.engine = engine
        self.forks, extra = copies(engine, session, len(samplings) - 1, target)
        self.turns = [Turn("assistant", [MultimodalInput.text("")], token_ids=[], sampling=c.to_dict())
                      for c in samplings]
        self.stats = replace(stats, replies=len(self.turns), extra_prefilled=extra)
        self.replies = [multistream.Reply(s, t, c, StopMatcher(stop_strings))
                        for s, t, c in zip([session] + self.forks, self.turns, samplings)]
        self.progress = multistream.Progress()
        self.t0 = t0

    def pieces(self, start: int, max_new_tokens: int, stop_asked, token_info) -> Iterator[Piece]:
        """The replies' visible text as they stream, with the figures so far."""
        first = self.replies[0]
        for k, piece in multistream.stream(self.engine, self.replies, max_new_tokens, stop_asked,
                                           token_info, self.progress):
            yield Piece(piece, start + first.n, self.figures(), k)

    def figures(self) -> Stats:
        """The shared prefill's figures, then all the replies' tokens together."""
        replies, p = self.replies, self.progress
        n, first, last = p.tokens, p.t_first, p.t_last
        rate = (n - len(replies)) / (last - first) if first and last and last > first and n > len(replies) else None
        finished = all(r.finish for r in replies)
        return replace(self.stats, ttft_s=first - self.t0 if first else None, decode_tok_s=rate, new_tokens=n,
                       finish_reason=replies[0].finish if finished else None,
                       finish_reasons=tuple(r.finish for r in replies) if finished else ())

    def close(self) -> Stats:
        """Mark the replies still going as stopped (closed by the consumer, or an error),
        free the copies, and return the final figures."""
        for r in self.replies:
            r.finish = r.finish or "stopped"
        for fork in self.forks:
            fork.close()
        return self.figures()


def pairs(events):
    """The public compare stream: (reply index, text piece)."""
    try:
        for e in events:
            if type(e) is Piece:
                yield e.reply, e.text
    finally:
        events.close()
