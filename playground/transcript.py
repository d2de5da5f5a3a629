"""Turns <-> JSON-ready messages (export and import) and <-> render messages.

Media travel inside the file as base64; an import never reads a path or URL
named in the file, since on a server that would expose the server's files.
"""

from __future__ import annotations

import base64
import io
import os
from typing import Callable

from engines import InvalidArgument, MultimodalInput, SamplingConfig

ROLES = ("system", "user", "assistant")


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


def turn_to_message(turn, model: dict) -> dict:
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
    return {"role": turn.role, "content": [_export_part(p) for p in turn.parts]}


def _export_part(p: MultimodalInput) -> dict:
    if p.kind == "text":
        return {"type": "text", "text": p.value}
    if p.kind == "tokens":
        return {"type": "tokens", "ids": list(p.value)}
    data = _media_bytes(p)
    return {"type": p.kind, "data": base64.b64encode(data).decode("ascii")}


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


def messages_to_turns(engine, messages, tokenize: Callable) -> tuple[list, list[str]]:
    """Validate `messages` and build turns. Returns (turns, notes)."""
    from .conversation import Turn, plain_token_info

    if not isinstance(messages, list):
        raise InvalidArgument(f"messages must be a list of dicts, got {type(messages).__name__}")
    turns, notes = [], []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise InvalidArgument(f"message {i} needs a role of {', '.join(ROLES)}")
        role = m["role"]
        if role == "system" and i != 0:
            raise InvalidArgument(f"message {i}: a system message may only come first")
        if role != "assistant":
            parts = _import_parts(m.get("content"), i)
            turns.append(Turn(role, parts))
            continue
        content = m.get("content", "")
        if not isinstance(content, str):
            raise InvalidArgument(f"message {i}: assistant content must be a str")
        ids, note = _reply_ids(engine, m, i, tokenize)
        if note:
            notes.append(note)
        sampling = m.get("sampling") or None
        if sampling is not None:
            sampling = SamplingConfig.from_dict(sampling).to_dict()
        turns.append(Turn("assistant", [MultimodalInput.text(content)], token_ids=ids, sampling=sampling,
                          token_info=plain_token_info(engine, ids)))
    return turns, notes


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
