"""Serving engines by URL against llama.cpp in process, on the same GGUF and thread count.

    python -m benchmarks.serving [--threads 2] [--reps 5] [--url http://...] [--out results.json]
    python -m benchmarks.serving --smoke      # seconds; what CI runs

(a) decode_one: tokens per second of the contract's one-token step over HTTP on
    loopback (a llama-server in another process) and in process (LlamaCppEngine),
    the two run in turn so they share the machine's load. Target: HTTP >= 0.85x.
(b) Turn-10 time to first token over HTTP: the session keeps its tape and the
    server's prompt cache holds the history, against re-sending the whole history
    to a slot whose cache was erased (a stateless client). Target: <= 0.15x. The
    server's own count of cached prompt tokens is reported for both.

Medians of paired rounds; the per-round ratios are in the JSON. Without --url a
llama-server is started here (tests/servers.py) with --threads compute threads.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engines import MultimodalInput as MI, SamplingConfig  # noqa: E402
from playground import Conversation  # noqa: E402

from benchmarks.common import erase_slot  # noqa: E402

GREEDY = SamplingConfig()
PROMPT = "Write a long story about a lighthouse keeper and a storm."
QUESTIONS = ["Tell me about the sea.", "What lives in it?", "Name a famous ship.", "Why did it sink?",
             "What is a lighthouse?", "Who keeps it?", "What is a storm?", "How do sailors navigate?",
             "What is a harbour?", "Summarise our talk in one sentence."]


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def decode_rate(engine, n: int) -> dict:
    """decode_one tok/s after the first token (the first includes opening the stream)."""
    with engine.create_session() as s:
        s.prefill(engine.render([{"role": "user", "content": PROMPT}]))
        stamps = []
        for _ in range(n):
            r = s.decode_one(GREEDY)
            stamps.append(time.perf_counter())
            if r.is_terminal:
                break
    k = len(stamps)
    return {"tok_s": (k - 1) / (stamps[-1] - stamps[0]) if k > 1 else None, "tokens": k}


def history(engine, turns: int, reply_tokens: int) -> Conversation:
    """A conversation of `turns` exchanges (greedy replies of up to `reply_tokens`)."""
    conv = Conversation(engine, system_prompt="You are a helpful assistant.")
    for q in QUESTIONS[:turns]:
        "".join(conv.send([MI.text(q)], GREEDY, reply_tokens))
    return conv


def ttft_cached(conv: Conversation, question: str) -> dict:
    """The next turn on the live session: only the new message is sent for evaluation."""
    s = conv.session
    keep = s.position
    new = conv.engine.render(
        [{"role": t.role, "content": t.text, **({"token_ids": t.token_ids} if t.role == "assistant" else {})}
         for t in conv.turns] + [{"role": "user", "content": question}])
    ids = conv.engine.tokenize(new)
    assert ids[:keep] == s.tokens, "the rendered history does not extend the live tape"
    t0 = time.perf_counter()
    s.prefill([MI.tokens(ids[keep:])])
    s.decode_one(GREEDY)
    took = time.perf_counter() - t0
    cached = getattr(s, "last_cached", None)
    s.seek(keep)  # back to the end of the history, for the next round
    return {"ttft_s": took, "cached_tokens": cached, "prompt_tokens": len(ids), "new_tokens": len(ids) - keep}


def ttft_uncached(engine, ids: list[int]) -> dict:
    """A stateless client: the whole history sent to a slot with nothing cached."""
    with engine.create_session() as s:
        erase_slot(engine, s)
        t0 = time.perf_counter()
        s.prefill([MI.tokens(ids)])
        s.decode_one(GREEDY)
        took = time.perf_counter() - t0
        return {"ttft_s": took, "cached_tokens": getattr(s, "last_cached", None), "prompt_tokens": len(ids)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.serving", description=__doc__.splitlines()[0])
    ap.add_argument("--url", default=None, help="a running llama-server with the default GGUF (else one is started)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=128, help="decode_one steps per round")
    ap.add_argument("--turns", type=int, default=9, help="exchanges before the measured turn")
    ap.add_argument("--reply-tokens", type=int, default=96)
    ap.add_argument("--smoke", action="store_true", help="one tiny round of each (CI)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.smoke:
        args.reps, args.tokens, args.turns, args.reply_tokens = 1, 8, 2, 6

    from engines import load_engine
    from engines.llamacpp import LlamaCppEngine
    from engines.loading import default_gguf_path

    server = None
    if args.url is None:
        from tests.servers import LlamaServerProcess

        server = LlamaServerProcess(slots=4, ctx_per_slot=4096, threads=args.threads)
    url = args.url or server.url
    try:
        http = load_engine(url, max_sessions=4)
        local = LlamaCppEngine(default_gguf_path(), max_sessions=4, max_context=4096, n_threads=args.threads)
        res = {"url": url, "threads": args.threads, "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
               "cpus": os.cpu_count(), "reps": args.reps}

        # (a) decode_one, paired rounds, alternating which goes first
        decode_one(http, local, args)  # warm-up, not recorded
        rounds = [decode_one(http, local, args, flip=r % 2 == 1) for r in range(args.reps)]
        ratios = [r["http"]["tok_s"] / r["in_process"]["tok_s"] for r in rounds
                  if r["http"]["tok_s"] and r["in_process"]["tok_s"]]
        res["decode_one"] = {
            "http_tok_s": med([r["http"]["tok_s"] for r in rounds]),
            "in_process_tok_s": med([r["in_process"]["tok_s"] for r in rounds]),
            "ratio_median": med(ratios), "ratios": [round(x, 3) for x in ratios], "tokens": args.tokens}

        # (b) turn-10 TTFT over HTTP: cached session vs the history re-sent with no cache
        conv = history(http, args.turns, args.reply_tokens)
        question = QUESTIONS[min(args.turns, len(QUESTIONS) - 1)]
        full = http.tokenize(http.render(
            [{"role": t.role, "content": t.text, **({"token_ids": t.token_ids} if t.role == "assistant" else {})}
             for t in conv.turns] + [{"role": "user", "content": question}]))
        ttft_cached(conv, question)  # warm-up
        pairs = []
        for r in range(args.reps):
            order = [("cached", lambda: ttft_cached(conv, question)), ("uncached", lambda: ttft_uncached(http, full))]
            got = dict((name, fn()) for name, fn in (order if r % 2 == 0 else order[::-1]))
            pairs.append(got)
        ratios = [p["cached"]["ttft_s"] / p["uncached"]["ttft_s"] for p in pairs]
        res["turn_ttft"] = {
            "turn": args.turns + 1, "history_tokens": len(full),
            "cached_ttft_s": med([p["cached"]["ttft_s"] for p in pairs]),
            "uncached_ttft_s": med([p["uncached"]["ttft_s"] for p in pairs]),
            "ratio_median": med(ratios), "ratios": [round(x, 3) for x in ratios],
            "cached_tokens_cached": med([p["cached"]["cached_tokens"] for p in pairs]),
            "cached_tokens_uncached": med([p["uncached"]["cached_tokens"] for p in pairs]),
            "new_tokens": pairs[0]["cached"]["new_tokens"]}
        conv.close()
    finally:
        if server is not None:
            server.stop()

    d, t = res["decode_one"], res["turn_ttft"]
    print(f"threads {res['threads']}, load {res['load_avg_at_start']}, {res['reps']} paired rounds (medians)")
    print(f"decode_one  HTTP {d['http_tok_s']:.1f} tok/s   in process {d['in_process_tok_s']:.1f} tok/s   "
          f"ratio {d['ratio_median']:.2f}x (target >= 0.85x)")
    print(f"turn {t['turn']} TTFT ({t['history_tokens']} tokens of history)   "
          f"cached {t['cached_ttft_s'] * 1000:.0f} ms "
          f"(cached_tokens {t['cached_tokens_cached']})   re-sent without cache {t['uncached_ttft_s'] * 1000:.0f} ms "
          f"(cached_tokens {t['cached_tokens_uncached']})   ratio {t['ratio_median']:.3f}x (target <= 0.15x)")
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2))
    return 0


def decode_one(http, local, args, flip: bool = False) -> dict:
    cases = [("http", http), ("in_process", local)]
    if flip:
        cases.reverse()
    return {name: decode_rate(engine, args.tokens) for name, engine in cases}


if __name__ == "__main__":
    sys.exit(main())
