"""(b) Multi-turn time to first token and (c) regenerate / edit at long histories.

The playground keeps the KV cache and prefills only what is new
(`playground.Conversation`); the usual demo re-sends the whole templated
history through `model.generate()` every turn. Both see the same history:
the baseline replays the playground's own transcript.
"""

from __future__ import annotations

import torch

from engines import MultimodalInput, SamplingConfig

from . import common
from .common import now, summary

GREEDY = SamplingConfig()
TOPICS = ["a steam engine", "the immune system", "a compiler", "photosynthesis", "a bicycle gearbox",
          "the stock market", "a refrigerator", "plate tectonics", "a search engine", "bread baking",
          "a jet engine", "the water cycle"]


def user_turn(i: int) -> str:
    """About 40 tokens that ask for a long answer."""
    return (f"Question {i + 1}: please explain in detail, step by step, how {TOPICS[i % len(TOPICS)]} works, "
            "covering its history, the main ideas behind it, common mistakes people make, and one practical "
            "example a beginner could try today.")


def generate_ttft(engine, messages: list[dict], model=None) -> tuple[float, int]:
    """The demo path's time to first token: template + tokenize + generate(max_new_tokens=1)
    over the whole history. Returns (seconds, prompt tokens)."""
    model = model or engine.model
    tok = engine.tokenizer
    t0 = now()
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    input_ids = ids["input_ids"]
    torch.set_num_threads(engine.num_threads)  # a fresh process's default, not the engine's decode setting
    with torch.inference_mode():
        model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=1,
                       do_sample=False, temperature=None, top_p=None, top_k=None,
                       pad_token_id=tok.eos_token_id)
    return now() - t0, int(input_ids.shape[1])


def _drain(gen) -> tuple[str, float | None]:
    """Consume a stream; returns the text and the wall time to its first piece."""
    t0, first, text = now(), None, []
    for piece in gen:
        if first is None:
            first = now() - t0
        text.append(piece)
    return "".join(text), first


def one_multiturn(engine, turns: int, reply_tokens: int) -> dict:
    """One conversation of `turns` turns through the playground, then the same
    history re-sent through generate() at every turn."""
    from playground import Conversation

    conv = Conversation(engine)
    play, base, hist = [], [], []
    messages: list[dict] = []
    try:
        for i in range(turns):
            text = user_turn(i)
            reply, _ = _drain(conv.send([MultimodalInput.text(text)], GREEDY, max_new_tokens=reply_tokens))
            play.append(conv.last_stats.ttft_s)
            hist.append(conv.last_stats.reused + conv.last_stats.prefilled)
            messages.append({"role": "user", "content": text})
            ttft, _ = generate_ttft(engine, messages)
            base.append(ttft)
            messages.append({"role": "assistant", "content": reply})
    finally:
        conv.close()
    return {"playground_ttft": play, "generate_resend_ttft": base, "context_tokens": hist}


def run_multiturn(engine, reps: int, turns: int = 10, reply_tokens: int = 64) -> dict:
    if common.WARMUP:
        one_multiturn(engine, 2, 4)
    runs = [one_multiturn(engine, turns, reply_tokens) for _ in range(reps)]
    per_turn = []
    for t in range(turns):
        p = summary([r["playground_ttft"][t] for r in runs])
        b = summary([r["generate_resend_ttft"][t] for r in runs])
        per_turn.append({"turn": t + 1, "context_tokens": runs[0]["context_tokens"][t],
                         "playground_ttft_s": p, "generate_resend_ttft_s": b,
                         "ratio": p["median"] / b["median"]})
    last = per_turn[-1]
    return {"turns": turns, "reply_tokens": reply_tokens, "per_turn": per_turn,
            "last_turn_ratio": last["ratio"],
            "last_turn_ratio_per_rep": [r["playground_ttft"][-1] / r["generate_resend_ttft"][-1] for r in runs]}


def build_history(engine, target_tokens: int):
    """A Conversation whose last reply ends near `target_tokens` resident tokens,
    built from a filler transcript (prefilled once, not timed)."""
    from playground import Conversation

    filler = ("The committee reviewed the quarterly figures in detail, noted the rise in shipping costs, "
              "and asked each regional office to send a short written plan for the next season. ")
    messages = []
    while True:
        messages += [{"role": "user", "content": filler}, {"role": "assistant", "content": filler}]
        n = len(engine.tokenize(engine.render(messages + [{"role": "user", "content": user_turn(0)}])))
        if n + 16 >= target_tokens - 60:
            break
    conv = Conversation.from_messages(engine, messages)
    _drain(conv.send([MultimodalInput.text(user_turn(0))], GREEDY, max_new_tokens=16))
    return conv, messages + [{"role": "user", "content": user_turn(0)}]


def one_regen(engine, target_tokens: int) -> dict:
    conv, messages = build_history(engine, target_tokens)
    try:
        history_ids = conv.session.tokens
        history = len(history_ids)
        _drain(conv.regenerate(GREEDY, max_new_tokens=2))
        regen = conv.last_stats.ttft_s
        user_index = len(conv.turns) - 2
        _drain(conv.edit(user_index, [MultimodalInput.text(user_turn(1))], GREEDY, max_new_tokens=2))
        edit = conv.last_stats.ttft_s
        reprefill, _ = generate_ttft(engine, messages)
        # A fresh session prefilled with the whole history: the fallback when seek is impossible.
        s = engine.create_session()
        try:
            t0 = now()
            s.prefill([MultimodalInput.tokens(history_ids)])
            s.decode_one(GREEDY)
            fresh = now() - t0
        finally:
            s.close()
    finally:
        conv.close()
    return {"history_tokens": history, "regenerate_ttft_s": regen, "edit_ttft_s": edit,
            "generate_reprefill_ttft_s": reprefill, "session_reprefill_ttft_s": fresh}


def run_regen(engine, reps: int, lengths=(256, 1024, 2048)) -> dict:
    if common.WARMUP:
        one_regen(engine, min(lengths))
    out = {}
    for L in lengths:
        runs = [one_regen(engine, L) for _ in range(reps)]
        row = {k: summary([r[k] for r in runs]) for k in runs[0] if k != "history_tokens"}
        row["history_tokens"] = runs[0]["history_tokens"]
        row["regenerate_ratio"] = row["regenerate_ttft_s"]["median"] / row["generate_reprefill_ttft_s"]["median"]
        row["edit_ratio"] = row["edit_ttft_s"]["median"] / row["generate_reprefill_ttft_s"]["median"]
        out[str(L)] = row
    return out
