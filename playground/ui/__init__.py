"""The Gradio playground: `build_ui(engine)` and `launch(demo)`.

Knows nothing of tensors or tokenizers: it drives `playground.Conversation`s,
one per browser tab (`playground.sessions.TabRegistry`).

- `layout.py`: the widgets and their wiring; `view.py`: a `View` -> the outputs;
- `handlers.py`, `branches.py`: widget values in, conversation calls, a View out;
- `runner.py`: one action runner for streaming and immediate actions;
- `inputs.py`: widget values -> parts and settings; `render.py`, `assets.py`: HTML, JS, CSS;
- `background.py`: decoding in a thread of its own, so the model never waits for the page.
"""

from playground.ui.layout import build_ui, forget_session_state, launch

__all__ = ["build_ui", "forget_session_state", "launch"]
