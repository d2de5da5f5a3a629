"""Argument checks for a conversation's actions, run before anything changes.

Knows nothing of sessions or turns' history: each check looks at its arguments
(and, for message parts, what the engine takes) and raises `InvalidArgument` or
`NotSupported` with the offending value in the message.
"""

from __future__ import annotations

from engines import InvalidArgument, MultimodalInput, NotSupported, SamplingConfig


def check_generation(sampling, max_new_tokens, stop_strings) -> None:
    if not isinstance(sampling, SamplingConfig):
        raise InvalidArgument(f"sampling must be a SamplingConfig, got {type(sampling).__name__}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise InvalidArgument(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if not isinstance(stop_strings, (list, tuple)) or any(not isinstance(s, str) or not s for s in stop_strings):
        raise InvalidArgument("stop_strings must be a list of non-empty strings")


def check_parts(engine, parts) -> list[MultimodalInput]:
    """A message's parts as a list (a str is one text part), each one the engine takes;
    media are validated now by tokenizing them."""
    if isinstance(parts, str):
        parts = [MultimodalInput.text(parts)]
    if not isinstance(parts, (list, tuple)) or not parts:
        raise InvalidArgument("a message needs at least one part (text, image or audio)")
    for j, p in enumerate(parts):
        if not isinstance(p, MultimodalInput):
            raise InvalidArgument(f"part {j} is a {type(p).__name__}, not a MultimodalInput")
        if p.kind == "text" and not p.value.strip():
            raise InvalidArgument("the message is empty: type some text or attach a file")
        if p.kind not in engine.modalities:
            raise NotSupported(
                f"{engine.name} cannot take {p.kind} input; it takes "
                f"{', '.join(sorted(engine.modalities - {'tokens'}))}"
            )
    engine.tokenize(list(parts))  # validates media now, before anything changes
    return list(parts)


def check_index(i, n: int) -> None:
    """`i` indexes a list of `n` turns."""
    if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n:
        raise InvalidArgument(f"turn index {i!r} is outside 0..{n - 1}")
