"""Conversation state -> what the widgets show (pure functions, no Gradio, no tensors).

- `chat_messages(conv)`: the Chatbot's messages, one run of messages per turn.
- `context_html(conv)`: the gauge (KV position / max context), turn and media
  spans, and the last action's figures.
- `tokens_html(conv)`: the last reply's tokens with probabilities and
  alternatives; each token carries `data-tok` (its offset) for click-to-rewind.
"""

from __future__ import annotations

import html
import math
import os
import tempfile

from playground.ui_inputs import SPOKEN_MARK, Spoken

MEDIA_DIR = os.path.join(tempfile.gettempdir(), "llm-playground-media")


# --------------------------------------------------------------------------- chat


def part_text(parts) -> str:
    return "".join(p.value for p in parts if p.kind == "text")


def shown_text(parts) -> str:
    """`part_text` as the chat shows it: text heard in a recording is marked 🎤."""
    return "".join(SPOKEN_MARK + p.value if isinstance(p, Spoken) else p.value for p in parts if p.kind == "text")


def media_path(part) -> str | None:
    """A file path Gradio can serve for an image or audio part (written to a temp dir if needed)."""
    value = part.value
    if isinstance(value, (str, os.PathLike)) and os.path.exists(value):
        return os.fspath(value)
    os.makedirs(MEDIA_DIR, exist_ok=True)
    digest = part.key()[1][:24]
    if part.kind == "image":
        path = os.path.join(MEDIA_DIR, f"{digest}.png")
        if not os.path.exists(path):
            if isinstance(value, (bytes, bytearray)):
                import io

                from PIL import Image

                Image.open(io.BytesIO(value)).save(path)
            elif hasattr(value, "save"):
                value.save(path)
            else:
                return None
        return path
    if part.kind == "audio":
        path = os.path.join(MEDIA_DIR, f"{digest}.wav")
        if not os.path.exists(path):
            if isinstance(value, (bytes, bytearray)):
                with open(path, "wb") as f:
                    f.write(value)
            else:
                import soundfile

                data = value.T if getattr(value, "ndim", 1) == 2 else value
                soundfile.write(path, data, part.sample_rate or 16000)
        return path
    return None


def chat_messages(conv) -> list[dict]:
    """Chatbot messages for every user/assistant turn (system turns live in their own box).

    Every turn yields at least one message and turns alternate roles, so the
    n-th run of same-role messages in the Chatbot is the n-th non-system turn
    (see `turn_for_display_index`).
    """
    out = []
    for turn in conv.turns:
        if turn.role == "system":
            continue
        content: list = []
        for p in turn.parts:
            if p.kind in ("image", "audio"):
                path = media_path(p)
                if path:
                    content.append({"path": path})
        text = shown_text(turn.parts)
        if text.strip() or not content:
            # An empty reply (stopped before its first token) still needs a bubble.
            content.insert(0, text if text.strip() else "…")
        out.append({"role": turn.role, "content": content if len(content) > 1 else content[0]})
    return out


def turn_for_display_index(conv, history: list[dict], index) -> int:
    """Map a Chatbot message index (as in EditData/RetryData) to an index into `conv.turns`."""
    if isinstance(index, (list, tuple)):
        index = index[0]
    run, prev = -1, None
    for i, msg in enumerate(history[: index + 1]):
        role = msg["role"] if isinstance(msg, dict) else msg.role
        if role != prev:
            run, prev = run + 1, role
    visible = [i for i, t in enumerate(conv.turns) if t.role != "system"]
    if not 0 <= run < len(visible):
        raise IndexError(f"message {index} does not match a turn (the conversation has {len(visible)})")
    return visible[run]


# --------------------------------------------------------------------------- context panel


def stats_line(stats, running: bool = False) -> str:
    """'reused N · prefilled M · TTFT x s · y tok/s · finish: r' (empty before any action)."""
    if stats is None:
        return "no action yet"
    bits = [f"reused {stats.reused} · prefilled {stats.prefilled}"]
    if getattr(stats, "fallback", False):
        bits.append("fallback: full prefill")
    ttft = getattr(stats, "ttft_s", None)
    if ttft is not None:
        bits.append(f"TTFT {ttft:.2f} s")
    tps = getattr(stats, "decode_tok_s", None)
    if tps:
        bits.append(f"{tps:.1f} tok/s")
    n = getattr(stats, "new_tokens", None)
    if n is not None:
        bits.append(f"{n} new tokens")
    reason = getattr(stats, "finish_reason", None)
    if reason or running:
        bits.append(f"finish: {reason}" if reason else "running…")
    return " · ".join(bits)


def _span(span) -> str:
    return f"{span[0]}–{span[1]}" if span else "not resident"


def context_html(conv, max_context: int | None = None, running: bool = False) -> str:
    """The context panel. The gauge carries data-position / data-max for tests."""
    pos = int(getattr(conv, "position", 0) or 0)
    cap = int(max_context or getattr(conv, "max_context", 0) or 1)
    pct = min(100.0, 100.0 * pos / cap)
    rows = []
    for i, t in enumerate(conv.turns):
        media = ", ".join(f"{k} {s}–{e}" for k, s, e in (getattr(t, "media_spans", None) or []))
        n = (t.span[1] - t.span[0]) if t.span else 0
        rows.append(
            f"<tr><td>{i}</td><td>{t.role}</td><td>{_span(t.span)}</td><td>{n}</td>"
            f"<td>{html.escape(media) or '–'}</td></tr>"
        )
    table = (
        "<table class='spans'><thead><tr><th>turn</th><th>role</th><th>KV span</th><th>tokens</th>"
        f"<th>media spans</th></tr></thead><tbody>{''.join(rows)}</tbody></table>"
        if rows else "<p class='empty'>No turns yet.</p>"
    )
    stats = html.escape(stats_line(getattr(conv, "last_stats", None), running))
    return (
        f"<div id='ctx'>"
        f"<div id='gauge' class='gauge' data-position='{pos}' data-max='{cap}' "
        f"title='KV position {pos} of {cap}'><div class='fill' style='width:{pct:.2f}%'></div></div>"
        f"<div id='gauge-label'>KV {pos} / {cap} tokens ({pct:.1f}%)</div>"
        f"<div id='stats'>{stats}</div>{table}</div>"
    )


# --------------------------------------------------------------------------- token view


def _prob(logprob) -> float | None:
    if logprob is None:
        return None
    try:
        return math.exp(logprob)
    except (TypeError, OverflowError):
        return None


def _show(text: str) -> str:
    """Make whitespace visible in a token chip."""
    return html.escape(text.replace("\n", "↵").replace(" ", "␣") or "∅")


def last_reply_index(conv) -> int | None:
    for i in range(len(conv.turns) - 1, -1, -1):
        if conv.turns[i].role == "assistant":
            return i
    return None


def tokens_html(conv) -> str:
    """The last reply's tokens; colour = probability, tooltip = top alternatives."""
    i = last_reply_index(conv)
    if i is None:
        return "<div id='tokens' class='empty'>The last reply's tokens appear here. Click one to rewind to just before it, then press Continue.</div>"
    turn = conv.turns[i]
    infos = list(getattr(turn, "token_info", None) or [])
    ids = list(getattr(turn, "token_ids", None) or [])
    if not infos:
        if not ids:
            return "<div id='tokens' class='empty'>The last reply has no tokens.</div>"
        return f"<div id='tokens' class='empty' data-turn='{i}'>{len(ids)} tokens (imported; no probabilities recorded).</div>"
    chips = []
    for off, info in enumerate(infos):
        p = _prob(getattr(info, "logprob", None))
        alts = []
        for alt in (getattr(info, "top", None) or [])[:5]:
            ap = _prob(alt[2])
            alts.append(f"{alt[1]!r} {ap * 100:.1f}%" if ap is not None else repr(alt[1]))
        tip = html.escape(f"#{off} id {info.id}" + (f" p={p * 100:.1f}%" if p is not None else "")
                          + ("\nalternatives: " + " | ".join(alts) if alts else ""), quote=True)
        hue = 120 * (p if p is not None else 0.5)
        pct = f"{p * 100:.0f}%" if p is not None else "?"
        chips.append(
            f"<span class='tok' data-tok='{off}' title='{tip}' style='background:hsl({hue:.0f},70%,85%)'>"
            f"<span class='t'>{_show(info.text)}</span><span class='p'>{pct}</span></span>"
        )
    return (f"<div id='tokens' data-turn='{i}' data-count='{len(infos)}'>{''.join(chips)}</div>"
            "<div class='hint'>Hover for alternatives; click a token to rewind to just before it, then Continue resamples.</div>")


TOKEN_JS = """
element.addEventListener('click', (ev) => {
  const t = ev.target.closest('[data-tok]');
  if (!t) return;
  const box = t.closest('[data-turn]');
  trigger('select', {index: parseInt(t.dataset.tok), value: box ? parseInt(box.dataset.turn) : null});
});
"""

CSS = """
#gauge { height: 14px; background: #e5e7eb; border-radius: 7px; overflow: hidden; }
#gauge .fill { height: 100%; background: linear-gradient(90deg, #3b82f6, #8b5cf6); }
#gauge-label, #stats { font-size: 0.85em; margin-top: 4px; font-family: monospace; }
#ctx table.spans { font-size: 0.8em; width: 100%; margin-top: 6px; }
#ctx table.spans td, #ctx table.spans th { padding: 1px 6px; }
#tokens .tok { display: inline-flex; flex-direction: column; align-items: center; margin: 1px;
  padding: 0 3px; border-radius: 4px; cursor: pointer; font-family: monospace; font-size: 0.85em; color: #111; }
#tokens .tok:hover { outline: 2px solid #ef4444; }
#tokens .tok .p { font-size: 0.7em; opacity: 0.7; }
.hint { font-size: 0.75em; opacity: 0.7; }
#status:empty { display: none; }
"""
