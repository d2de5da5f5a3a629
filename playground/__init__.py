"""Everything a person touches; knows nothing of torch or tokenizers."""

from .conversation import Conversation, Stats, TokenInfo, Turn

__all__ = ["Conversation", "Stats", "TokenInfo", "Turn"]
