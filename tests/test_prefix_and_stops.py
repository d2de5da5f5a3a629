"""Table-driven tests of the two pure pieces: the reuse plan and stop strings."""

import pytest

from playground.prefix import Plan, plan_prefix
from playground.stopstrings import StopMatcher

A, B = ("media", "digest-a", 7), ("media", "digest-b", 7)  # same placeholder id, other content

ALWAYS = lambda pos: True  # noqa: E731


@pytest.mark.parametrize(
    "resident, target, can_seek, plan",
    [
        ([], [1, 2, 3], ALWAYS, Plan(0, 3, False)),  # empty session: prefill all
        ([1, 2], [1, 2, 3, 4], ALWAYS, Plan(2, 2, False)),  # next turn: append
        ([1, 2, 3, 4], [1, 2, 3, 4], ALWAYS, Plan(4, 0, False)),  # continue: nothing to do
        ([1, 2, 3, 4], [1, 2], ALWAYS, Plan(2, 0, False)),  # rewind: seek back only
        ([1, 2, 3, 4], [1, 2, 9], ALWAYS, Plan(2, 1, False)),  # edit: keep the common prefix
        ([1, A, A, 5], [1, B, B, 5], ALWAYS, Plan(1, 3, False)),  # changed image, same ids
        ([1, A, A, 5], [1, A, A, 6], ALWAYS, Plan(3, 1, False)),  # same image kept
        ([1, 2, 3, 4], [1, 2, 9], lambda p: p == 0 or p >= 3, Plan(0, 3, True)),  # below a floor
        ([1, 2, 3], [1, 2, 3, 4], lambda p: p == 0, Plan(3, 1, False)),  # appending needs no seek
        ([5, 6], [1, 2], ALWAYS, Plan(0, 2, False)),  # nothing shared
    ],
)
def test_plan_prefix(resident, target, can_seek, plan):
    assert plan_prefix(resident, target, can_seek) == plan


@pytest.mark.parametrize(
    "stops, pieces, shown, hit",
    [
        ([], ["a", "b"], "ab", False),
        (["END"], ["abc", "E", "N", "D", "x"], "abc", True),  # split across pieces, held back
        (["END"], ["abE", "Nx"], "abENx", False),  # a false start is released
        (["\n\n", "User:"], ["hi\n", "\nmore"], "hi", True),
        (["User:"], ["ok Us"], "ok ", False),  # held back until decided (flush releases)
        (["ab", "b"], ["xab"], "x", True),  # earliest match wins
    ],
)
def test_stop_matcher(stops, pieces, shown, hit):
    m = StopMatcher(stops)
    out, got = "", False
    for p in pieces:
        text, h = m.feed(p)
        out += text
        if h:
            got = True
            break
    assert out == shown and got == hit
    if not hit:
        assert out + m.flush() == "".join(pieces)
