"""Event handlers of the playground: widget values in, `Conversation` calls, a `View` out.

Knows nothing of tensors or tokenizers, and nothing of the layout (`layout.py`
wires these handlers to widgets and turns their Views into outputs). One
`Conversation` per browser tab lives in a `TabRegistry`, keyed by Gradio's
`session_hash`; `runner.Runner` runs every action. The handlers' parameter
names are the HTTP API's (public), so each endpoint lists its own.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import tempfile
import time

import gradio as gr

from engines import MultimodalInput
from playground.sessions import TabRegistry, TabBusy, check_prompt
from playground.ui.inputs import SPOKEN_MARK, BadInput, Knobs, parse_box, speech_to_text
from playground.ui.render import part_text, turn_for_display_index
from playground.ui.runner import Page, Runner
from playground.ui.view import View

TRANSCRIPT_FORMAT = "llm-playground-transcript"
DEFAULT_MAX_TRANSCRIPT_MB = 10.0


def as_index(value, what: str) -> int:
    """A whole number from an API argument, or BadInput naming it (NaN, inf, text)."""
    try:
        f = float(value)
        if not math.isfinite(f) or f != int(f):
            raise ValueError
        return int(f)
    except (TypeError, ValueError, OverflowError):
        raise BadInput(f"{what} must be a whole number, got {value!r}") from None


def default_make_conversation(engine, messages, system_prompt: str, raw: bool, lock=None):
    """A Conversation for a tab: fresh, or rebuilt from a stored transcript; `lock` is the tab's."""
    from playground import Conversation  # the UI's only way into the model

    if messages:
        if not raw:  # the system prompt box is the source of truth
            messages = [m for m in messages if not (isinstance(m, dict) and m.get("role") == "system")]
            if system_prompt:
                messages = [{"role": "system", "content": system_prompt}] + messages
        # prefill=False: the KV is rebuilt lazily, by the tab's next action.
        return Conversation.from_messages(engine, messages, raw=raw, prefill=False, lock=lock)
    return Conversation(engine, system_prompt=(system_prompt or None) if not raw else None, raw=raw, lock=lock)


class Handlers:
    """Event handlers for one playground. Every handler returns (or, streaming, yields)
    a `View`; every failure becomes a plain message in the status line, never a traceback."""

    def __init__(self, engine, tabs: TabRegistry, max_new_tokens_cap: int, max_file_mb: float,
                 max_prompt_tokens: int | None = None, max_transcript_mb: float = DEFAULT_MAX_TRANSCRIPT_MB,
                 transcriber=None):
        self.tabs = tabs
        self.transcriber = transcriber  # engines.speech.Transcriber, or None: no speech to text
        self.max_prompt_tokens = max_prompt_tokens
        self.max_transcript_mb = max_transcript_mb
        self.max_context = engine.capacity.max_context_len
        self.modalities = engine.modalities
        self.model = engine.name
        self.max_new_tokens_cap = max_new_tokens_cap
        self.max_file_mb = max_file_mb
        self.run = Runner(tabs, self.transcript, self.max_context)

    def transcript(self, tab) -> dict:
        return {"format": TRANSCRIPT_FORMAT, "model": self.model, "raw": tab.raw,
                "system_prompt": tab.system_prompt, "messages": tab.conv.to_messages()}

    def settings(self, knobs: Knobs):
        return knobs.settings(self.max_new_tokens_cap)

    # ------------------------------------------------------------------ replies (streaming)

    async def on_send(self, box, temperature, top_p, top_k, rep, seed, max_new, stops, system_prompt, raw, stored,
                      transcribe_first=False, language="auto", request: gr.Request = None):
        knobs, page = Knobs(temperature, top_p, top_k, rep, seed, max_new, stops), Page(system_prompt, raw, stored)
        # Recordings become text for a model that takes no audio, or when the user asks.
        speech = self.transcriber is not None and ("audio" not in self.modalities or bool(transcribe_first))
        try:
            parts = parse_box(box, self.modalities, self.model, self.max_file_mb, speech=speech)
            sampling, n, stop_strings = self.settings(knobs)
        except BadInput as e:
            yield self.run.fail(e)
            return
        note = ""
        if speech and any(p.kind == "audio" for p in parts):
            loading = "" if self.transcriber.loaded else " (first use: loading Whisper-base, a few seconds more)"
            yield View(status=f"🎤 Transcribing your recording{loading}…")
            try:
                parts, note = await asyncio.to_thread(speech_to_text, parts, self.transcriber, language)
            except BadInput as e:
                yield self.run.fail(e)
                return
            yield View(status=note)

        def start(conv):
            check_prompt(conv.engine, parts, self.max_prompt_tokens)
            return conv.send(parts, sampling, n, stop_strings=stop_strings, events=True)

        async for view in self.run.stream(request, page, start, clear_box=True, note=note):
            yield view

    def reply_action(self, method: str):
        """The handler of a button that replies without a new message: regenerate,
        continue_reply or step (`method` names the Conversation's)."""
        async def handler(temperature, top_p, top_k, rep, seed, max_new, stops, system_prompt, raw, stored,
                          request: gr.Request):
            try:
                sampling, n, stop_strings = self.settings(Knobs(temperature, top_p, top_k, rep, seed, max_new, stops))
            except BadInput as e:
                yield self.run.fail(e)
                return
            if method == "step":
                start = lambda conv: conv.step(sampling)  # noqa: E731
            else:
                start = lambda conv: getattr(conv, method)(sampling, n, stop_strings=stop_strings, events=True)  # noqa: E731
            async for view in self.run.stream(request, Page(system_prompt, raw, stored), start):
                yield view
        return handler

    async def edit_turn(self, turn_index: int, text: str, knobs: Knobs, page: Page, request):
        try:
            sampling, n, stop_strings = self.settings(knobs)
            if not (text or "").strip():
                raise BadInput("The edited message is empty: type something.")
        except BadInput as e:
            yield self.run.fail(e)
            return

        def start(conv):
            old = conv.turns[turn_index] if 0 <= turn_index < len(conv.turns) else None
            media = [p for p in old.parts if p.kind != "text"] if old is not None else []
            parts = media + [MultimodalInput.text(text)]
            check_prompt(conv.engine, parts, self.max_prompt_tokens)
            return conv.edit(turn_index, parts, sampling, n, stop_strings=stop_strings, events=True)

        async for view in self.run.stream(request, page, start):
            yield view

    async def on_chat_edit(self, history, temperature, top_p, top_k, rep, seed, max_new, stops, system_prompt, raw,
                           stored, data: gr.EditData, request: gr.Request):
        tab = self.tabs.get(request.session_hash)
        if tab is None:
            yield self.run.fail(BadInput("Nothing to edit yet."))
            return
        try:
            i = turn_for_display_index(tab.conv, history, data.index)
        except IndexError as e:
            yield self.run.fail(BadInput(str(e)), tab)
            return
        text = data.value if isinstance(data.value, str) else (data.value or {}).get("text", "")
        text = text.removeprefix(SPOKEN_MARK)  # the chat's mark on transcribed speech is no part of the text
        async for view in self.edit_turn(i, text, Knobs(temperature, top_p, top_k, rep, seed, max_new, stops),
                                         Page(system_prompt, raw, stored), request):
            yield view

    async def on_api_edit(self, turn_index, text, temperature, top_p, top_k, rep, seed, max_new, stops, system_prompt,
                          raw, stored, request: gr.Request):
        try:
            turn_index = as_index(turn_index, "turn_index")
        except BadInput as e:
            yield self.run.fail(e)
            return
        async for view in self.edit_turn(turn_index, text, Knobs(temperature, top_p, top_k, rep, seed, max_new, stops),
                                         Page(system_prompt, raw, stored), request):
            yield view

    # ------------------------------------------------------------------ immediate actions

    def rewind_to(self, turn_index, offset, page: Page, request) -> View:
        try:
            turn_index, offset = as_index(turn_index, "turn_index"), as_index(offset, "offset")
        except BadInput as e:
            return self.run.fail(e)
        return self.run.immediate(request, page, lambda tab: tab.conv.rewind(turn_index, offset),
                                  status=f"Rewound to just before token {offset}: press Continue to resample from here.")

    def on_token_click(self, system_prompt, raw, stored, data: gr.SelectData, request: gr.Request):
        return self.rewind_to(data.value, data.index, Page(system_prompt, raw, stored), request)

    def on_api_rewind(self, turn_index, offset, system_prompt, raw, stored, request: gr.Request):
        return self.rewind_to(turn_index, offset, Page(system_prompt, raw, stored), request)

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
        return self.run.immediate(request, Page(system_prompt, raw, stored), act,
                                  status="Undone: the last message is back in the box.")

    def on_reset(self, system_prompt, raw, stored, request: gr.Request):
        return self.run.immediate(request, Page(system_prompt, raw, stored), lambda tab: tab.conv.reset(),
                                  status="Reset.")

    async def on_stop(self, request: gr.Request):
        # This tab's stream only; remembered for an action of this tab that has not started yet.
        # Async: it never blocks (it sets flags), so it runs at once on the event loop, not
        # after a hop through a busy thread pool.
        self.tabs.request_stop(request.session_hash)

    def refresh(self, request: gr.Request):
        return self.run.refresh(request)

    def on_raw_change(self, raw, system_prompt, request: gr.Request):
        mode = "Raw mode: no chat template; your text is prefilled as is and continued." if raw else "Chat mode."
        tab = self.tabs.get(request.session_hash)
        if tab is None:
            return View(status=mode, stored={"messages": []})
        try:
            with self.run.holding(tab):
                self.tabs.replace(tab, None, system_prompt or "", bool(raw))
        except TabBusy as e:
            return self.run.fail(e, tab)
        return self.run.view(tab, status=mode + " The conversation was cleared.", streaming=False, save=True)

    # ------------------------------------------------------------------ page and transcript

    def on_load(self, stored, request: gr.Request):
        """Page (re)load: show the stored transcript; the KV is rebuilt on the next action."""
        stored = stored or {}
        sp, raw = stored.get("system_prompt") or "", bool(stored.get("raw"))
        if not stored.get("messages"):
            return self.run.view(None, streaming=False)
        try:
            tab = self.tabs.open(request.session_hash, stored["messages"], sp, raw)
        except Exception as e:  # noqa: BLE001
            return self.run.fail(e)
        view = self.run.view(tab, status="Transcript restored; the model re-reads it on your next action.",
                             streaming=False)
        view.system_prompt, view.raw = sp, raw
        return view

    def on_unload(self, request: gr.Request):
        self.tabs.close(request.session_hash)

    def on_export(self, request: gr.Request):
        tab = self.tabs.get(request.session_hash)
        if tab is None:
            raise gr.Error("Nothing to export yet.")
        out = os.path.join(tempfile.mkdtemp(prefix="transcript-"), f"transcript-{time.strftime('%Y%m%d-%H%M%S')}.json")
        with open(out, "w", encoding="utf-8") as f:
            json.dump(self.transcript(tab), f, ensure_ascii=False)
        return out

    def on_import(self, file, system_prompt, raw, stored, request: gr.Request):
        try:
            messages, sp, new_raw = self.read_transcript(file, raw)
            tab = self.run.open_tab(request, stored)
            with self.run.holding(tab):
                self.tabs.replace(tab, messages, sp or "", new_raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return self.run.fail(BadInput(f"The transcript is not valid JSON: {e}"))
        except Exception as e:  # noqa: BLE001
            return self.run.fail(e)
        notes = " ".join(getattr(tab.conv, "import_notes", None) or [])
        view = self.run.view(tab, status=f"Transcript imported; the model reads it on your next action. {notes}".strip(),
                             streaming=False, save=True)
        view.system_prompt, view.raw = sp or "", new_raw
        return view

    def read_transcript(self, file, raw) -> tuple[list, str, bool]:
        """(messages, system prompt, raw) from an uploaded transcript file; BadInput in plain words."""
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
        return messages, sp, new_raw
