"""The cache-reuse decision: a pure function, covered by a table-driven test.

Positions are compared by key: a plain token id for text, and
("media", content digest, id) for a position inside a media block, so two
different images that expand to the same placeholder ids never match.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Hashable, Sequence


@dataclass(frozen=True)
class Plan:
    keep: int  # resident positions kept (seek there)
    prefill: int  # target positions to prefill after them
    fallback: bool  # the exact prefix could not be kept; started from 0


def common_prefix(a: Sequence[Hashable], b: Sequence[Hashable]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def plan_prefix(resident: Sequence[Hashable], target: Sequence[Hashable], can_seek: Callable[[int], bool]) -> Plan:
    """Keep the longest exact prefix of `resident` that `target` starts with.

    If the engine cannot seek there (sliding-window floor, static cache), fall
    back to an empty session and prefill everything.
    """
    n = common_prefix(resident, target)
    if n < len(resident) and not can_seek(n):
        return Plan(0, len(target), True)
    return Plan(n, len(target) - n, False)
