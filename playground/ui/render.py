"""Conversation state -> what the widgets show (pure functions, no Gradio, no tensors).

A running action is drawn from what its events said (runner.py), so the
context and compare panels also take their values one by one.

- `chat_messages(conv)`: the Chatbot's messages, one run of messages per turn.
- `context_html(conv)`: the gauge (KV position / max context), turn and media
  spans, and the last action's figures.
- `tokens_html(conv)`: the last reply's tokens with probabilities and
  alternatives; each token carries `data-tok` (its offset) for click-to-rewind.
- `branch_nav(conv)` / `nav_html`: the `‹ k/n ›` controls of turns with
  alternatives (BRANCH_JS draws them into the chat); `compare_html(conv)`: the
  last compare's replies side by side, each with "Keep this one".
"""

from __future__ import annotations

import html
import json
import math
import os
import tempfile

from playground.ui.inputs import SPOKEN_MARK, Spoken

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
    return [turn_message(t) for t in conv.turns if t.role != "system"]


def turn_message(turn, text: str | None = None) -> dict:
    """One turn's chat message; `text` (a reply still streaming) stands for its parts' text."""
    content: list = []
    for p in turn.parts:
        if p.kind in ("image", "audio"):
            path = media_path(p)
            if path:
                content.append({"path": path})
    if text is None:
        text = shown_text(turn.parts)
    if text.strip() or not content:
        # An empty reply (stopped before its first token) still needs a bubble.
        content.insert(0, text if text.strip() else "…")
    return {"role": turn.role, "content": content if len(content) > 1 else content[0]}


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
    cached = getattr(stats, "server_cached", None)
    if cached is not None:
        bits.append(f"server cache {cached}")
    ttft = getattr(stats, "ttft_s", None)
    if ttft is not None:
        bits.append(f"TTFT {ttft:.2f} s")
    tps = getattr(stats, "decode_tok_s", None)
    if tps:
        bits.append(f"{tps:.1f} tok/s")
    n = getattr(stats, "new_tokens", None)
    if n is not None:
        bits.append(f"{n} new tokens")
    replies = getattr(stats, "replies", 1)
    if replies > 1:  # a compare: say what its shared prefill cost
        extra = getattr(stats, "extra_prefilled", 0)
        bits.append(f"compare ×{replies}: " + (f"+{extra} tokens prefilled again (this engine cannot fork)"
                                                if extra else "one prefill, forked"))
    reason = getattr(stats, "finish_reason", None)
    reasons = getattr(stats, "finish_reasons", ())
    if reasons and replies > 1:
        bits.append("finish: " + ", ".join(reasons))
    elif reason or running:
        bits.append(f"finish: {reason}" if reason else "running…")
    return " · ".join(bits)


def _span(span) -> str:
    return f"{span[0]}–{span[1]}" if span else "not resident"


def context_html(conv, max_context: int | None = None, running: bool = False) -> str:
    """The context panel of `conv` as it stands."""
    return context_panel(conv.turns, int(getattr(conv, "position", 0) or 0),
                         int(max_context or getattr(conv, "max_context", 0) or 1),
                         getattr(conv, "last_stats", None), branch_nav(conv), running)


def context_panel(turns, pos: int, cap: int, stats, nav: list, running: bool = False) -> str:
    """The gauge (KV position `pos` of `cap`; it carries data-position / data-max for tests),
    the turns' spans, `stats` and the branch controls `nav` (`branch_nav`)."""
    cap = cap or 1
    pct = min(100.0, 100.0 * pos / cap)
    rows = []
    navs = {turn: (k, n) for _, turn, k, n in nav}
    for i, t in enumerate(turns):
        media = ", ".join(f"{k} {s}–{e}" for k, s, e in (getattr(t, "media_spans", None) or []))
        n = (t.span[1] - t.span[0]) if t.span else 0
        branch = nav_html(i, *navs[i]) if i in navs else "–"
        rows.append(
            f"<tr><td>{i}</td><td>{t.role}</td><td>{_span(t.span)}</td><td>{n}</td>"
            f"<td>{html.escape(media) or '–'}</td><td>{branch}</td></tr>"
        )
    table = (
        "<table class='spans'><thead><tr><th>turn</th><th>role</th><th>KV span</th><th>tokens</th>"
        f"<th>media spans</th><th>branch</th></tr></thead><tbody>{''.join(rows)}</tbody></table>"
        if rows else "<p class='empty'>No turns yet.</p>"
    )
    # The chat's ‹ k/n › controls are drawn by BRANCH_JS from this list.
    nav_data = html.escape(json.dumps(nav), quote=True)
    line = html.escape(stats_line(stats, running))
    return (
        f"<div id='ctx'>"
        f"<div id='gauge' class='gauge' data-position='{pos}' data-max='{cap}' "
        f"title='KV position {pos} of {cap}'><div class='fill' style='width:{pct:.2f}%'></div></div>"
        f"<div id='gauge-label'>KV {pos} / {cap} tokens ({pct:.1f}%)</div>"
        f"<div id='stats'>{line}</div>{table}"
        f"<div id='branch-data' hidden data-nav='{nav_data}'></div></div>"
    )


# --------------------------------------------------------------------------- branches and compare


def branch_nav(conv) -> list[tuple[int, int, int, int]]:
    """(chat message index, turn index, current sibling k, siblings n) for each turn with alternatives.
    The message index counts non-system turns, as the Chatbot shows them."""
    if not hasattr(conv, "sibling_index"):
        return []
    out, shown = [], -1
    for i, t in enumerate(conv.turns):
        if t.role == "system":
            continue
        shown += 1
        n = len(conv.siblings(i))
        if n > 1:
            out.append((shown, i, conv.sibling_index(i), n))
    return out


def nav_html(turn: int, k: int, n: int) -> str:
    """‹ k/n ›: buttons that carry the sibling they switch to (BRANCH_JS sends the click)."""
    prev = f"data-k='{k - 1}'" if k > 0 else "disabled"
    nxt = f"data-k='{k + 1}'" if k + 1 < n else "disabled"
    return (f"<span class='branch-nav' data-turn='{turn}' data-key='{turn},{k},{n}'>"
            f"<button {prev} aria-label='previous alternative'>‹</button>"
            f"<span class='branch-pos'>{k + 1}/{n}</span>"
            f"<button {nxt} aria-label='next alternative'>›</button></span>")


def live_compare(conv):
    """The last compare's (turn index, replies) while they are still alternatives of the
    current branch, else None."""
    last = getattr(conv, "last_compare", None)
    if not last:
        return None
    i, replies = last
    turns = conv.turns
    if not 1 <= i <= len(turns) or not any(c is replies[0] for c in turns[i - 1].children):
        return None
    return i, replies


COMPARE_EMPTY = ("<div id='compare-grid' class='empty'>Compare samples 2–4 replies to your message from one "
                 "prefill, side by side, each with its own temperature and seed (set them under "
                 "Compare settings). Type a message and press Compare, or press it to answer the last "
                 "message again.</div>")


def compare_html(conv, running: bool = False) -> str:
    """The last compare's replies side by side, each with its settings and "Keep this one"."""
    live = live_compare(conv)
    if live is None:
        return COMPARE_EMPTY
    i, replies = live
    current = conv.turns[i] if i < len(conv.turns) else None
    stats = getattr(conv, "last_stats", None)
    reasons = getattr(stats, "finish_reasons", ()) if getattr(stats, "replies", 1) == len(replies) else ()
    current_k = next((k for k, r in enumerate(replies) if r is current), None)
    return compare_grid(i, [r.sampling for r in replies], [r.text for r in replies], current_k, reasons, running)


def compare_grid(i: int, samplings, texts, current: int | None, reasons=(), running: bool = False) -> str:
    """Compared replies (their settings and texts) for turn `i`; reply `current` is the one in the chat."""
    cols = []
    for k, (s, text) in enumerate(zip(samplings, texts)):
        s = s or {}
        head = f"#{k + 1} · T {s.get('temperature', 0):g} · seed {s.get('seed')}"
        if k < len(reasons) and reasons[k]:
            head += f" · {reasons[k]}"
        is_current = k == current
        keep = ("<span class='cmp-current'>✓ in the chat</span>" if is_current else
                f"<button class='cmp-keep' data-keep='{k}' {'disabled' if running else ''}>Keep this one</button>")
        cols.append(
            f"<div class='cmp-col{' current' if is_current else ''}' data-k='{k}'>"
            f"<div class='cmp-head'>{html.escape(head)}</div>"
            f"<div class='cmp-text'>{html.escape(text) or '…'}</div>{keep}</div>"
        )
    n = len(cols)
    return (f"<div id='compare-grid' data-turn='{i}' data-count='{n}' "
            f"style='grid-template-columns: repeat({n}, minmax(0, 1fr))'>{''.join(cols)}</div>")


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


TOKENS_EMPTY = ("<div id='tokens' class='empty'>The last reply's tokens appear here. "
                "Click one to rewind to just before it, then press Continue.</div>")


def tokens_html(conv) -> str:
    """The last reply's tokens; colour = probability, tooltip = top alternatives."""
    i = last_reply_index(conv)
    if i is None:
        return TOKENS_EMPTY
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
