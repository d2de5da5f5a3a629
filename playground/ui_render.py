"""Moved to `playground.ui.render`; kept so older imports work."""

from playground.ui.render import *  # noqa: F401,F403
from playground.ui.render import chat_messages, context_html, tokens_html  # noqa: F401
