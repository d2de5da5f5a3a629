"""What a conversation wants resident: its turns rendered, the open reply's exact ids after them.

Knows nothing of sessions, the KV or the branch tree: it renders turns with the
engine's chat template (or, in raw mode, passes the user text as is and replies
as their ids) and returns the inputs to prefill.
"""

from __future__ import annotations

from engines import InvalidArgument, MultimodalInput

from .transcript import turn_to_render_message
from .turns import Turn


class Prompt:
    """Renders turns for one conversation's engine, template and mode.

    Args:
        engine: any `engines.Engine` (its `render`).
        chat_template: a Jinja template string overriding the model's own, or None.
        raw: skip the template: user text as is, replies as their exact ids.
    """

    def __init__(self, engine, chat_template: str | None, raw: bool):
        self.engine = engine
        self.chat_template = chat_template
        self.raw = raw

    def open(self, before: list[Turn], reply: Turn | None) -> list[MultimodalInput]:
        """`before` rendered (with a generation prompt when a reply follows) and the
        reply's exact ids after it."""
        if self.raw:
            inputs = []
            for t in before:
                if t.role != "assistant":
                    inputs += t.parts
                elif t.token_ids:
                    inputs.append(MultimodalInput.tokens(t.token_ids))
        else:
            inputs = self.engine.render(
                [turn_to_render_message(t) for t in before],
                add_generation_prompt=reply is not None or not before or before[-1].role != "assistant",
                chat_template=self.chat_template,
            )
        if reply is not None and reply.token_ids:
            inputs = inputs + [MultimodalInput.tokens(reply.token_ids)]
        if not inputs:
            raise InvalidArgument("nothing to prefill: the conversation renders to no tokens")
        return inputs

    def current(self, path: list[Turn]) -> list[MultimodalInput]:
        """What should be resident while `path` is current: its last reply left open."""
        if path and path[-1].role == "assistant":
            return self.open(path[:-1], path[-1])
        return self.open(path, None)

    def closed(self, turns: list[Turn]) -> list[MultimodalInput]:
        """`turns` rendered as a finished conversation (no generation prompt)."""
        if self.raw:
            return self.open(turns, None) if turns else []
        return self.engine.render([turn_to_render_message(t) for t in turns],
                                  add_generation_prompt=False, chat_template=self.chat_template)
