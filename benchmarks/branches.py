"""Branches and Compare (issue 17): what one prefill shared by N replies, and a
branch switch that keeps the exact prefix, cost against their peers.

    python -m benchmarks.branches [--quick] [--backend transformers|llama.cpp|both] [--out results.json]

(a) compare: N=3 replies to the last message of a ~1,000-token history, from
    one prefill (forked sessions, decoded with `engine.decode_batch`), against
    one `regenerate` of the same length. Target: x1.3 or less.
(b) switch: moving between two replies to the last message of a ~2,000-token
    history (`Conversation.switch`), against re-sending that history (a fresh
    session prefilling the whole tape, what a stateless chat does). Target:
    x0.05 or less.
(c) floor: what 3 replies at once cost the bare backend, against one, at the
    compare's history length: 3 rows against 1 in one raw model forward
    (transformers, decode threads), or 3 raw xllamacpp streams at once against
    one (llama.cpp). Compare's ratio cannot go below it; (a) over (c) is what
    the playground adds.

Peers run interleaved, repetition by repetition, after a warm-up, in a worker
thread (as Gradio runs handlers); the table shows medians. Not run in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from engines import MultimodalInput, SamplingConfig  # noqa: E402

from .chat import user_turn  # noqa: E402
from .common import erase_slot, interleaved, now, summarise  # noqa: E402
from .decode import in_worker  # noqa: E402

HOT = [SamplingConfig(temperature=0.7, seed=s) for s in (1, 2, 3)]
FILLER = ("Sure. Here is a careful answer with the history, the main ideas, the usual mistakes and a "
          "practical example, explained step by step for a beginner. ") * 3


def history(engine, tokens: int) -> list[dict]:
    """Messages whose render is about `tokens` long, ending with a user turn asking for a long reply."""
    messages, i = [], 0
    while True:
        messages.append({"role": "user", "content": user_turn(i)})
        n = len(engine.tokenize(engine.render(messages, add_generation_prompt=True)))
        if n >= tokens - 60:
            messages[-1]["content"] = "Now write a long story about a lighthouse keeper and a storm."
            return messages
        messages.append({"role": "assistant", "content": FILLER})
        i += 1


def bench_compare(engine, reps: int, history_tokens: int, reply_tokens: int) -> dict:
    """(a): one regenerate against a compare of three, same history, same reply length."""
    from playground import Conversation

    conv = Conversation.from_messages(engine, history(engine, history_tokens))
    "".join(conv.regenerate(HOT[0], reply_tokens))  # the reply both peers replace
    prompt = conv.position - len(conv.turns[-1].token_ids)
    seeds = iter(range(100, 10_000))

    def regenerate():
        sampling = SamplingConfig(temperature=0.7, seed=next(seeds))
        t0 = now()
        "".join(conv.regenerate(sampling, reply_tokens))
        dt = now() - t0
        return {"s": dt, "tokens": len(conv.turns[-1].token_ids), "s_per_token": dt / max(1, len(conv.turns[-1].token_ids))}

    def compare():
        samplings = [SamplingConfig(temperature=0.7, seed=next(seeds)) for _ in HOT]
        t0 = now()
        for _ in conv.compare(samplings, reply_tokens):
            pass
        dt = now() - t0
        longest = max(len(r.token_ids) for r in conv.last_compare[1])
        st = conv.last_stats
        return {"s": dt, "tokens": st.new_tokens, "longest": longest, "s_per_round": dt / max(1, longest),
                "prefilled": st.prefilled, "extra_prefilled": st.extra_prefilled}

    runs = interleaved(reps, {"regenerate": regenerate, "compare3": compare})
    res = summarise(runs)
    res["history_tokens"] = prompt
    res["reply_tokens"] = reply_tokens
    res["ratio_wall"] = res["compare3"]["s"]["median"] / res["regenerate"]["s"]["median"]
    res["ratio_per_token"] = res["compare3"]["s_per_round"]["median"] / res["regenerate"]["s_per_token"]["median"]
    res["target"] = 1.3
    conv.close()
    return res


def bench_switch(engine, reps: int, history_tokens: int, reply_tokens: int) -> dict:
    """(b): switching between two replies against re-sending the whole history."""
    from playground import Conversation

    conv = Conversation.from_messages(engine, history(engine, history_tokens))
    "".join(conv.regenerate(HOT[0], reply_tokens))
    "".join(conv.regenerate(HOT[1], reply_tokens))
    i = len(conv.turns) - 1
    state = {"k": 1}

    def switch():
        state["k"] ^= 1
        t0 = now()
        conv.switch(i, state["k"])
        dt = now() - t0
        return {"s": dt, "reused": conv.last_stats.reused, "prefilled": conv.last_stats.prefilled}

    def resend():
        tape = conv.session.tokens
        with engine.create_session() as s:
            erase_slot(engine, s)
            t0 = now()
            s.prefill([MultimodalInput.tokens(tape)])
            dt = now() - t0
            cached = getattr(s, "last_cached", None)  # a server's prefix cache, where it reports one
        return {"s": dt, "tokens": len(tape), **({"server_cached": cached} if cached is not None else {})}

    runs = interleaved(reps, {"switch": switch, "resend_history": resend})
    res = summarise(runs)
    res["history_tokens"] = conv.position
    res["ratio"] = res["switch"]["s"]["median"] / res["resend_history"]["s"]["median"]
    res["target"] = 0.05
    conv.close()
    return res


def bench_floor(engine, reps: int, history_tokens: int, reply_tokens: int, n: int = 3) -> dict:
    """(c): the bare backend decoding `n` rows (or streams) at once against one."""
    conv_ids = engine.tokenize(engine.render(history(engine, history_tokens)))
    one, many = (_raw_rows if engine.backend == "transformers" else _raw_streams)(engine, conv_ids, reply_tokens, n)
    runs = interleaved(reps, {"one": one, f"at_once_{n}": many})
    res = summarise(runs)
    res["history_tokens"] = len(conv_ids)
    res["ratio"] = res[f"at_once_{n}"]["s"]["median"] / res["one"]["s"]["median"]
    return res


def _raw_rows(engine, ids: list[int], steps: int, n: int):
    """transformers: `steps` one-token forwards of 1 row, or of `n` rows, on the prompt's cache."""
    import torch

    from engines import kv

    model = engine.model
    with torch.inference_mode():
        base = kv.new_cache(model.config)
        model(input_ids=torch.tensor([ids]), past_key_values=base, use_cache=True, logits_to_keep=1)

    def peer(rows: int):
        def go():
            cache = kv.new_cache(model.config)
            with torch.inference_mode():
                for i, layer in enumerate(base.layers):
                    cache.update(layer.keys.repeat(rows, 1, 1, 1), layer.values.repeat(rows, 1, 1, 1), i)
                torch.set_num_threads(1)  # as a decode step runs (engines/cpu_tuning.decode_threads)
                token = torch.full((rows, 1), ids[-1])
                t0 = now()
                for _ in range(steps):
                    model(input_ids=token, past_key_values=cache, use_cache=True, logits_to_keep=1)
                return {"s": now() - t0}
        return go

    return peer(1), peer(n)


def _raw_streams(engine, ids: list[int], tokens: int, n: int):
    """llama.cpp: raw xllamacpp streams of `tokens` each on 1 slot, or on `n` slots at once."""
    from .backends import raw_at_once

    def peer(k: int):
        def go():
            holders = [engine.create_session() for _ in range(k)]  # slots that no session uses
            try:
                r = raw_at_once(engine, [h.slot for h in holders], ids, tokens)
            finally:
                for h in holders:
                    h.close()
            return {"s": r["wall_s"], "tokens": r["tokens"]}
        return go

    return peer(1), peer(n)


def params(quick: bool) -> dict:
    return (dict(reps=1, compare_history=256, switch_history=256, reply=6) if quick else
            dict(reps=5, compare_history=1000, switch_history=2000, reply=32))


def run(engine, quick: bool = False, sections=("compare", "floor", "switch")) -> dict:
    """Each section's results, or {"error": ...} where one failed (a loaded machine can time a server out)."""
    p = params(quick)
    out = {"backend": getattr(engine, "backend", "transformers"), "params": p}
    jobs = {"compare": lambda: bench_compare(engine, p["reps"], p["compare_history"], p["reply"]),
            "floor": lambda: bench_floor(engine, p["reps"], p["compare_history"], p["reply"]),
            "switch": lambda: bench_switch(engine, p["reps"] * 2, p["switch_history"], p["reply"])}
    for name in sections:
        try:
            out[name] = in_worker(jobs[name])
        except Exception as e:  # noqa: BLE001 - recorded, and the other section still runs
            out[name] = {"error": f"{type(e).__name__}: {e}"}
        print(line(out["backend"], name, out[name]), flush=True)
    return out


def line(backend: str, name: str, r: dict) -> str:
    med = lambda x: x["median"]  # noqa: E731
    if "error" in r:
        return f"{backend} ({name}) failed: {r['error']}"
    if name == "compare":
        return (f"{backend} (a) compare N=3 at {r['history_tokens']} history tokens, {r['reply_tokens']} tokens per "
                f"reply: regenerate {med(r['regenerate']['s']):.2f} s ({med(r['regenerate']['tokens']):.0f} tokens) · "
                f"compare ×3 {med(r['compare3']['s']):.2f} s ({med(r['compare3']['tokens']):.0f} tokens, prefilled "
                f"again {med(r['compare3']['extra_prefilled']):.0f}) · x{r['ratio_wall']:.2f} wall, "
                f"x{r['ratio_per_token']:.2f} per reply token (target ≤ x{r['target']})")
    if name == "floor":
        return (f"{backend} (c) floor at {r['history_tokens']} history tokens: the bare backend, 3 at once "
                f"{med(r['at_once_3']['s']):.2f} s vs one {med(r['one']['s']):.2f} s · x{r['ratio']:.2f}")
    return (f"{backend} (b) switch at {r['history_tokens']} tokens: {med(r['switch']['s']) * 1000:.1f} ms "
            f"(prefilled {med(r['switch']['prefilled']):.0f}) · re-send {med(r['resend_history']['s']) * 1000:.0f} ms "
            f"· x{r['ratio']:.3f} (target ≤ x{r['target']})")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny histories and replies (a smoke run)")
    ap.add_argument("--backend", default="both", choices=("transformers", "llama.cpp", "both"))
    ap.add_argument("--only", default="compare,floor,switch", help="sections, comma-separated: compare, floor, switch")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    from engines import load_engine

    from .common import machine

    results = {"machine": machine(), "quick": args.quick}
    for backend in (("transformers", "llama.cpp") if args.backend == "both" else (args.backend,)):
        engine = load_engine("smollm2", backend=backend, max_context=4096)
        results[backend] = run(engine, args.quick, tuple(args.only.split(",")))
        if args.out:  # after each backend, so a later failure keeps what was measured
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:
                json.dump(results, f, indent=1)
    return 0 if all("error" not in r.get(k, {}) for r in results.values() if isinstance(r, dict) and "params" in r
                    for k in ("compare", "floor", "switch")) else 1


if __name__ == "__main__":
    sys.exit(main())
