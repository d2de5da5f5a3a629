"""Stop strings over a stream of text pieces, keeping the string out of view."""

from __future__ import annotations

from typing import Sequence


class StopMatcher:
    """`feed(piece)` returns (text safe to show, whether a stop string matched).

    Text that could still be the start of a stop string is held back until
    the next piece decides; `flush()` releases it when the stream ends.
    """

    def __init__(self, stop_strings: Sequence[str]):
        self.stops = tuple(stop_strings)
        self.pending = ""

    def feed(self, piece: str) -> tuple[str, bool]:
        if not self.stops:
            return piece, False
        self.pending += piece
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            visible, self.pending = self.pending[: min(hits)], ""
            return visible, True
        hold = self._partial_suffix()
        cut = len(self.pending) - hold
        visible, self.pending = self.pending[:cut], self.pending[cut:]
        return visible, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out

    def _partial_suffix(self) -> int:
        """Length of the longest suffix of `pending` that starts some stop string."""
        best = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.pending)), best, -1):
                if self.pending.endswith(s[:k]):
                    best = k
                    break
        return best
