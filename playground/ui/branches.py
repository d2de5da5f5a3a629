"""Handlers for branches and Compare: widget values in, `Conversation` calls, widget values out.

Knows nothing of tensors, tokenizers or the layout (`layout.py` wires these). They
run through `Runner.stream` and `Runner.immediate`, so locking, Stop,
errors and the widgets' updates are the same as for every other action.
"""

from __future__ import annotations

import gradio as gr

from playground.sessions import check_prompt
from playground.ui.inputs import BadInput, clamp_new_tokens, make_sampling, parse_box, parse_stop_strings
from playground.ui.render import live_compare
from playground.ui.runner import Page

COMPARE_SLOTS = 4  # columns of settings the layout offers


class BranchHandlers:
    """`‹ k/n ›` switches, Compare and "Keep this one", on top of one `Handlers`."""

    def __init__(self, h):
        self.h = h

    # ------------------------------------------------------------------ switching

    def switch(self, turn_index, k, system_prompt, raw, stored, request):
        def act(tab):
            tab.conv.switch(int(turn_index), int(k))
        return self.h.run.immediate(request, Page(system_prompt, raw, stored), act,
                                    status="Switched branch: the context panel shows what was reused and prefilled.")

    def on_branch_click(self, system_prompt, raw, stored, data: gr.SelectData, request: gr.Request):
        """A click on ‹ or › (BRANCH_JS): `data.index` is the turn, `data.value` the sibling."""
        return self.switch(data.index, data.value, system_prompt, raw, stored, request)

    def on_api_switch(self, turn_index, k, system_prompt, raw, stored, request: gr.Request):
        return self.switch(turn_index, k, system_prompt, raw, stored, request)

    # ------------------------------------------------------------------ compare

    async def on_compare(self, box, n, t1, s1, t2, s2, t3, s3, t4, s4, top_p, top_k, rep, max_new, stops,
                         system_prompt, raw, stored, request: gr.Request):
        """Compare `n` replies, reply j with temperature tj and seed sj (-1 = random), to the
        box's message, or (an empty box) to the last user message again."""
        h = self.h
        pairs = (t1, s1, t2, s2, t3, s3, t4, s4)
        try:
            n = int(n)
            if not 2 <= n <= COMPARE_SLOTS:
                raise BadInput(f"Compare takes 2 to {COMPARE_SLOTS} replies, got {n}.")
            samplings = [make_sampling(pairs[2 * j], top_p, top_k, rep, pairs[2 * j + 1]) for j in range(n)]
            max_new = clamp_new_tokens(max_new, h.max_new_tokens_cap)
            stop_strings = parse_stop_strings(stops)
            parts = parse_box(box, h.modalities, h.model, h.max_file_mb, allow_empty=True)
        except (BadInput, TypeError, ValueError) as e:
            yield h.run.fail(e if isinstance(e, BadInput) else BadInput(f"Compare settings: {e}"))
            return

        def start(conv):
            if parts:
                check_prompt(conv.engine, parts, h.max_prompt_tokens)
            return conv.compare(samplings, max_new, stop_strings, parts=parts or None, events=True)

        async for view in h.run.stream(request, Page(system_prompt, raw, stored), start, clear_box=bool(parts)):
            yield view

    def keep(self, k, system_prompt, raw, stored, request):
        def act(tab):
            live = live_compare(tab.conv)
            if live is None:
                raise BadInput("That comparison is no longer part of this conversation; press Compare again.")
            i, replies = live
            if not 0 <= int(k) < len(replies):
                raise BadInput(f"There is no reply {int(k) + 1} in the last comparison.")
            siblings = tab.conv.turns[i - 1].children
            tab.conv.switch(i, next(j for j, t in enumerate(siblings) if t is replies[int(k)]))
        return self.h.run.immediate(request, Page(system_prompt, raw, stored), act,
                                    status=f"Kept reply {int(k) + 1}: the chat continues from it.")

    def on_keep_click(self, system_prompt, raw, stored, data: gr.SelectData, request: gr.Request):
        """A click on "Keep this one" (KEEP_JS): `data.index` is the reply."""
        return self.keep(data.index, system_prompt, raw, stored, request)

    def on_api_keep(self, k, system_prompt, raw, stored, request: gr.Request):
        return self.keep(k, system_prompt, raw, stored, request)
