"""The tree of turns behind a conversation: nothing an action replaces is lost.

Knows nothing of sessions, tokens or rendering. Every turn keeps `children`
(the turns that followed it on any branch, in creation order) and `chosen`
(the child that was current when it was last on the current branch). A
`Root` above the first turns plays the same part. The current branch is a
path from the root; making a new path current (`graft`) adds its new turns
as children, so whatever it replaces stays behind as a sibling branch.
"""

from __future__ import annotations


class Root:
    """The parent of the first turns (system prompt, or the first user turn and its edits)."""

    def __init__(self):
        self.children: list = []
        self.chosen = None


def index_of(children: list, turn) -> int:
    """Position of `turn` among `children`, by identity (two equal replies are two branches)."""
    for k, c in enumerate(children):
        if c is turn:
            return k
    raise ValueError("turn is not a child of this parent")


def graft(root, path: list) -> None:
    """Make `path` the current branch: each turn a child of the one before it (added
    at the end when new) and the chosen one; the last turn chooses nothing."""
    parent = root
    for turn in path:
        if not any(c is turn for c in parent.children):
            _drop_empty_replies(parent)
            parent.children.append(turn)
        parent.chosen = turn
        parent = turn
    parent.chosen = None


def _drop_empty_replies(parent) -> None:
    """A reply stopped before its first token, with nothing after it, is not worth a branch."""
    parent.children[:] = [c for c in parent.children
                          if c.role != "assistant" or c.token_ids or c.children]


def follow(turn) -> list:
    """`turn` and the turns it leads to along each turn's chosen child."""
    path = [turn]
    while path[-1].chosen is not None:
        path.append(path[-1].chosen)
    return path


def prune(parent, turn) -> None:
    """Remove `turn` (and what follows it) from `parent`'s children."""
    parent.children.pop(index_of(parent.children, turn))
    if parent.chosen is turn:
        parent.chosen = None


def replace_head(root, path: list, head) -> list:
    """`path` with its system turn (turn 0, if any) replaced by `head`, a new system turn
    (None removes it). The first user turns and their siblings move under the new head;
    returns the new path."""
    old = path[0] if path and path[0].role == "system" else None
    below = old or root  # what holds the first user turns and their siblings
    kids, chosen = list(below.children), below.chosen
    rest = path[1:] if old else list(path)
    if head is None:
        root.children, root.chosen = kids, chosen
        return rest
    head.children, head.chosen = kids, chosen
    root.children, root.chosen = [head], head
    return [head] + rest


def covered(turn, siblings: list) -> bool:
    """Whether dropping `turn` loses nothing: no later turns, and its reply ids
    start another sibling's (a cut made by a rewind that was never continued)."""
    if turn.children or turn.role != "assistant":
        return False
    ids = list(turn.token_ids or [])
    return any(s is not turn and s.role == "assistant" and list(s.token_ids or [])[:len(ids)] == ids
               for s in siblings)
