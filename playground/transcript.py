"""Turns <-> JSON-ready messages (export and import) and <-> render messages.

Media travel inside the file as base64; an import never reads a path or URL
named in the file, since on a server that would expose the server's files.

The transcript format: a list of messages, the current branch, oldest first:

    {"role": "user", "content": "hi"}                  (or a list of parts)
    {"role": "assistant", "content": "Hello!", "token_ids": [...], "sampling": {...}, "model": {...}}

A message with alternatives (a regenerated or compared reply, an edited turn)
also carries them, so the file holds the whole tree:

    "sibling_index": 1,                                 where this one sits among all of them
    "siblings": [[{message}, {message}, ...], ...]       the others, in creation order

Each sibling is a branch: the alternative message itself, then what followed it
on that branch (its own later messages may carry "siblings" again; its first
message does not, its siblings being this list). When the current branch ends
at a turn that other branches continue (after an undo), its last message
carries them as "next_branches": [[...], ...]. A flat list without these keys,
as older versions wrote, is a conversation without branches.
"""

from __future__ import annotations

import base64
import io
import os
from typing import Callable

from engines import EngineError, InvalidArgument, MultimodalInput, SamplingConfig

from . import branches
from .turns import ROLES, Turn, plain_token_info


# ---------------------------------------------------------------- rendering


def turn_to_render_message(turn) -> dict:
    """The message `engine.render` gets: exact ids for replies, media as inputs."""
    if turn.role == "assistant":
        return {"role": "assistant", "content": turn.text, "token_ids": list(turn.token_ids or [])}
    if all(p.kind == "text" for p in turn.parts):
        return {"role": turn.role, "content": turn.text}
    parts = []
    for p in turn.parts:
        if p.kind == "text":
            parts.append({"type": "text", "text": p.value})
        elif p.kind == "tokens":
            parts.append({"type": "tokens", "input": p})
        else:
            parts.append({"type": p.kind, "input": p})
    return {"role": turn.role, "content": parts}


# ---------------------------------------------------------------- export


def tree_to_messages(path: list, root, model: dict, encoded: dict | None = None) -> list[dict]:
    """The current branch `path` (under `root`) as messages, every alternative included.
    `encoded`: a memo of media already encoded (id(part) -> (part, base64)), so that a
    conversation exported after every action encodes each medium once."""
    return _branch_to_messages(path, root, model, True, {} if encoded is None else encoded)


def _branch_to_messages(path: list, parent, model: dict, describe_first: bool, encoded: dict) -> list[dict]:
    out = []
    for j, turn in enumerate(path):
        m = turn_to_message(turn, model, encoded)
        if (j or describe_first) and len(parent.children) > 1:
            m["sibling_index"] = branches.index_of(parent.children, turn)
            m["siblings"] = [_branch_to_messages(branches.follow(s), parent, model, False, encoded)
                             for s in parent.children if s is not turn]
        out.append(m)
        parent = turn
    if out and parent.children and parent.chosen is None:
        out[-1]["next_branches"] = [_branch_to_messages(branches.follow(c), parent, model, False, encoded)
                                    for c in parent.children]
    return out


def turn_to_message(turn, model: dict, encoded: dict | None = None) -> dict:
    if turn.role == "assistant":
        return {
            "role": "assistant",
            "content": turn.text,
            "token_ids": list(turn.token_ids or []),
            "sampling": dict(turn.sampling or {}),
            "model": dict(model),
        }
    if all(p.kind == "text" for p in turn.parts):
        return {"role": turn.role, "content": turn.text}
    encoded = {} if encoded is None else encoded
    return {"role": turn.role, "content": [_export_part(p, encoded) for p in turn.parts]}


def _export_part(p: MultimodalInput, encoded: dict) -> dict:
    if p.kind == "text":
        return {"type": "text", "text": p.value}
    if p.kind == "tokens":
        return {"type": "tokens", "ids": list(p.value)}
    hit = encoded.get(id(p))
    if hit is None or hit[0] is not p:  # the part is kept with its data, so its id is not reused
        hit = encoded[id(p)] = (p, base64.b64encode(_media_bytes(p)).decode("ascii"))
    return {"type": p.kind, "data": hit[1]}


def _media_bytes(p: MultimodalInput) -> bytes:
    v = p.value
    if isinstance(v, bytes):
        return v
    if isinstance(v, (str, os.PathLike)):
        with open(v, "rb") as f:
            return f.read()
    buf = io.BytesIO()
    if p.kind == "image":
        v.save(buf, format="PNG")
    else:
        import soundfile

        soundfile.write(buf, v.T if v.ndim == 2 else v, p.sample_rate, format="WAV", subtype="FLOAT")
    return buf.getvalue()


# ---------------------------------------------------------------- import


def messages_to_tree(engine, messages, tokenize: Callable) -> tuple[branches.Root, list, list[str]]:
    """Validate `messages` (the format above) and build the tree of turns.
    Returns (its root, the current branch, notes)."""
    if not isinstance(messages, list):
        raise InvalidArgument(f"messages must be a list of dicts, got {type(messages).__name__}")
    root, notes = branches.Root(), []
    path = _messages_to_branch(engine, messages, tokenize, notes, root, "", describe_first=True)
    return root, path, notes


def messages_to_turns(engine, messages, tokenize: Callable) -> tuple[list, list[str]]:
    """Validate `messages` and build the current branch's turns. Returns (turns, notes)."""
    _, path, notes = messages_to_tree(engine, messages, tokenize)
    return path, notes


def _messages_to_branch(engine, messages, tokenize, notes, parent, where: str, describe_first: bool) -> list:
    """The turns of one branch, linked below `parent`. Its first turn is attached by the
    caller (it is one of a list of siblings) unless `describe_first`."""
    path = []
    for j, m in enumerate(messages):
        label = f"{where}{j}"
        turn = _message_to_turn(engine, m, label, tokenize, notes, top_first=not where and j == 0)
        if j or describe_first:
            others = _import_branches(engine, m, "siblings", label, tokenize, notes, parent, role=turn.role)
            k = m.get("sibling_index", 0) if others else 0
            if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= len(others):
                raise InvalidArgument(f"message {label}: sibling_index must be an int in 0..{len(others)}")
            kids = [b[0] for b in others]
            kids.insert(k, turn)
            parent.children.extend(kids)
            parent.chosen = turn
        path.append(turn)
        parent = turn
    if messages and isinstance(messages[-1], dict) and messages[-1].get("next_branches"):
        label = f"{where}{len(messages) - 1}"
        after = _import_branches(engine, messages[-1], "next_branches", label, tokenize, notes, parent)
        parent.children.extend(b[0] for b in after)
    return path


def _import_branches(engine, m: dict, key: str, label: str, tokenize, notes, parent, role=None) -> list[list]:
    found = m.get(key) or []
    if not isinstance(found, list) or any(not isinstance(b, list) or not b for b in found):
        raise InvalidArgument(f"message {label}: {key} must be a list of non-empty lists of messages")
    out = []
    for b, branch in enumerate(found):
        path = _messages_to_branch(engine, branch, tokenize, notes, parent, f"{label}, {key} {b}, message ",
                                   describe_first=False)
        if role is not None and path[0].role != role:
            raise InvalidArgument(f"message {label}: a sibling of a {role} message must be a {role} message")
        out.append(path)
    return out


def _message_to_turn(engine, m, i, tokenize, notes: list, top_first: bool):
    """One message as a Turn; `i` names it in errors and notes."""
    if not isinstance(m, dict) or m.get("role") not in ROLES:
        raise InvalidArgument(f"message {i} needs a role of {', '.join(ROLES)}")
    role = m["role"]
    if role == "system" and not top_first:
        raise InvalidArgument(f"message {i}: a system message may only come first")
    if role != "assistant":
        parts = _import_parts(m.get("content"), i)
        _check_parts(parts, i, tokenize)
        return Turn(role, parts)
    content = m.get("content", "")
    if not isinstance(content, str):
        raise InvalidArgument(f"message {i}: assistant content must be a str")
    ids, note = _reply_ids(engine, m, i, tokenize)
    if note:
        notes.append(note)
    sampling = m.get("sampling") or None
    if sampling is not None:
        try:
            sampling = SamplingConfig.from_dict(sampling).to_dict()
        except InvalidArgument as e:
            raise InvalidArgument(f"message {i}: sampling: {e}") from None
    return Turn("assistant", [MultimodalInput.text(content)], token_ids=ids, sampling=sampling,
                token_info=plain_token_info(engine, ids))


def _reply_ids(engine, m: dict, i: int, tokenize) -> tuple[list[int], str | None]:
    """The reply's exact ids when they can be trusted on this engine, else its text's."""
    content = m.get("content", "")
    ids = m.get("token_ids")
    model = m.get("model") or {}
    same = not model.get("tokenizer") or model.get("tokenizer") == engine.fingerprint
    if ids is not None and same:
        try:
            if ids:
                tokenize([MultimodalInput.tokens(ids)])
            return list(ids), None
        except InvalidArgument as e:
            why = str(e)
    elif ids is not None:
        why = f"exported by {model.get('name', 'another model')} with a different tokenizer"
    else:
        return (tokenize([MultimodalInput.text(content)]) if content else []), None
    note = f"message {i}: token ids not used ({why}); the reply's text was re-tokenised"
    return (tokenize([MultimodalInput.text(content)]) if content else []), note


def _check_parts(parts, i: int, tokenize) -> None:
    """Ids and media are checked at import (media are memoized by the engine), so a bad
    part is refused now, naming its message, rather than failing every later action."""
    try:
        tokenize(parts)
    except EngineError as e:
        raise type(e)(f"message {i}: {e}") from None


def _import_parts(content, i: int) -> list[MultimodalInput]:
    if isinstance(content, str):
        if not content:
            raise InvalidArgument(f"message {i} is empty")
        return [MultimodalInput.text(content)]
    if not isinstance(content, list) or not content:
        raise InvalidArgument(f"message {i}: content must be a str or a non-empty list of parts")
    parts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append(MultimodalInput.text(part["text"]))
        elif kind == "tokens":
            parts.append(MultimodalInput.tokens(part.get("ids", ())))
        elif kind in ("image", "audio"):
            parts.append(_import_media(kind, part, i, j))
        else:
            raise InvalidArgument(f"message {i} part {j}: type must be text, image or audio")
    return parts


def _import_media(kind: str, part: dict, i: int, j: int) -> MultimodalInput:
    data = part.get("data")
    if not isinstance(data, str):
        raise InvalidArgument(
            f"message {i} part {j}: {kind} must be embedded as base64 'data'; "
            "an import never reads file paths or URLs named in a transcript"
        )
    try:
        raw = base64.b64decode(data, validate=True)
    except ValueError:
        raise InvalidArgument(f"message {i} part {j}: {kind} 'data' is not valid base64") from None
    return MultimodalInput.image(raw) if kind == "image" else MultimodalInput.audio(raw)
