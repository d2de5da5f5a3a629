"""The Gradio playground: the layout and its event wiring.

The handlers (`handlers.Handlers`) translate widget values into `Conversation`
calls and a `View`; `view.outputs` lays a View out in the wired order. Nothing
here touches a tensor or a tokenizer.

    demo = build_ui(engine)
    launch(demo, server_name="127.0.0.1", server_port=7860)
"""

from __future__ import annotations

import functools
import inspect

import gradio as gr

from engines.speech import LANGUAGES
from playground.sessions import RateLimit, TabRegistry
from playground.ui.assets import BRANCH_JS, CSS, KEEP_JS, TOKEN_JS
from playground.ui.branches import COMPARE_SLOTS, BranchHandlers
from playground.ui.handlers import DEFAULT_MAX_TRANSCRIPT_MB, Handlers, default_make_conversation
from playground.ui.inputs import DEFAULT_MAX_FILE_MB, describe_modalities
from playground.ui.render import COMPARE_EMPTY, TOKENS_EMPTY, context_panel
from playground.ui.view import outputs


def build_ui(engine, *, max_sessions: int | None = None, max_new_tokens_cap: int = 512,
             default_max_new_tokens: int = 128, idle_timeout_s: float = 900.0,
             max_file_mb: float = DEFAULT_MAX_FILE_MB, make_conversation=default_make_conversation,
             title: str | None = None, max_prompt_tokens: int | None = None,
             max_transcript_mb: float = DEFAULT_MAX_TRANSCRIPT_MB, rate_limit: RateLimit | None = None,
             transcriber=None) -> gr.Blocks:
    """The playground for `engine`. The returned Blocks has `.sessions` (its `TabRegistry`).

    Args:
        max_sessions: tabs that may hold a conversation at once (default: the engine's capacity).
        max_new_tokens_cap: the most tokens one action may generate (for public Spaces).
        idle_timeout_s: a tab idle this long is freed.
        max_file_mb: the upload limit, also passed to `launch` by `launch()`.
        max_prompt_tokens: the most tokens one new message may have, media expanded (None: no limit;
            `app.py` sets 4096).
        max_transcript_mb: the largest transcript file an import reads.
        rate_limit: actions per tab (`sessions.RateLimit`); None: no limit. docs/reliability.md.
        transcriber: an `engines.speech.Transcriber`: recordings become text for a model that takes
            no audio (and, on request, for one that does). None: no speech to text. docs/speech.md.
    """
    cap_sessions = engine.capacity.max_sessions
    max_sessions = min(max_sessions or cap_sessions, cap_sessions)
    sessions = TabRegistry(engine, make_conversation, max_sessions, idle_timeout_s, rate_limit=rate_limit)
    max_context = engine.capacity.max_context_len
    modalities = engine.modalities
    model = f"{engine.name} on {engine.backend}" if getattr(engine, "backend", "") else engine.name
    h = Handlers(engine, sessions, max_new_tokens_cap, max_file_mb, max_prompt_tokens=max_prompt_tokens,
                 max_transcript_mb=max_transcript_mb, transcriber=transcriber)

    # ------------------------------------------------------------------ layout

    accepts = describe_modalities(modalities)
    hears = transcriber is not None and "audio" not in modalities  # speech always becomes text
    with gr.Blocks(title=title or f"LLM session playground · {model}") as demo:
        gr.Markdown(f"### LLM session playground · `{model}` · takes {accepts}"
                    + (" · 🎤 speech is transcribed by Whisper-base" if hears else ""))
        stored = gr.BrowserState({"messages": []}, storage_key="llm-playground-transcript")
        with gr.Row():
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(elem_id="chatbot", height=460, editable="user",
                                     reasoning_tags=[("<think>", "</think>")], buttons=["copy"],
                                     placeholder=f"Chat with {model}.")
                box = gr.MultimodalTextbox(
                    elem_id="box", sources=["upload", "microphone"], file_count="multiple", stop_btn=True,
                    placeholder=f"Type or record a message ({model} takes {accepts}; recordings become text)"
                    if hears else f"Type a message ({model} takes {accepts})", show_label=False)
                status = gr.Markdown("", elem_id="status")
                with gr.Row():
                    stop_btn = gr.Button("Stop", variant="stop", interactive=False, elem_id="stop")
                    regen_btn = gr.Button("Regenerate", elem_id="regenerate")
                    continue_btn = gr.Button("Continue", elem_id="continue")
                    step_btn = gr.Button("Step", elem_id="step")
                    reset_btn = gr.Button("Reset", elem_id="reset")
                    compare_btn = gr.Button("Compare", elem_id="compare")
                compare_panel = gr.HTML(COMPARE_EMPTY, elem_id="compare-panel", js_on_load=KEEP_JS)
                gr.Markdown("**Tokens of the last reply**")
                tokens = gr.HTML(TOKENS_EMPTY, elem_id="token-view", js_on_load=TOKEN_JS)
            with gr.Column(scale=2):
                gr.Markdown("**Context**")
                context = gr.HTML(context_panel([], 0, max_context, None, []), elem_id="context", js_on_load=BRANCH_JS)
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
                with gr.Accordion("Compare settings", open=False, elem_id="compare-settings"):
                    compare_n = gr.Radio([2, 3, 4], value=3, label="Replies side by side", elem_id="compare-n")
                    compare_knobs = []
                    for j in range(COMPARE_SLOTS):
                        with gr.Row():
                            compare_knobs += [
                                gr.Number(0.7 if j < 2 else 1.0, label=f"#{j + 1} temperature", minimum=0,
                                          maximum=2, step=0.05, elem_id=f"compare-t{j + 1}"),
                                gr.Number(j + 1, label=f"#{j + 1} seed (-1 = random)", precision=0,
                                          elem_id=f"compare-seed{j + 1}")]
                with gr.Accordion("Speech", open=False, visible=transcriber is not None):
                    transcribe_first = gr.Checkbox(
                        hears, label="Transcribe audio first (Whisper-base)", interactive=not hears,
                        info=f"{model} takes no audio: recordings are always transcribed." if hears
                        else "The model gets the text heard in a recording instead of the audio.",
                        elem_id="transcribe-first")
                    speech_language = gr.Dropdown(
                        [("Detect automatically", "auto")] + [(f"{n} ({c})", c) for c, n in LANGUAGES.items()],
                        value="auto", label="Speech language", allow_custom_value=True, elem_id="speech-language")
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
            api_switch_btn = gr.Button("switch")
            api_keep_btn = gr.Button("keep")

        # ------------------------------------------------------------------ events
        knobs = [temperature, top_p, top_k, rep, seed, max_new, stops]
        ctx_in = [system_prompt, raw, stored]
        outs = [chatbot, box, status, context, tokens, stop_btn, regen_btn, continue_btn, step_btn, reset_btn,
                import_btn, compare_panel, compare_btn, stored]  # view.OUTPUTS, in order
        labels = {"stop": stop_btn.value, "regenerate": regen_btn.value, "continue": continue_btn.value,
                  "step": step_btn.value, "reset": reset_btn.value, "compare_button": compare_btn.value}
        shown = functools.partial(shown_as, labels)
        b = BranchHandlers(h)
        gen_kw = dict(outputs=outs, concurrency_id="generate", concurrency_limit=max_sessions, show_progress="hidden")
        quick_kw = dict(outputs=outs, concurrency_limit=None, show_progress="hidden")
        regenerate = shown(h.reply_action("regenerate"))

        streams = [
            box.submit(shown(h.on_send), [box, *knobs, *ctx_in, transcribe_first, speech_language], api_name="send",
                       **gen_kw),
            regen_btn.click(regenerate, [*knobs, *ctx_in], api_name="regenerate", **gen_kw),
            chatbot.retry(regenerate, [*knobs, *ctx_in], api_visibility="undocumented", **gen_kw),
            continue_btn.click(shown(h.reply_action("continue_reply")), [*knobs, *ctx_in], api_name="continue",
                               **gen_kw),
            step_btn.click(shown(h.reply_action("step")), [*knobs, *ctx_in], api_name="step", **gen_kw),
            chatbot.edit(shown(h.on_chat_edit), [chatbot, *knobs, *ctx_in], api_visibility="undocumented", **gen_kw),
            api_edit_btn.click(shown(h.on_api_edit), [api_turn, api_text, *knobs, *ctx_in], api_name="edit",
                               **gen_kw),
            compare_btn.click(shown(b.on_compare), [box, compare_n, *compare_knobs, top_p, top_k, rep, max_new, stops,
                                                    *ctx_in], api_name="compare", **gen_kw),
        ]
        for trigger, vis in ((stop_btn.click, "public"), (box.stop, "private")):
            trigger(h.on_stop, None, None, cancels=streams, concurrency_limit=None, queue=False,
                    api_name="stop" if vis == "public" else None, api_visibility=vis).then(
                shown(h.refresh), None, api_visibility="undocumented", **quick_kw)
        tokens.select(shown(h.on_token_click), ctx_in, api_visibility="undocumented", **quick_kw)
        context.select(shown(b.on_branch_click), ctx_in, api_visibility="undocumented", **quick_kw)
        compare_panel.select(shown(b.on_keep_click), ctx_in, api_visibility="undocumented", **quick_kw)
        api_switch_btn.click(shown(b.on_api_switch), [api_turn, api_offset, *ctx_in], api_name="switch", **quick_kw)
        api_keep_btn.click(shown(b.on_api_keep), [api_offset, *ctx_in], api_name="keep", **quick_kw)
        api_rewind_btn.click(shown(h.on_api_rewind), [api_turn, api_offset, *ctx_in], api_name="rewind", **quick_kw)
        chatbot.undo(shown(h.on_undo), ctx_in, api_name="undo", **quick_kw)
        reset_btn.click(shown(h.on_reset), ctx_in, api_name="reset", **quick_kw)
        chatbot.clear(shown(h.on_reset), ctx_in, api_visibility="undocumented", **quick_kw)
        raw.input(shown(h.on_raw_change), [raw, system_prompt], api_name="set_raw", **quick_kw)
        export_btn.click(h.on_export, None, export_file, api_name="export", concurrency_limit=None)
        import_btn.upload(shown(h.on_import, extra=True), [import_btn, *ctx_in], outs + [system_prompt, raw],
                          api_name="import", concurrency_limit=None, show_progress="hidden")
        demo.load(shown(h.on_load, extra=True, stored=False), [stored], outs[:-1] + [system_prompt, raw],
                  api_visibility="undocumented", show_progress="hidden")
        demo.unload(h.on_unload)

    demo.queue(default_concurrency_limit=max(2, max_sessions))
    sessions.on_close = forget_session_state(demo)
    sessions.start_reaper(every_s=min(30.0, max(1.0, idle_timeout_s / 4)))
    demo.sessions = sessions
    demo.max_file_mb = max_file_mb
    return demo


def forget_session_state(demo: gr.Blocks):
    """A hook for `TabRegistry.on_close`: drop Gradio's own state for a freed tab.

    Gradio 6.31 keeps a copy of the page's config per browser session (about 0.6 MiB
    for this page, measured with benchmarks/soak.py) and never drops it, only marks it
    closed: without this, memory grew by that much for every visitor. A tab that comes
    back gets a fresh copy."""
    def forget(key: str) -> None:
        holder = getattr(demo, "state_holder", None)  # set at launch
        if holder is not None:
            with holder.lock:
                holder.session_data.pop(key, None)
                holder.time_last_used.pop(key, None)
    return forget


def shown_as(labels: dict, handler, extra: bool = False, stored: bool = True):
    """`handler` (returning or yielding `View`s) as a Gradio function that returns or yields
    the outputs' values (`view.outputs`). Its signature is the handler's: Gradio reads the
    HTTP API's parameter names and its special arguments (`gr.Request`, ...) from it."""
    if inspect.isasyncgenfunction(handler):
        @functools.wraps(handler)
        async def streaming(*args, **kwargs):
            async for view in handler(*args, **kwargs):
                yield outputs(view, labels, extra, stored)
        return streaming

    @functools.wraps(handler)
    def immediate(*args, **kwargs):
        return outputs(handler(*args, **kwargs), labels, extra, stored)
    return immediate


QUEUE_POLL_S = 0.02


def launch(demo: gr.Blocks, **kwargs):
    """`demo.launch` with the playground's CSS and upload limit filled in."""
    kwargs.setdefault("css", CSS)
    kwargs.setdefault("max_file_size", f"{getattr(demo, 'max_file_mb', DEFAULT_MAX_FILE_MB):g}mb")
    # An API call whose argument Gradio cannot convert (text for a slider) then says which input
    # and what it expected, not "the upstream app has raised an exception". Handlers never raise.
    kwargs.setdefault("show_error", True)
    # Page views that never open a tab keep Gradio's per-session copy too: bound how many.
    sessions = getattr(demo, "sessions", None)
    kwargs.setdefault("state_session_capacity", max(256, 8 * (sessions.max_sessions if sessions else 4)))
    quiet_queue(demo)
    return demo.launch(**kwargs)


def quiet_queue(demo: gr.Blocks, poll_s: float = QUEUE_POLL_S) -> None:
    """Gradio's queue looks for new events every 1 ms whenever it has none waiting, even
    while a reply streams, and for progress updates every 10 ms: over 1,000 wake-ups a
    second of the event loop, each taking the GIL from the decode thread and a core from
    llama.cpp's threads. Polling every `poll_s` is still instant for a person, and the
    playground shows no progress bars (benchmarks/RESULTS.md, run 6). The attributes are
    Gradio's own (gradio/queueing.py); a Gradio without them is left alone."""
    queue = getattr(demo, "_queue", None)
    for name in ("sleep_when_free", "progress_update_sleep_when_free"):
        value = getattr(queue, name, None)
        if isinstance(value, (int, float)):
            setattr(queue, name, max(value, poll_s))
