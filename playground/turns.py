"""The values a conversation is made of: turns, token info, stats, stream events.

Knows nothing of sessions, rendering, the tree's rules or the UI; imports
nothing of the playground, so every other module can import it. `Busy` (no room
for another session: the engine's, or the deployment's tab limit) is the
contract's own, re-exported here.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace

from engines import Busy, MultimodalInput, SamplingConfig  # noqa: F401 - Busy: re-exported
from engines.chat import ROLES  # noqa: F401 - one definition, the renderer's (re-exported)

FINISH_REASONS = ("eos", "length", "stopped", "stop_string", "context_full")


@dataclass(frozen=True)
class TokenInfo:
    """One generated token with its probability and the top alternatives."""

    id: int
    text: str
    logprob: float | None
    top: tuple = ()  # ((id, text, logprob), ...)


def plain_token_info(engine, ids) -> list[TokenInfo]:
    """Token info without probabilities, for ids this process did not sample (edited,
    imported), so `token_info` stays aligned with `token_ids`."""
    return [TokenInfo(t, engine.decode([t]), None) for t in ids]


@dataclass
class Turn:
    role: str  # "system" | "user" | "assistant"
    parts: list[MultimodalInput]
    span: tuple[int, int] | None = None  # KV [start, end) once resident
    token_ids: list[int] | None = None  # assistant: the exact generated ids
    sampling: dict | None = None  # assistant: the settings, with the seed used
    token_info: list[TokenInfo] = field(default_factory=list)
    media_spans: list[tuple[str, int, int]] = field(default_factory=list)
    # The branch tree (branches.py): every turn that followed this one, and the current one.
    children: list["Turn"] = field(default_factory=list, repr=False, compare=False)
    chosen: "Turn | None" = field(default=None, repr=False, compare=False)

    @property
    def text(self) -> str:
        """The turn's visible text (media left out; a matched stop string cut off)."""
        return "".join(p.value for p in self.parts if p.kind == "text")


@dataclass(frozen=True)
class Stats:
    """What the last action did. `finish_reason` is None while it streams."""

    reused: int
    prefilled: int
    fallback: bool
    ttft_s: float | None = None
    decode_tok_s: float | None = None
    finish_reason: str | None = None
    new_tokens: int = 0  # a compare: all its replies' tokens together
    replies: int = 1  # a compare: how many replies shared the prefill
    extra_prefilled: int = 0  # a compare on an engine that cannot fork: tokens prefilled again
    finish_reasons: tuple = ()  # a compare: each reply's finish reason
    server_cached: int | None = None  # a prefill's prompt tokens the server found in its own cache (if it says)


def seeded(sampling: SamplingConfig, recorded: int | None = None) -> SamplingConfig:
    """`sampling` with a seed: its own, else `recorded` (a reply being continued keeps its
    random stream), else a fresh random one. The one place a seed is drawn."""
    if sampling.seed is not None:
        return sampling
    return replace(sampling, seed=recorded if recorded is not None else random.getrandbits(31))


# ---------------------------------------------------------------- stream events
# What a stream yields with `events=True`: the UI renders these, never the turns the
# decode thread is still filling in.


@dataclass(frozen=True)
class Began:
    """The prefill is done and the replies start. `turns` is the branch now current (its
    reply turns keep growing in the decoding thread: read `texts`, not them)."""

    turns: tuple
    position: int  # KV position before the first new token
    stats: Stats
    replies: tuple = ()  # the reply turns being filled (one; a compare: 2-4)
    texts: tuple = ()  # each reply's text so far (a continued reply has some)
    compare_at: int | None = None  # a compare: the turn index of its replies


@dataclass(frozen=True, slots=True)
class Piece:
    """Visible text of reply `reply`, and where the action stands after it."""

    text: str
    position: int
    stats: Stats
    reply: int = 0
