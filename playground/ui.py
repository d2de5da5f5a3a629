"""The Gradio playground: widgets and event wiring only.

Handlers translate widget values into `Conversation` calls and conversation
state back into widget values (`ui_inputs`, `ui_render`). They never touch a
tensor or a tokenizer. One `Conversation` per browser tab lives in a
`SessionManager`, keyed by Gradio's `session_hash`.

    demo = build_ui(engine)
    launch(demo, server_name="127.0.0.1", server_port=7860)
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time

import gradio as gr

from engines import ContextFull, EngineError, MultimodalInput
from playground.sessions import Busy, SessionManager, Tab, TabBusy
from playground.ui_inputs import (
    DEFAULT_MAX_FILE_MB, BadInput, clamp_new_tokens, describe_modalities, make_sampling,
    parse_box, parse_stop_strings,
)
from playground.ui_render import (
    CSS, TOKEN_JS, chat_messages, context_html, part_text, tokens_html, turn_for_display_index,
)

log = logging.getLogger("playground.ui")
EMPTY_BOX = {"text": "", "files": []}
TRANSCRIPT_FORMAT = "llm-playground-transcript"


def default_make_conversation(engine, messages, system_prompt: str, raw: bool):
    """A Conversation for a tab: fresh, or rebuilt from a stored transcript."""
    from playground import Conversation  # the UI's only way into the model

    if messages:
        if not raw:  # the system prompt box is the source of truth
            messages = [m for m in messages if m.get("role") != "system"]
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
    if stats.finish_reason == "context_full":
        note += (f" — the context is full ({conv.position} of {conv.max_context} tokens). Click a token to "
                 "rewind, edit an earlier message, or press Reset.")
    return note


def build_ui(engine, *, max_sessions: int | None = None, max_new_tokens_cap: int = 512,
             default_max_new_tokens: int = 128, idle_timeout_s: float = 900.0,
             max_file_mb: float = DEFAULT_MAX_FILE_MB, make_conversation=default_make_conversation,
             title: str | None = None) -> gr.Blocks:
    """The playground for `engine`. The returned Blocks has `.sessions` (the SessionManager).

    Args:
        max_sessions: tabs that may hold a conversation at once (default: the engine's capacity).
        max_new_tokens_cap: the most tokens one action may generate (for public Spaces).
        idle_timeout_s: a tab idle this long is freed.
        max_file_mb: the upload limit, also passed to `launch` by `launch()`.
    """
    cap_sessions = engine.capacity.max_sessions
    max_sessions = min(max_sessions or cap_sessions, cap_sessions)
    sessions = SessionManager(engine, make_conversation, max_sessions, idle_timeout_s)
    max_context = engine.capacity.max_context_len
    modalities = engine.modalities
    model = engine.name

    # ------------------------------------------------------------------ helpers

    def tab_for(request: gr.Request, stored, system_prompt, raw) -> Tab:
        stored = stored or {}
        tab = sessions.open(request.session_hash, stored.get("messages") or None,
                            system_prompt or "", bool(raw))
        if tab.raw != bool(raw):
            sessions.replace(tab, None, system_prompt or "", bool(raw))
        elif not raw and tab.system_prompt != (system_prompt or ""):
            turns = [t for t in tab.conv.turns if t.role != "system"]
            sessions.replace(tab, tab.conv.to_messages() if turns else None, system_prompt or "", False)
        return tab

    def transcript(tab: Tab) -> dict:
        return {"format": TRANSCRIPT_FORMAT, "model": model, "raw": tab.raw,
                "system_prompt": tab.system_prompt, "messages": tab.conv.to_messages()}

    def view(tab: Tab | None, status: str = "", box=None, streaming: bool | None = None, save: bool = False):
        """One update for STREAM_OUTPUTS. `None` leaves a widget as it is."""
        skip = gr.skip()
        if tab is None:
            chat = ctx = toks = skip
        else:
            chat, ctx = chat_messages(tab.conv), context_html(tab.conv, max_context, running=bool(streaming))
            toks = tokens_html(tab.conv) if streaming is not True else skip
        if streaming is None:
            buttons = [skip] * 6
        else:
            buttons = [gr.update(interactive=streaming)] + [gr.update(interactive=not streaming)] * 5
        return (chat, skip if box is None else box, status, ctx, toks, *buttons,
                transcript(tab) if (save and tab is not None) else skip)

    def fail(e: Exception, tab: Tab | None = None):
        if not isinstance(e, (BadInput, EngineError)):
            log.exception("handler failed")
        msg = error_text(e)
        gr.Warning(msg)
        return view(tab, status="⚠️ " + msg, streaming=False if tab is not None else None, save=tab is not None)

    def settings(temperature, top_p, top_k, rep, seed, max_new, stops):
        return make_sampling(temperature, top_p, top_k, rep, seed), clamp_new_tokens(max_new, max_new_tokens_cap), \
            parse_stop_strings(stops)

    def stream(request, stored, system_prompt, raw, start, clear_box=False):
        """Run one action for this tab: validate, then stream pieces into the widgets.

        `start(conv)` returns a generator of text pieces (validated on call) or a str.
        Closing this generator (Stop / cancel) closes the conversation's stream,
        which records the partial reply.
        """
        try:
            tab = tab_for(request, stored, system_prompt, raw)
        except Exception as e:  # noqa: BLE001 - every failure becomes a message
            yield fail(e)
            return
        if not tab.lock.acquire(blocking=False):
            yield fail(TabBusy("A reply is still streaming in this tab: press Stop first."))
            return
        gen = None
        try:
            tab.touch()
            try:
                gen = start(tab.conv)
            except Exception as e:  # noqa: BLE001
                yield fail(e, tab)
                return
            yield view(tab, box=EMPTY_BOX if clear_box else None, streaming=True)
            if isinstance(gen, str):  # step(): one token, already done
                gen = None
            else:
                for _ in gen:
                    yield view(tab, streaming=True)
            yield view(tab, status=finish_note(tab.conv), streaming=False, save=True)
        except Exception as e:  # noqa: BLE001 - a failure mid-stream keeps the transcript
            yield fail(e, tab)
        finally:
            if gen is not None:
                gen.close()  # no-op when finished; records the partial reply when cancelled
            tab.touch()
            tab.lock.release()

    def refresh(request: gr.Request):
        """Re-render this tab after Stop (waits for the cancelled stream to wind down)."""
        tab = sessions.get(request.session_hash)
        if tab is None:
            return view(None, streaming=False)
        if tab.lock.acquire(timeout=10):
            tab.lock.release()
        return view(tab, status=finish_note(tab.conv, "Stopped · ") or "Stopped", streaming=False, save=True)

    def immediate(request, stored, system_prompt, raw, act, status=""):
        """Run a non-streaming action (rewind, undo, reset) under the tab's lock."""
        try:
            tab = tab_for(request, stored, system_prompt, raw)
        except Exception as e:  # noqa: BLE001
            return fail(e)
        if not tab.lock.acquire(blocking=False):
            return fail(TabBusy("A reply is still streaming in this tab: press Stop first."))
        try:
            out = act(tab)
            return view(tab, status=status, box=out, streaming=False, save=True)
        except Exception as e:  # noqa: BLE001
            return fail(e, tab)
        finally:
            tab.touch()
            tab.lock.release()

    # ------------------------------------------------------------------ handlers

    def on_send(box, temperature, top_p, top_k, rep, seed, max_new, stops, system_prompt, raw, stored,
                request: gr.Request):
        try:
            parts = parse_box(box, modalities, model, max_file_mb)
            args = settings(temperature, top_p, top_k, rep, seed, max_new, stops)
        except BadInput as e:
            yield fail(e)
            return
        yield from stream(request, stored, system_prompt, raw,
                          lambda conv: conv.send(parts, args[0], args[1], stop_strings=args[2]), clear_box=True)

    def make_simple(method):
        def handler(temperature, top_p, top_k, rep, seed, max_new, stops, system_prompt, raw, stored,
                    request: gr.Request):
            try:
                sampling, n, stop_strings = settings(temperature, top_p, top_k, rep, seed, max_new, stops)
            except BadInput as e:
                yield fail(e)
                return
            if method == "step":
                start = lambda conv: conv.step(sampling)  # noqa: E731
            else:
                start = lambda conv: getattr(conv, method)(sampling, n, stop_strings=stop_strings)  # noqa: E731
            yield from stream(request, stored, system_prompt, raw, start)
        return handler

    def edit_turn(turn_index: int, text: str, settings_values, system_prompt, raw, stored, request):
        try:
            sampling, n, stop_strings = settings(*settings_values)
            if not (text or "").strip():
                raise BadInput("The edited message is empty: type something.")
        except BadInput as e:
            yield fail(e)
            return

        def start(conv):
            old = conv.turns[turn_index] if 0 <= turn_index < len(conv.turns) else None
            media = [p for p in old.parts if p.kind != "text"] if old is not None else []
            return conv.edit(turn_index, media + [MultimodalInput.text(text)], sampling, n, stop_strings=stop_strings)

        yield from stream(request, stored, system_prompt, raw, start)

    def on_chat_edit(history, temperature, top_p, top_k, rep, seed, max_new, stops, system_prompt, raw, stored,
                     data: gr.EditData, request: gr.Request):
        tab = sessions.get(request.session_hash)
        if tab is None:
            yield fail(BadInput("Nothing to edit yet."))
            return
        try:
            i = turn_for_display_index(tab.conv, history, data.index)
        except IndexError as e:
            yield fail(BadInput(str(e)), tab)
            return
        text = data.value if isinstance(data.value, str) else (data.value or {}).get("text", "")
        yield from edit_turn(i, text, (temperature, top_p, top_k, rep, seed, max_new, stops),
                             system_prompt, raw, stored, request)

    def on_api_edit(turn_index, text, temperature, top_p, top_k, rep, seed, max_new, stops, system_prompt, raw,
                    stored, request: gr.Request):
        yield from edit_turn(int(turn_index), text, (temperature, top_p, top_k, rep, seed, max_new, stops),
                             system_prompt, raw, stored, request)

    def rewind_to(turn_index, offset, system_prompt, raw, stored, request):
        def act(tab):
            tab.conv.rewind(int(turn_index), int(offset))
        return immediate(request, stored, system_prompt, raw, act,
                         status=f"Rewound to just before token {int(offset)}: press Continue to resample from here.")

    def on_token_click(system_prompt, raw, stored, data: gr.SelectData, request: gr.Request):
        return rewind_to(data.value, data.index, system_prompt, raw, stored, request)

    def on_api_rewind(turn_index, offset, system_prompt, raw, stored, request: gr.Request):
        return rewind_to(turn_index, offset, system_prompt, raw, stored, request)

    def on_undo(system_prompt, raw, stored, request: gr.Request):
        def act(tab):
            turns = tab.conv.turns
            users = [i for i, t in enumerate(turns) if t.role == "user"]
            if not users:
                raise BadInput("Nothing to undo.")
            last = turns[users[-1]]
            files = [p.value for p in last.parts if p.kind != "text" and isinstance(p.value, str)]
            tab.conv.drop_from(users[-1])
            return {"text": part_text(last.parts), "files": files}
        return immediate(request, stored, system_prompt, raw, act, status="Undone: the last message is back in the box.")

    def on_reset(system_prompt, raw, stored, request: gr.Request):
        return immediate(request, stored, system_prompt, raw, lambda tab: tab.conv.reset(), status="Reset.")

    def on_stop(request: gr.Request):
        tab = sessions.get(request.session_hash)
        if tab is not None:
            tab.conv.stop()  # this tab's conversation only

    def on_raw_change(raw, system_prompt, request: gr.Request):
        mode = "Raw mode: no chat template; your text is prefilled as is and continued." if raw else "Chat mode."
        tab = sessions.get(request.session_hash)
        if tab is None:
            return view(None, status=mode, streaming=None)[:-1] + ({"messages": []},)
        if not tab.lock.acquire(blocking=False):
            return fail(TabBusy("A reply is still streaming in this tab: press Stop first."), tab)
        try:
            sessions.replace(tab, None, system_prompt or "", bool(raw))
        finally:
            tab.lock.release()
        return view(tab, status=mode + " The conversation was cleared.", streaming=False, save=True)

    def on_load(stored, request: gr.Request):
        """Page (re)load: show the stored transcript; the KV is rebuilt on the next action."""
        stored = stored or {}
        sp, raw = stored.get("system_prompt") or "", bool(stored.get("raw"))
        if not stored.get("messages"):
            return view(None, streaming=False)[:-1] + (gr.skip(), gr.skip())
        try:
            tab = sessions.open(request.session_hash, stored["messages"], sp, raw)
        except Exception as e:  # noqa: BLE001
            return fail(e)[:-1] + (gr.skip(), gr.skip())
        return view(tab, status="Transcript restored; the model re-reads it on your next action.",
                    streaming=False)[:-1] + (sp, raw)

    def on_unload(request: gr.Request):
        sessions.close(request.session_hash)

    def on_export(request: gr.Request):
        tab = sessions.get(request.session_hash)
        if tab is None:
            raise gr.Error("Nothing to export yet.")
        out = os.path.join(tempfile.mkdtemp(prefix="transcript-"), f"transcript-{time.strftime('%Y%m%d-%H%M%S')}.json")
        with open(out, "w", encoding="utf-8") as f:
            json.dump(transcript(tab), f, ensure_ascii=False)
        return out

    def on_import(file, system_prompt, raw, stored, request: gr.Request):
        try:
            path = file if isinstance(file, str) else getattr(file, "name", None)
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            messages = data.get("messages") if isinstance(data, dict) else data
            if not isinstance(messages, list):
                raise BadInput("This file is not a transcript: expected a JSON list of messages "
                               "or an object with \"messages\".")
            new_raw = bool(data.get("raw", raw)) if isinstance(data, dict) else bool(raw)
            sp = next((m.get("content") for m in messages if isinstance(m, dict) and m.get("role") == "system"
                       and isinstance(m.get("content"), str)), system_prompt or "")
            tab = tab_for(request, stored, system_prompt, raw)
            if not tab.lock.acquire(blocking=False):
                raise TabBusy("A reply is still streaming in this tab: press Stop first.")
            try:
                sessions.replace(tab, messages, sp or "", new_raw)
            finally:
                tab.lock.release()
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return fail(BadInput(f"The transcript is not valid JSON: {e}")) + (gr.skip(), gr.skip())
        except Exception as e:  # noqa: BLE001
            return fail(e) + (gr.skip(), gr.skip())
        return view(tab, status="Transcript imported; the model reads it on your next action.",
                    streaming=False, save=True)[:-1] + (transcript(tab), sp or "", new_raw)

    # ------------------------------------------------------------------ layout

    accepts = describe_modalities(modalities)
    with gr.Blocks(title=title or f"LLM session playground · {model}") as demo:
        gr.Markdown(f"### LLM session playground · `{model}` · takes {accepts}")
        stored = gr.BrowserState({"messages": []}, storage_key="llm-playground-transcript")
        with gr.Row():
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(elem_id="chatbot", height=460, editable="user",
                                     reasoning_tags=[("<think>", "</think>")], buttons=["copy"],
                                     placeholder=f"Chat with {model}.")
                box = gr.MultimodalTextbox(
                    elem_id="box", sources=["upload", "microphone"], file_count="multiple", stop_btn=True,
                    placeholder=f"Type a message ({model} takes {accepts})", show_label=False)
                status = gr.Markdown("", elem_id="status")
                with gr.Row():
                    stop_btn = gr.Button("Stop", variant="stop", interactive=False, elem_id="stop")
                    regen_btn = gr.Button("Regenerate", elem_id="regenerate")
                    continue_btn = gr.Button("Continue", elem_id="continue")
                    step_btn = gr.Button("Step", elem_id="step")
                    reset_btn = gr.Button("Reset", elem_id="reset")
                gr.Markdown("**Tokens of the last reply**")
                tokens = gr.HTML(tokens_html_empty(), elem_id="token-view", js_on_load=TOKEN_JS)
            with gr.Column(scale=2):
                gr.Markdown("**Context**")
                context = gr.HTML(context_html_empty(max_context), elem_id="context")
                raw = gr.Checkbox(False, label="Raw mode (no chat template: text is prefilled as is and continued)",
                                  elem_id="raw")
                system_prompt = gr.Textbox("", label="System prompt", lines=2, elem_id="system")
                with gr.Accordion("Sampling", open=True):
                    temperature = gr.Slider(0, 2, value=0.7, step=0.05, label="Temperature (0 = greedy)", elem_id="temperature")
                    top_p = gr.Slider(0.05, 1, value=0.95, step=0.01, label="Top-p", elem_id="top-p")
                    top_k = gr.Slider(0, 200, value=0, step=1, label="Top-k (0 = off)", elem_id="top-k")
                    rep = gr.Slider(0.5, 2, value=1.0, step=0.01, label="Repetition penalty", elem_id="rep")
                    seed = gr.Number(-1, label="Seed (-1 = random)", precision=0, elem_id="seed")
                    max_new = gr.Slider(1, max_new_tokens_cap, value=min(default_max_new_tokens, max_new_tokens_cap),
                                        step=1, label=f"Max new tokens (≤ {max_new_tokens_cap})", elem_id="max-new")
                    stops = gr.Textbox("", label="Stop strings (one per line, \\n allowed)", lines=2, elem_id="stops")
                with gr.Accordion("Transcript", open=False):
                    export_btn = gr.Button("Export transcript (JSON)")
                    export_file = gr.File(label="Exported transcript", interactive=False)
                    import_btn = gr.UploadButton("Import transcript (JSON)", file_types=[".json"])
        # API-only entry points for the chat's edit and the token view's click.
        with gr.Row(visible=False):
            api_turn = gr.Number(0, precision=0)
            api_offset = gr.Number(0, precision=0)
            api_text = gr.Textbox("")
            api_edit_btn = gr.Button("edit")
            api_rewind_btn = gr.Button("rewind")

        # ------------------------------------------------------------------ events
        knobs = [temperature, top_p, top_k, rep, seed, max_new, stops]
        ctx_in = [system_prompt, raw, stored]
        outs = [chatbot, box, status, context, tokens, stop_btn, regen_btn, continue_btn, step_btn, reset_btn,
                import_btn, stored]
        gen_kw = dict(outputs=outs, concurrency_id="generate", concurrency_limit=max_sessions, show_progress="hidden")
        quick_kw = dict(outputs=outs, concurrency_limit=None, show_progress="hidden")

        streams = [
            box.submit(on_send, [box, *knobs, *ctx_in], api_name="send", **gen_kw),
            regen_btn.click(make_simple("regenerate"), [*knobs, *ctx_in], api_name="regenerate", **gen_kw),
            chatbot.retry(make_simple("regenerate"), [*knobs, *ctx_in], api_visibility="undocumented", **gen_kw),
            continue_btn.click(make_simple("continue_reply"), [*knobs, *ctx_in], api_name="continue", **gen_kw),
            step_btn.click(make_simple("step"), [*knobs, *ctx_in], api_name="step", **gen_kw),
            chatbot.edit(on_chat_edit, [chatbot, *knobs, *ctx_in], api_visibility="undocumented", **gen_kw),
            api_edit_btn.click(on_api_edit, [api_turn, api_text, *knobs, *ctx_in], api_name="edit", **gen_kw),
        ]
        for trigger, vis in ((stop_btn.click, "public"), (box.stop, "private")):
            trigger(on_stop, None, None, cancels=streams, concurrency_limit=None, queue=False,
                    api_name="stop" if vis == "public" else None, api_visibility=vis).then(
                refresh, None, api_visibility="undocumented", **quick_kw)
        tokens.select(on_token_click, ctx_in, api_visibility="undocumented", **quick_kw)
        api_rewind_btn.click(on_api_rewind, [api_turn, api_offset, *ctx_in], api_name="rewind", **quick_kw)
        chatbot.undo(on_undo, ctx_in, api_name="undo", **quick_kw)
        reset_btn.click(on_reset, ctx_in, api_name="reset", **quick_kw)
        chatbot.clear(on_reset, ctx_in, api_visibility="undocumented", **quick_kw)
        raw.input(on_raw_change, [raw, system_prompt], api_name="set_raw", **quick_kw)
        export_btn.click(on_export, None, export_file, api_name="export", concurrency_limit=None)
        import_btn.upload(on_import, [import_btn, *ctx_in], outs + [system_prompt, raw], api_name="import",
                          concurrency_limit=None, show_progress="hidden")
        demo.load(on_load, [stored], outs[:-1] + [system_prompt, raw], api_visibility="undocumented",
                  show_progress="hidden")
        demo.unload(on_unload)

    demo.queue(default_concurrency_limit=max(2, max_sessions))
    sessions.start_reaper(every_s=min(30.0, max(1.0, idle_timeout_s / 4)))
    demo.sessions = sessions
    demo.max_file_mb = max_file_mb
    return demo


def tokens_html_empty() -> str:
    return ("<div id='tokens' class='empty'>The last reply's tokens appear here. "
            "Click one to rewind to just before it, then press Continue.</div>")


def context_html_empty(max_context: int) -> str:
    class _Empty:
        turns, position, last_stats = [], 0, None

    return context_html(_Empty(), max_context)


def launch(demo: gr.Blocks, **kwargs):
    """`demo.launch` with the playground's CSS and upload limit filled in."""
    kwargs.setdefault("css", CSS)
    kwargs.setdefault("max_file_size", f"{getattr(demo, 'max_file_mb', DEFAULT_MAX_FILE_MB):g}mb")
    return demo.launch(**kwargs)
