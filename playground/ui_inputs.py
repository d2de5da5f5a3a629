"""Moved to `playground.ui.inputs`; kept so older imports work."""

from playground.ui.inputs import *  # noqa: F401,F403
from playground.ui.inputs import SPOKEN_MARK, BadInput, Spoken, speech_to_text  # noqa: F401
