"""Running one action for a browser tab: streaming or immediate, each ending in a `View`.

Knows nothing of tensors or tokenizers, nor of which action it runs: a handler
hands it `start(conv)` (a stream of events, or a str) or `act(tab)`. The
conversation's lock is the tab's one-action-at-a-time lock; a running stream is
drawn from its events (`Live`), never from the turns its thread is filling in.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

from engines import ContextFull, EngineError
from playground.sessions import Busy, Tab, TabBusy
from playground.turns import Began
from playground.ui.background import BackgroundStream
from playground.ui.inputs import BadInput
from playground.ui.render import (branch_nav, chat_messages, compare_grid, compare_html, context_html,
                                  context_panel, tokens_html, turn_message)
from playground.ui.view import View

log = logging.getLogger("playground.ui")
EMPTY_BOX = {"text": "", "files": []}
# While streaming, renders take about a tenth of the time at most, and come at most
# 20 a second. A render is Python work on Gradio's event loop (a 14-output update
# costs 10-20 ms there) that holds the GIL the decode thread needs between ops:
# one render per token cost the decode rate a tenth to a quarter here.
RENDER_SHARE, RENDER_INTERVAL_S = 0.1, 0.05
STREAMING = "A reply is still streaming in this tab: press Stop first."


@dataclass(frozen=True)
class Page:
    """The page's own state that every action carries: the system prompt box, the raw
    toggle and the browser-stored transcript."""

    system_prompt: str = ""
    raw: bool = False
    stored: object = None


def action_requested_at() -> float:
    """When the running Gradio event was queued (`time.monotonic()`), else now.

    A Stop pre-empts every action of its tab asked for before it, however long the
    action waited in the queue. Gradio keeps the queue time on its `Event`, reached
    through the context variables its handlers run in (as `gr.Progress` does)."""
    now = time.monotonic()
    try:
        from gradio.context import LocalContext

        blocks, event_id = LocalContext.blocks.get(None), LocalContext.event_id.get(None)
        event = blocks._queue.event_ids_to_events.get(event_id)
        return min(float(event.enqueue_time), now)
    except Exception:  # noqa: BLE001 - another Gradio: only Stops from now on count
        return now


def error_text(e: Exception) -> str:
    """A plain message for a person; never a traceback."""
    msg = str(e) or type(e).__name__
    if isinstance(e, ContextFull):
        return (f"The context is full: {msg}. Make room: click a token of the last reply to rewind, "
                "edit an earlier message, or press Reset.")
    if isinstance(e, (Busy, TabBusy, BadInput, EngineError)):
        return msg
    return f"Something went wrong ({type(e).__name__}: {msg}). Your text is kept; try again."


def finish_note(conv, prefix: str = "") -> str:
    """The status line after an action; a full context says how to make room."""
    stats = conv.last_stats
    if stats is None or not stats.finish_reason:
        return prefix
    note = f"{prefix}finish: {stats.finish_reason}"
    if getattr(stats, "replies", 1) > 1:
        note = (f"{prefix}Compared {stats.replies} replies (finish: {', '.join(stats.finish_reasons)}); "
                "the first is in the chat: keep another below, or use ‹ › on the reply.")
    if stats.finish_reason == "context_full":
        note += (f" — the context is full ({conv.position} of {conv.max_context} tokens). Click a token to "
                 "rewind, edit an earlier message, or press Reset.")
    return note


class Live:
    """A running action as its events describe it: drawn without reading the turns the
    decoding thread is still filling in. What cannot change meanwhile (earlier turns'
    messages, branch controls) is rendered once."""

    def __init__(self, began: Began, conv, max_context: int):
        self.began, self.max_context = began, max_context
        self.texts = list(began.texts)
        self.position, self.stats = began.position, began.stats
        self.head = [turn_message(t) for t in began.turns[:-1] if t.role != "system"]
        self.nav = branch_nav(conv)  # the tree only changes when the action starts
        self.panel = None if began.compare_at is not None else compare_html(conv, running=True)

    def feed(self, piece) -> None:
        self.texts[piece.reply] += piece.text
        self.position, self.stats = piece.position, piece.stats

    def view(self, box, stored) -> View:
        b = self.began
        text = self.texts[0]
        chat = self.head + [{"role": "assistant", "content": text if text.strip() else "…"}]
        panel = self.panel or compare_grid(b.compare_at, [r.sampling for r in b.replies], self.texts, 0,
                                           running=True)
        return View(chat=chat, box=box, context=context_panel(b.turns, self.position, self.max_context, self.stats,
                                                              self.nav, running=True),
                    compare=panel, stored=stored, live=True)


class Runner:
    """Streams and immediate actions for the tabs of one `TabRegistry`.

    Args:
        tabs: the registry; `make_transcript(tab)`: the browser store's value; `max_context`.
    """

    def __init__(self, tabs, make_transcript, max_context: int):
        self.tabs = tabs
        self.transcript = make_transcript
        self.max_context = max_context

    # ------------------------------------------------------------------ views

    def view(self, tab: Tab | None, status: str = "", box=None, streaming: bool | None = None,
             save: bool = False) -> View:
        """The tab as it stands (None: only the status line and the box change)."""
        if tab is None:
            return View(box=box, status=status, streaming=streaming)
        conv = tab.conv
        return View(chat=chat_messages(conv), box=box, status=status,
                    context=context_html(conv, self.max_context, running=bool(streaming)),
                    tokens=None if streaming is True else tokens_html(conv),
                    compare=compare_html(conv, running=bool(streaming)), streaming=streaming,
                    stored=self.transcript(tab) if save else None)

    def fail(self, e: Exception, tab: Tab | None = None) -> View:
        import gradio as gr

        if not isinstance(e, (BadInput, EngineError)):
            log.exception("handler failed")
        msg = error_text(e)
        gr.Warning(msg)
        return self.view(tab, status="⚠️ " + msg, streaming=False if tab is not None else None, save=tab is not None)

    # ------------------------------------------------------------------ tabs

    def open_tab(self, request, stored) -> Tab:
        """This browser tab's Tab, made on first use from the browser-stored transcript; counts one
        action against the tab's rate limit. May raise Busy or RateLimited."""
        stored = stored if isinstance(stored, dict) else {}
        messages = stored.get("messages") if isinstance(stored.get("messages"), list) else None
        sp = stored.get("system_prompt") if isinstance(stored.get("system_prompt"), str) else ""
        key = request.session_hash
        self.tabs.take_action(key)
        try:
            return self.tabs.open(key, messages or None, sp, bool(stored.get("raw")))
        except Busy:
            raise
        except EngineError as e:  # a stored transcript that no longer imports must not lock the tab out
            if not messages:
                raise
            log.warning("tab %s: the browser-stored transcript was not restored: %s", key, e)
            return self.tabs.open(key, None, sp, bool(stored.get("raw")))

    @contextlib.contextmanager
    def holding(self, tab: Tab):
        """The tab's lock around replacing its conversation; TabBusy while a reply streams."""
        if not tab.lock.acquire(blocking=False):
            raise TabBusy(STREAMING)
        try:
            yield
        finally:
            tab.lock.release()

    def follow_page(self, tab: Tab, page: Page) -> None:
        """Follow the raw toggle (a new conversation) and the system prompt box (turn 0)."""
        if tab.streaming:
            raise TabBusy(STREAMING)
        raw, sp = bool(page.raw), page.system_prompt or ""
        if tab.raw != raw:
            with self.holding(tab):
                self.tabs.replace(tab, None, sp, raw)
        elif not raw and tab.system_prompt != sp:
            tab.conv.set_system_prompt(sp or None)
            tab.system_prompt = sp

    # ------------------------------------------------------------------ running

    async def stream(self, request, page: Page, start, clear_box=False, note=""):
        """Run one streaming action for this tab, yielding Views.

        `start(conv)` returns a stream of events (validated on call) or a str. The model
        works in threads; this async generator only renders, on Gradio's event loop.
        Cancelling it (Stop, or a client's cancel) stops the conversation's stream, which
        records the partial reply. A Stop that came after this action was asked for,
        even before its tab existed, pre-empts it.
        """
        requested_at = action_requested_at()
        try:
            tab = self.open_tab(request, page.stored)
        except Exception as e:  # noqa: BLE001 - every failure becomes a message
            yield self.fail(e)
            return
        key, decoding = request.session_hash, None
        try:
            tab.touch()
            if tab.streaming:
                yield self.fail(TabBusy(STREAMING))
                return
            if self.tabs.stop_requested(key, requested_at):
                yield self.view(tab, status="Stopped before it started: nothing was sent, and your text is kept.",
                                streaming=False)
                return
            try:
                self.follow_page(tab, page)
                shown_tokens = tokens_html(tab.conv)  # the token view keeps the last reply's until the end
                gen = await asyncio.to_thread(start, tab.conv)
            except Exception as e:  # noqa: BLE001
                yield self.fail(e, tab)
                return
            if self.tabs.stop_requested(key, requested_at):
                tab.conv.stop()  # it came while the action started, and starting clears a stop request
            # The box is cleared only once the turn is in the transcript: a failure while
            # planning or prefilling (busy engine, failed forward) leaves the text where it was.
            yield self.view(tab, streaming=True)
            box = EMPTY_BOX if clear_box else None
            if not isinstance(gen, str):  # a str: step() made its one token already
                # The model decodes in its own thread and never waits for a render; each
                # render shows every token made since the last.
                decoding = BackgroundStream(gen, tab.conv.stop, min_interval=RENDER_INTERVAL_S, share=RENDER_SHARE)
                live, first = None, True
                async for events in decoding:
                    for e in events:
                        if type(e) is Began:
                            live = Live(e, tab.conv, self.max_context)
                        else:
                            live.feed(e)
                    if live is not None:
                        frame = live.view(box if first else None, page.stored)
                        frame.tokens, first = shown_tokens, False
                        yield frame
            yield self.view(tab, box=box, status=finish_note(tab.conv, f"{note} · " if note else ""), streaming=False, save=True)
        except Exception as e:  # noqa: BLE001 - a failure mid-stream keeps the transcript
            yield self.fail(e, tab)
        finally:
            if decoding is not None:
                # Shielded: even if this task is cancelled again, the action ends only once
                # the decode thread has (it records the reply and lets go of the lock).
                await asyncio.shield(asyncio.to_thread(decoding.close))
            tab.touch()

    def immediate(self, request, page: Page, act, status=""):
        """Run a non-streaming action (rewind, undo, reset, switch) under the tab's lock; a View."""
        try:
            tab = self.open_tab(request, page.stored)
        except Exception as e:  # noqa: BLE001
            return self.fail(e)
        try:
            self.follow_page(tab, page)
            out = act(tab)
            return self.view(tab, status=status, box=out, streaming=False, save=True)
        except Exception as e:  # noqa: BLE001
            return self.fail(e, tab)
        finally:
            tab.touch()

    def refresh(self, request) -> View:
        """Re-render this tab after Stop (waits for the cancelled stream to wind down)."""
        tab = self.tabs.get(request.session_hash)
        if tab is None:
            return self.view(None, streaming=False)
        if tab.lock.acquire(timeout=10):
            tab.lock.release()
        return self.view(tab, status=finish_note(tab.conv, "Stopped · ") or "Stopped", streaming=False, save=True)
