"""What one handler call shows: a `View`, turned into Gradio outputs in one place.

Knows nothing of conversations or tabs: handlers fill a View, `outputs` lays it
out in the order `layout.py` wires the widgets. The order is public (the HTTP
API's outputs): chat, box, status, context, tokens, the action buttons, the
compare panel and its button, then the browser-stored transcript.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import gradio as gr

SKIP = None  # a View field left as None leaves its widget as it is
BUTTONS = ("stop", "regenerate", "continue", "step", "reset", "import")
# The outputs, in wiring order.
OUTPUTS = ("chat", "box", "status", "context", "tokens", *BUTTONS, "compare", "compare_button", "stored")
# What a client (gradio_client, the HTTP API) gets of them: buttons carry no value, the
# Import button (a file component) does.
CLIENT_OUTPUTS = ("chat", "box", "status", "context", "tokens", "import", "compare", "stored")


@dataclass
class View:
    """One update. `streaming`: True while a reply streams (Stop on, actions off), False
    after (the reverse), None: the buttons stay as they are. `live`: a frame of a running
    stream, whose buttons repeat their labels (cheap) rather than being rebuilt."""

    chat: Any = SKIP
    box: Any = SKIP
    status: str = ""
    context: Any = SKIP
    tokens: Any = SKIP
    compare: Any = SKIP
    stored: Any = SKIP
    streaming: bool | None = None
    live: bool = False
    system_prompt: Any = SKIP  # the import and page-load events also set these two
    raw: Any = SKIP

    @classmethod
    def read(cls, values) -> "View":
        """A View from an output tuple as a client gets it (tests, gradio_client callers)."""
        named = dict(zip(CLIENT_OUTPUTS, values))
        return cls(**{f.name: named[f.name] for f in fields(cls) if f.name in named})


def outputs(view: View, labels: dict, extra: bool = False, stored: bool = True) -> tuple:
    """`view` as the wired outputs' values. `labels`: each button's label (from the layout).
    `extra`: system prompt and raw follow; `stored=False`: the event has no stored output.

    In Gradio 6.31 a skip rebuilds a component (the Import UploadButton's rebuild builds
    a JSON schema, about 15 ms), while its value costs next to nothing: a live frame
    gives the buttons their labels. Only the box keeps `skip` there, so that nothing
    typed meanwhile is overwritten."""
    skip = gr.skip()

    def value(v):
        return skip if v is None else v

    if view.live:
        states = [labels[b] for b in BUTTONS[:-1]] + [None, labels["compare_button"]]
    elif view.streaming is None:
        states = [skip] * 7
    else:
        states = [gr.update(interactive=view.streaming)] + [gr.update(interactive=not view.streaming)] * 6
    out = (value(view.chat), value(view.box), view.status, value(view.context), value(view.tokens),
           *states[:6], value(view.compare), states[6])
    if stored:
        out += (value(view.stored),)
    if extra:
        out += (value(view.system_prompt), value(view.raw))
    return out
