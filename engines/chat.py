"""Chat-template rendering that keeps exact ids and media out of the text.

An assistant message with "token_ids" and every media part are replaced by
unique sentinel strings before the template runs; the rendered string is then
split at the sentinels, so those parts come back as `tokens` / media inputs
that no re-tokenisation can alter. Knows nothing of models, sessions or
tokenizers beyond `apply_chat_template`.
"""

from __future__ import annotations

import re
import secrets

from .base import InvalidArgument, MultimodalInput, NotSupported

ROLES = ("system", "user", "assistant")


def message_parts(message: dict, index: int) -> list[dict]:
    """The message's content as a list of typed parts ({"type": "text", "text": ...} etc.)."""
    if not isinstance(message, dict):
        raise InvalidArgument(f"message {index} must be a dict, got {type(message).__name__}")
    role = message.get("role")
    if role not in ROLES:
        raise InvalidArgument(f"message {index} has role {role!r}; allowed: {', '.join(ROLES)}")
    content = message.get("content", "")
    if content is None:
        content = ""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise InvalidArgument(f"message {index} content must be a str or a list of parts")
    parts = []
    for j, part in enumerate(content):
        if isinstance(part, str):
            part = {"type": "text", "text": part}
        if not isinstance(part, dict) or part.get("type") not in ("text", "tokens", "image", "audio"):
            raise InvalidArgument(
                f"message {index} part {j} must be a dict with type text, tokens, image or audio"
            )
        parts.append(part)
    return parts


def part_input(part: dict) -> MultimodalInput:
    """A media part as a MultimodalInput: {"type": "image", "input": MultimodalInput}
    or {"type": "image", "image": PIL | path | bytes} / {"type": "audio", "audio": ..., "sample_rate": ...}."""
    value = part.get("input")
    if isinstance(value, MultimodalInput):
        return value
    if part["type"] == "image":
        return MultimodalInput.image(part.get("image"))
    return MultimodalInput.audio(part.get("audio"), part.get("sample_rate"))


def render_messages(
    tokenizer,
    messages: list[dict],
    add_generation_prompt: bool,
    template: str,
    modalities: frozenset,
) -> list[MultimodalInput]:
    """Render `messages` with `template`, splicing exact ids and media.

    `tokenizer` is anything with `apply_chat_template` (`PartsContent` wraps one
    for templates that iterate over parts). Media parts of a kind not in
    `modalities` raise `NotSupported`.
    """
    if not isinstance(messages, list):
        raise InvalidArgument(f"messages must be a list of dicts, got {type(messages).__name__}")
    tag = secrets.token_hex(4)
    spliced: dict[str, MultimodalInput] = {}

    def sentinel(value: MultimodalInput) -> str:
        key = f"\u27e6{tag}:{len(spliced)}\u27e7"
        spliced[key] = value
        return key

    plain = []
    for i, m in enumerate(messages):
        parts = message_parts(m, i)
        ids = m.get("token_ids")
        if ids is not None and m["role"] == "assistant":
            content = sentinel(MultimodalInput.tokens(ids)) if len(ids) else ""
            plain.append({"role": "assistant", "content": content})
            continue
        texts = []
        for part in parts:
            if part["type"] == "text":
                if not isinstance(part.get("text"), str):
                    raise InvalidArgument(f"message {i} has a text part without a str 'text'")
                texts.append(part["text"])
                continue
            if part["type"] == "tokens":
                texts.append(sentinel(part["input"]))
                continue
            if part["type"] not in modalities:
                raise NotSupported(
                    f"message {i} has an {part['type']} part, but this model takes only "
                    f"{', '.join(sorted(modalities))}"
                )
            texts.append(sentinel(part_input(part)))
        plain.append({"role": m["role"], "content": "".join(texts)})

    try:
        text = tokenizer.apply_chat_template(
            plain, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except Exception as e:  # jinja raises many kinds; all mean "this template cannot render these messages"
        raise InvalidArgument(f"the chat template failed to render: {e}") from e
    if not isinstance(text, str):
        raise InvalidArgument("the chat template did not render to a string")
    return split_at_sentinels(text, spliced)


class PartsContent:
    """A tokenizer whose chat template receives str content as one text part:
    multimodal templates (SmolVLM, LLaVA) iterate over a message's parts."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer

    def apply_chat_template(self, messages, **kw):
        parts = [dict(m, content=[{"type": "text", "text": m["content"]}]) if isinstance(m.get("content"), str)
                 else m for m in messages]
        return self._tokenizer.apply_chat_template(parts, **kw)


def split_at_sentinels(text: str, spliced: dict[str, MultimodalInput]) -> list[MultimodalInput]:
    if not spliced:
        return [MultimodalInput.text(text)] if text else []
    pattern = re.compile("|".join(re.escape(k) for k in spliced))
    out, seen, pos = [], set(), 0
    for m in pattern.finditer(text):
        if m.start() > pos:
            out.append(MultimodalInput.text(text[pos : m.start()]))
        out.append(spliced[m.group(0)])
        seen.add(m.group(0))
        pos = m.end()
    if pos < len(text):
        out.append(MultimodalInput.text(text[pos:]))
    missing = len(spliced) - len(seen)
    if missing:
        raise InvalidArgument(f"the chat template dropped {missing} spliced part(s) (assistant ids or media)")
    return out
