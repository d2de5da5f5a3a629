"""Event handlers of the playground: widget values in, `Conversation` calls, widget values out.

Knows nothing of tensors or tokenizers, and nothing of the layout (`ui.py`
wires these handlers to widgets). One `Conversation` per browser tab lives in
a `SessionManager`, keyed by Gradio's `session_hash`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import tempfile
import time

import gradio as gr

from engines import ContextFull, EngineError, MultimodalInput
from playground.ahead import Ahead
from playground.sessions import Busy, SessionManager, Tab, TabBusy, check_prompt
from playground.ui_inputs import (SPOKEN_MARK, BadInput, clamp_new_tokens, make_sampling, parse_box,
                                  parse_stop_strings, speech_to_text)
from playground.ui_render import (chat_messages, compare_html, context_html, part_text, tokens_html,
                                  turn_for_display_index)

log = logging.getLogger("playground.ui")
EMPTY_BOX = {"text": "", "files": []}
# While streaming, renders take about a tenth of the time at most, and come at most
# 20 a second. A render is Python work on Gradio's event loop (a 12-output update
# costs 10-20 ms there) that holds the GIL the decode thread needs between ops:
# one render per token cost the decode rate a tenth to a quarter here.
RENDER_SHARE, RENDER_INTERVAL_S = 0.1, 0.05
TRANSCRIPT_FORMAT = "llm-playground-transcript"
DEFAULT_MAX_TRANSCRIPT_MB = 10.0


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


def as_index(value, what: str) -> int:
    """A whole number from an API argument, or BadInput naming it (NaN, inf, text)."""
    try:
        f = float(value)
        if not math.isfinite(f) or f != int(f):
            raise ValueError
        return int(f)
    except (TypeError, ValueError, OverflowError):
        raise BadInput(f"{what} must be a whole number, got {value!r}") from None


def default_make_conversation(engine, messages, system_prompt: str, raw: bool):
    """A Conversation for a tab: fresh, or rebuilt from a stored transcript."""
    from playground import Conversation  # the UI's only way into the model

    if messages:
        if not raw:  # the system prompt box is the source of truth
            messages = [m for m in messages if not (isinstance(m, dict) and m.get("role") == "system")]
            if system_prompt:
                messages = [{"role": "system", "content": system_prompt}] + messages
        # prefill=False: the KV is rebuilt lazily, by the tab's next action.
        return Conversation.from_messages(engine, messages, raw=raw, prefill=False)
    return Conversation(engine, system_prompt=(system_prompt or None) if not raw else None, raw=raw)


def error_text(e: Exception) -> str:
    """A plain message for a person; never a traceback."""
    msg = str(e) or type(e).__name__
    if isinstance(e, ContextFull):
        return (f"The context is full: {msg}. Make room: click a token of the last reply to rewind, "
                "edit an earlier message, or press Reset.")
    if isinstance(e, (Busy, TabBusy, BadInput)):
        return msg
    if isinstance(e, EngineError):
        if msg.startswith("busy"):
            return f"{msg}. The server is busy; try again in a minute."
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


class Handlers:
    """Event handlers for one playground: widget values in, `Conversation` calls, widget values out.

    Every handler returns (or, streaming, yields) one `view(...)` tuple; every
    failure becomes a plain message in the status line, never a traceback.
    """

    def __init__(self, engine, sessions: SessionManager, max_new_tokens_cap: int, max_file_mb: float,
                 max_prompt_tokens: int | None = None, max_transcript_mb: float = DEFAULT_MAX_TRANSCRIPT_MB,
                 transcriber=None):
        self.sessions = sessions
        self.transcriber = transcriber  # engines.speech.Transcriber, or None: no speech to text
        self.max_prompt_tokens = max_prompt_tokens
        self.max_transcript_mb = max_transcript_mb
        self.max_context = engine.capacity.max_context_len
        self.modalities = engine.modalities
        self.model = engine.name
        self.max_new_tokens_cap = max_new_tokens_cap
        self.max_file_mb = max_file_mb
        self.button_labels: tuple[str, ...] = ()  # build_ui sets them from the widgets
        self.compare_label = "Compare"

    # ------------------------------------------------------------------ helpers

    def open_tab(self, request: gr.Request, stored) -> Tab:
        """This browser tab's Tab, made on first use from the browser-stored transcript; counts one
        action against the tab's rate limit. May raise Busy or RateLimited."""
        stored = stored if isinstance(stored, dict) else {}
        messages = stored.get("messages") if isinstance(stored.get("messages"), list) else None
        sp = stored.get("system_prompt") if isinstance(stored.get("system_prompt"), str) else ""
        key = request.session_hash
        self.sessions.take_action(key)
        try:
            return self.sessions.open(key, messages or None, sp, bool(stored.get("raw")))
        except Busy:
            raise
        except EngineError as e:  # a stored transcript that no longer imports must not lock the tab out
            if not messages:
                raise
            log.warning("tab %s: the browser-stored transcript was not restored: %s", key, e)
            return self.sessions.open(key, None, sp, bool(stored.get("raw")))

    def sync(self, tab: Tab, system_prompt, raw) -> None:
        """Follow the raw toggle and the system prompt box (call with the tab's lock held)."""
        if tab.raw != bool(raw):
            self.sessions.replace(tab, None, system_prompt or "", bool(raw))
        elif not raw and tab.system_prompt != (system_prompt or ""):
            turns = [t for t in tab.conv.turns if t.role != "system"]
            self.sessions.replace(tab, tab.conv.to_messages() if turns else None, system_prompt or "", False)

    def transcript(self, tab: Tab) -> dict:
        return {"format": TRANSCRIPT_FORMAT, "model": self.model, "raw": tab.raw,
                "system_prompt": tab.system_prompt, "messages": tab.conv.to_messages()}

    def view(self, tab: Tab | None, status: str = "", box=None, streaming: bool | None = None, save: bool = False):
        """One update for the outputs `build_ui` wires: chatbot, box, status, context, tokens,
        Stop + 4 action buttons + Import, the compare panel and its button, and the browser-stored
        transcript. `None` leaves a widget as it is."""
        skip = gr.skip()
        if tab is None:
            chat = ctx = toks = panel = skip
        else:
            chat, ctx = chat_messages(tab.conv), context_html(tab.conv, self.max_context, running=bool(streaming))
            toks = tokens_html(tab.conv) if streaming is not True else skip
            panel = compare_html(tab.conv, running=bool(streaming))
        if streaming is None:
            states = [skip] * 7
        else:
            states = [gr.update(interactive=streaming)] + [gr.update(interactive=not streaming)] * 6
        return (chat, skip if box is None else box, status, ctx, toks, *states[:6], panel, states[6],
                self.transcript(tab) if (save and tab is not None) else skip)

    def frame(self, tab: Tab, box, tokens: str, stored):
        """A live update while a reply streams: the chat and the context panel change.

        The other outputs get the values they already show rather than `gr.skip()`:
        in Gradio 6.31 a skip rebuilds the component (the Import UploadButton's rebuild
        builds a JSON schema, about 15 ms), while a value costs next to nothing. Only
        the box keeps `skip`, so that nothing typed meanwhile is overwritten.
        """
        return (chat_messages(tab.conv), gr.skip() if box is None else box, "",
                context_html(tab.conv, self.max_context, running=True), tokens, *self.button_labels, None,
                compare_html(tab.conv, running=True), self.compare_label, stored)

    def fail(self, e: Exception, tab: Tab | None = None):
        if not isinstance(e, (BadInput, EngineError)):
            log.exception("handler failed")
        msg = error_text(e)
        gr.Warning(msg)
        return self.view(tab, status="⚠️ " + msg, streaming=False if tab is not None else None, save=tab is not None)

    def settings(self, temperature, top_p, top_k, rep, seed, max_new, stops):
        return make_sampling(temperature, top_p, top_k, rep, seed), clamp_new_tokens(max_new, self.max_new_tokens_cap), \
            parse_stop_strings(stops)

    async def stream(self, request, stored, system_prompt, raw, start, clear_box=False, note=""):
        """Run one action for this tab: validate, then stream pieces into the widgets.

        `start(conv)` returns a generator of text pieces (validated on call) or a str.
        The model works in threads; this async generator only renders, on Gradio's
        event loop. Cancelling it (Stop, or a client's cancel) stops the
        conversation's stream, which records the partial reply. A Stop that came
        after this action was asked for, even before its tab existed, pre-empts it.
        """
        requested_at = action_requested_at()
        try:
            tab = self.open_tab(request, stored)
        except Exception as e:  # noqa: BLE001 - every failure becomes a message
            yield self.fail(e)
            return
        if not tab.lock.acquire(blocking=False):
            yield self.fail(TabBusy("A reply is still streaming in this tab: press Stop first."))
            return
        ahead = None
        try:
            tab.touch()
            if self.sessions.stop_requested(request.session_hash, requested_at):
                yield self.view(tab, status="Stopped before it started: nothing was sent, and your text is kept.",
                                streaming=False)
                return
            try:
                self.sync(tab, system_prompt, raw)
                shown_tokens = tokens_html(tab.conv)  # the token view keeps the last reply's until the end
                gen = await asyncio.to_thread(start, tab.conv)
            except Exception as e:  # noqa: BLE001
                yield self.fail(e, tab)
                return
            if self.sessions.stop_requested(request.session_hash, requested_at):
                tab.conv.stop()  # it came while the action started, and starting clears a stop request
            # The box is cleared only once the turn is in the transcript: a failure while
            # planning or prefilling (busy engine, failed forward) leaves the text where it was.
            yield self.view(tab, streaming=True)
            box = EMPTY_BOX if clear_box else None
            if not isinstance(gen, str):  # a str: step() made its one token already
                # The model decodes in its own thread and never waits for a render; each
                # render shows every token made since the last.
                ahead = Ahead(gen, tab.conv.stop, min_interval=RENDER_INTERVAL_S, share=RENDER_SHARE)
                i = 0
                async for _ in ahead:
                    yield self.frame(tab, box if i == 0 else None, shown_tokens, stored)
                    i += 1
            yield self.view(tab, box=box, status=finish_note(tab.conv, f"{note} · " if note else ""),
                            streaming=False, save=True)
        except Exception as e:  # noqa: BLE001 - a failure mid-stream keeps the transcript
            yield self.fail(e, tab)
        finally:
            def finish():
                try:
                    if ahead is not None:
                        ahead.close()  # stops a running reply, which records it, and waits for the thread
                finally:
                    tab.touch()
                    tab.lock.release()

            # Shielded: even if this task is cancelled again, the tab is released only
            # once the decode thread has ended.
            await asyncio.shield(asyncio.to_thread(finish))

    def refresh(self, request: gr.Request):
        """Re-render this tab after Stop (waits for the cancelled stream to wind down)."""
        tab = self.sessions.get(request.session_hash)
        if tab is None:
            return self.view(None, streaming=False)
        if tab.lock.acquire(timeout=10):
            tab.lock.release()
        return self.view(tab, status=finish_note(tab.conv, "Stopped · ") or "Stopped", streaming=False, save=True)

    def immediate(self, request, stored, system_prompt, raw, act, status=""):
        """Run a non-streaming action (rewind, undo, reset) under the tab's lock."""
        try:
            tab = self.open_tab(request, stored)
        except Exception as e:  # noqa: BLE001
            return self.fail(e)
        if not tab.lock.acquire(blocking=False):
            return self.fail(TabBusy("A reply is still streaming in this tab: press Stop first."))
        try:
            self.sync(tab, system_prompt, raw)
            out = act(tab)
            return self.view(tab, status=status, box=out, streaming=False, save=True)
        except Exception as e:  # noqa: BLE001
            return self.fail(e, tab)
        finally:
            tab.touch()
            tab.lock.release()

    # ------------------------------------------------------------------ handlers

    async def on_send(self, box, temperature, top_p, top_k, rep, seed, max_new, stops, system_prompt, raw, stored,
                      transcribe_first=False, language="auto", request: gr.Request = None):
        # Recordings become text for a model that takes no audio, or when the user asks.
        speech = self.transcriber is not None and ("audio" not in self.modalities or bool(transcribe_first))
        try:
            parts = parse_box(box, self.modalities, self.model, self.max_file_mb, speech=speech)
            args = self.settings(temperature, top_p, top_k, rep, seed, max_new, stops)
        except BadInput as e:
            yield self.fail(e)
            return
        note = ""
        if speech and any(p.kind == "audio" for p in parts):
            loading = "" if self.transcriber.loaded else " (first use: loading Whisper-base, a few seconds more)"
            yield self.view(None, status=f"🎤 Transcribing your recording{loading}…")
            try:
                parts, note = await asyncio.to_thread(speech_to_text, parts, self.transcriber, language)
            except BadInput as e:
                yield self.fail(e)
                return
            yield self.view(None, status=note)
        def start(conv):
            check_prompt(conv.engine, parts, self.max_prompt_tokens)
            return conv.send(parts, args[0], args[1], stop_strings=args[2])

        async for update in self.stream(request, stored, system_prompt, raw, start, clear_box=True, note=note):
            yield update

    def make_simple(self, method):
        async def handler(temperature, top_p, top_k, rep, seed, max_new, stops, system_prompt, raw, stored,
                    request: gr.Request):
            try:
                sampling, n, stop_strings = self.settings(temperature, top_p, top_k, rep, seed, max_new, stops)
            except BadInput as e:
                yield self.fail(e)
                return
            if method == "step":
                start = lambda conv: conv.step(sampling)  # noqa: E731
            else:
                start = lambda conv: getattr(conv, method)(sampling, n, stop_strings=stop_strings)  # noqa: E731
            async for update in self.stream(request, stored, system_prompt, raw, start):
                yield update
        return handler

    async def edit_turn(self, turn_index: int, text: str, settings_values, system_prompt, raw, stored, request):
        try:
            sampling, n, stop_strings = self.settings(*settings_values)
            if not (text or "").strip():
                raise BadInput("The edited message is empty: type something.")
        except BadInput as e:
            yield self.fail(e)
            return

        def start(conv):
            old = conv.turns[turn_index] if 0 <= turn_index < len(conv.turns) else None
            media = [p for p in old.parts if p.kind != "text"] if old is not None else []
            parts = media + [MultimodalInput.text(text)]
            check_prompt(conv.engine, parts, self.max_prompt_tokens)
            return conv.edit(turn_index, parts, sampling, n, stop_strings=stop_strings)

        async for update in self.stream(request, stored, system_prompt, raw, start):
            yield update

    async def on_chat_edit(self, history, temperature, top_p, top_k, rep, seed, max_new, stops, system_prompt, raw, stored,
                     data: gr.EditData, request: gr.Request):
        tab = self.sessions.get(request.session_hash)
        if tab is None:
            yield self.fail(BadInput("Nothing to edit yet."))
            return
        try:
            i = turn_for_display_index(tab.conv, history, data.index)
        except IndexError as e:
            yield self.fail(BadInput(str(e)), tab)
            return
        text = data.value if isinstance(data.value, str) else (data.value or {}).get("text", "")
        text = text.removeprefix(SPOKEN_MARK)  # the chat's mark on transcribed speech is no part of the text
        async for update in self.edit_turn(i, text, (temperature, top_p, top_k, rep, seed, max_new, stops),
                                           system_prompt, raw, stored, request):
            yield update

    async def on_api_edit(self, turn_index, text, temperature, top_p, top_k, rep, seed, max_new, stops, system_prompt, raw,
                    stored, request: gr.Request):
        try:
            turn_index = as_index(turn_index, "turn_index")
        except BadInput as e:
            yield self.fail(e)
            return
        async for update in self.edit_turn(turn_index, text,
                                           (temperature, top_p, top_k, rep, seed, max_new, stops),
                                           system_prompt, raw, stored, request):
            yield update

    def rewind_to(self, turn_index, offset, system_prompt, raw, stored, request):
        try:
            turn_index, offset = as_index(turn_index, "turn_index"), as_index(offset, "offset")
        except BadInput as e:
            return self.fail(e)

        def act(tab):
            tab.conv.rewind(turn_index, offset)
        return self.immediate(request, stored, system_prompt, raw, act,
                         status=f"Rewound to just before token {offset}: press Continue to resample from here.")

    def on_token_click(self, system_prompt, raw, stored, data: gr.SelectData, request: gr.Request):
        return self.rewind_to(data.value, data.index, system_prompt, raw, stored, request)

    def on_api_rewind(self, turn_index, offset, system_prompt, raw, stored, request: gr.Request):
        return self.rewind_to(turn_index, offset, system_prompt, raw, stored, request)

    def on_undo(self, system_prompt, raw, stored, request: gr.Request):
        def act(tab):
            turns = tab.conv.turns
            users = [i for i, t in enumerate(turns) if t.role == "user"]
            if not users:
                raise BadInput("Nothing to undo.")
            last = turns[users[-1]]
            files = [p.value for p in last.parts if p.kind != "text" and isinstance(p.value, str)]
            tab.conv.drop_from(users[-1])
            return {"text": part_text(last.parts), "files": files}
        return self.immediate(request, stored, system_prompt, raw, act, status="Undone: the last message is back in the box.")

    def on_reset(self, system_prompt, raw, stored, request: gr.Request):
        return self.immediate(request, stored, system_prompt, raw, lambda tab: tab.conv.reset(), status="Reset.")

    async def on_stop(self, request: gr.Request):
        # This tab's stream only; remembered for an action of this tab that has not started yet.
        # Async: it never blocks (it sets flags), so it runs at once on the event loop, not
        # after a hop through a busy thread pool.
        self.sessions.request_stop(request.session_hash)

    def on_raw_change(self, raw, system_prompt, request: gr.Request):
        mode = "Raw mode: no chat template; your text is prefilled as is and continued." if raw else "Chat mode."
        tab = self.sessions.get(request.session_hash)
        if tab is None:
            return self.view(None, status=mode, streaming=None)[:-1] + ({"messages": []},)
        if not tab.lock.acquire(blocking=False):
            return self.fail(TabBusy("A reply is still streaming in this tab: press Stop first."), tab)
        try:
            self.sessions.replace(tab, None, system_prompt or "", bool(raw))
        finally:
            tab.lock.release()
        return self.view(tab, status=mode + " The conversation was cleared.", streaming=False, save=True)

    def on_load(self, stored, request: gr.Request):
        """Page (re)load: show the stored transcript; the KV is rebuilt on the next action."""
        stored = stored or {}
        sp, raw = stored.get("system_prompt") or "", bool(stored.get("raw"))
        if not stored.get("messages"):
            return self.view(None, streaming=False)[:-1] + (gr.skip(), gr.skip())
        try:
            tab = self.sessions.open(request.session_hash, stored["messages"], sp, raw)
        except Exception as e:  # noqa: BLE001
            return self.fail(e)[:-1] + (gr.skip(), gr.skip())
        return self.view(tab, status="Transcript restored; the model re-reads it on your next action.",
                    streaming=False)[:-1] + (sp, raw)

    def on_unload(self, request: gr.Request):
        self.sessions.close(request.session_hash)

    def on_export(self, request: gr.Request):
        tab = self.sessions.get(request.session_hash)
        if tab is None:
            raise gr.Error("Nothing to export yet.")
        out = os.path.join(tempfile.mkdtemp(prefix="transcript-"), f"transcript-{time.strftime('%Y%m%d-%H%M%S')}.json")
        with open(out, "w", encoding="utf-8") as f:
            json.dump(self.transcript(tab), f, ensure_ascii=False)
        return out

    def on_import(self, file, system_prompt, raw, stored, request: gr.Request):
        try:
            path = file if isinstance(file, str) else getattr(file, "name", None)
            if not path or not os.path.isfile(path):
                raise BadInput("No transcript file arrived; choose a .json file exported by the playground.")
            size, limit = os.path.getsize(path), self.max_transcript_mb * 1024 * 1024
            if size > limit:
                raise BadInput(f"{os.path.basename(path)} is {size / 1048576:.1f} MB, over the "
                               f"{self.max_transcript_mb:g} MB limit for a transcript. Nothing was imported.")
            with open(path, encoding="utf-8") as f:
                try:
                    data = json.load(f)
                except RecursionError:
                    raise BadInput("The transcript is not valid: its JSON is nested too deeply.") from None
            messages = data.get("messages") if isinstance(data, dict) else data
            if not isinstance(messages, list):
                raise BadInput("This file is not a transcript: expected a JSON list of messages "
                               "or an object with \"messages\".")
            if len(messages) > self.max_context:  # each message is at least one token
                raise BadInput(f"The transcript has {len(messages):,} messages; a context of {self.max_context:,} "
                               "tokens cannot hold them. Nothing was imported.")
            new_raw = bool(data.get("raw", raw)) if isinstance(data, dict) else bool(raw)
            sp = next((m.get("content") for m in messages if isinstance(m, dict) and m.get("role") == "system"
                       and isinstance(m.get("content"), str)), "")
            tab = self.open_tab(request, stored)
            if not tab.lock.acquire(blocking=False):
                raise TabBusy("A reply is still streaming in this tab: press Stop first.")
            try:
                self.sessions.replace(tab, messages, sp or "", new_raw)
            finally:
                tab.lock.release()
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return self.fail(BadInput(f"The transcript is not valid JSON: {e}")) + (gr.skip(), gr.skip())
        except Exception as e:  # noqa: BLE001
            return self.fail(e) + (gr.skip(), gr.skip())
        notes = " ".join(getattr(tab.conv, "import_notes", None) or [])
        return self.view(tab, status=f"Transcript imported; the model reads it on your next action. {notes}".strip(),
                         streaming=False, save=True)[:-1] + (self.transcript(tab), sp or "", new_raw)
