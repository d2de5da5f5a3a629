"""Check a live serving engine against the session contract, and print a table.

    python -m engines.check http://host:port [--backend auto] [--api-key KEY]
                            [--tokenizer NAME] [--chat-template FILE] [--quick]

Knows nothing of Gradio or pytest: it uses only the public API (`load_engine`,
sessions, `MultimodalInput`, `SamplingConfig`), so what passes here is what
the playground relies on. Each check is the contract suite's (tests/test_contract.py)
in miniature, with the same oracle: a fresh session prefilled with the same ids.
Exit status: 0 all passed (or skipped), 1 a check failed, 2 no engine at the URL.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
import traceback

from . import Busy, ContextFull, DecodeResult, EngineError, InvalidArgument, MultimodalInput as MI, SamplingConfig
from . import load_engine

GREEDY = SamplingConfig()
STOP = DecodeResult(0, "", False, True)


class Skip(Exception):
    """The server cannot show this (a capability it lacks); not a failure."""


def greedy(session, n: int, sampling=GREEDY) -> list[int]:
    out = []
    for _ in range(n):
        r = session.decode_one(sampling)
        if r.is_terminal:
            break
        out.append(r.token_id)
    return out


def fresh(engine, inputs):
    s = engine.create_session()
    s.prefill(inputs)
    return s


class Checks:
    """One method per check; each returns a short detail string or raises."""

    def __init__(self, engine, n: int):
        self.engine, self.n = engine, n
        questions = ["What is the capital of France?", "Write a haiku about the sea.", "Count from one to ten."]
        try:
            self.prompts = [engine.render([{"role": "user", "content": q}]) for q in questions]
            self.chat = True
        except EngineError:  # no chat template: plain text continues just as well
            self.prompts = [[MI.text(q)] for q in questions]
            self.chat = False

    def render_and_tokenize(self):
        ids = self.engine.tokenize(self.prompts[0])
        assert ids and ids == self.engine.tokenize(self.prompts[0]), "tokenize is not stable"
        how = "chat template" if self.chat else "no chat template (raw text only)"
        return f"{len(ids)} ids for a one-line chat; {how}"

    def prefill_makes_exactly_tokenize_resident(self):
        with self.engine.create_session() as s:
            nxt = s.prefill(self.prompts[0])
            assert s.tokens == self.engine.tokenize(self.prompts[0]), "resident ids differ from tokenize()"
            r = s.decode_one(GREEDY)
            assert r.token_id == nxt, f"prefill said the greedy next id is {nxt}, decode_one gave {r.token_id}"
        return f"greedy next id {nxt}"

    def step_by_step_equals_one_shot_prefill(self):
        with self.engine.create_session() as s:
            s.prefill(self.prompts[0])
            gen = greedy(s, self.n)
            assert s.tokens == self.engine.tokenize(self.prompts[0]) + gen
            with fresh(self.engine, self.prompts[0] + [MI.tokens(gen)]) as ref:
                a, b = greedy(s, 4), greedy(ref, 4)
        assert a == b, f"after {len(gen)} decoded ids the next greedy ids are {a}; a fresh prefill gives {b}"
        return f"{len(gen)} ids decoded, then the same next ids as a fresh session"

    def seek_into_the_reply_equals_a_fresh_session(self):
        with self.engine.create_session() as s:
            s.prefill(self.prompts[1])
            gen = greedy(s, self.n)
            keep = len(gen) // 2
            s.seek(len(self.engine.tokenize(self.prompts[1])) + keep)
            with fresh(self.engine, self.prompts[1] + ([MI.tokens(gen[:keep])] if keep else [])) as ref:
                a, b = greedy(s, 6), greedy(ref, 6)
        assert a == b, f"after seek: {a}; fresh session: {b}"
        return f"rewound {len(gen) - keep} of {len(gen)} decoded ids"

    def stop_from_another_thread_gives_a_terminal_step(self):
        with self.engine.create_session() as s:
            s.prefill(self.prompts[2])
            greedy(s, 3)
            pos = s.position
            t = threading.Thread(target=s.stop)
            t.start()
            t.join(10)
            t0 = time.perf_counter()
            r = s.decode_one(GREEDY)
            took = time.perf_counter() - t0
            assert r == STOP, f"expected the terminal step {STOP}, got {r}"
            assert s.position == pos, "a stop step moved the position"
            assert not s.decode_one(GREEDY).is_terminal, "the stop request was not consumed"
        return f"terminal step in {took * 1000:.0f} ms"

    def stop_then_continue_equals_the_uninterrupted_reply(self):
        with self.engine.create_session() as s:
            s.prefill(self.prompts[2])
            first = greedy(s, 4)
            s.stop()
            assert s.decode_one(GREEDY).is_terminal
            rest = greedy(s, 4)
        with fresh(self.engine, self.prompts[2]) as ref:
            whole = greedy(ref, len(first) + len(rest))
        assert first + rest == whole, f"{first} + {rest} != {whole}"
        return "identical"

    def same_seed_same_tokens_different_seeds_differ(self):
        hot = lambda seed: SamplingConfig(temperature=0.8, seed=seed)  # noqa: E731
        for prompt in self.prompts:
            runs = []
            for seed in (7, 7, 8):
                with fresh(self.engine, prompt) as s:
                    runs.append(greedy(s, 8, hot(seed)))
            assert runs[0] == runs[1], f"seed 7 gave {runs[0]} and then {runs[1]}"
            if runs[0] != runs[2]:
                return "reproducible; seeds 7 and 8 differ"
        raise AssertionError("seeds 7 and 8 gave the same tokens on every prompt")

    def two_sessions_interleaved_equal_their_solo_runs(self):
        solo = []
        for p in self.prompts[:2]:
            with fresh(self.engine, p) as s:
                solo.append(greedy(s, 8))
        a, b = fresh(self.engine, self.prompts[0]), fresh(self.engine, self.prompts[1])
        got = [[], []]
        try:
            for _ in range(8):
                for k, s in enumerate((a, b)):
                    r = s.decode_one(GREEDY)
                    if not r.is_terminal and len(got[k]) < len(solo[k]):
                        got[k].append(r.token_id)
        finally:
            a.close(), b.close()
        assert got == solo, f"interleaved {got} != solo {solo}"
        return "identical"

    def bad_input_is_refused_and_changes_nothing(self):
        big = self.engine.capacity.max_context_len
        with self.engine.create_session() as s:
            s.prefill(self.prompts[0])
            before = s.tokens
            for call, error in ((lambda: s.prefill([]), InvalidArgument),
                                (lambda: s.prefill([MI.text("")]), InvalidArgument),
                                (lambda: s.prefill([MI.tokens([1] * (big + 1))]), ContextFull),
                                (lambda: s.decode_one({"temperature": 1}), InvalidArgument)):
                try:
                    call()
                except error:
                    pass
                else:
                    raise AssertionError(f"expected {error.__name__}")
                assert s.tokens == before, "a refused call changed the resident ids"
            assert not s.decode_one(GREEDY).is_terminal
        return f"context {big} enforced before any request"

    def sessions_beyond_capacity_are_busy(self):
        cap = self.engine.capacity.max_sessions
        opened = [self.engine.create_session() for _ in range(cap - getattr(self.engine, "open_sessions", 0))]
        try:
            try:
                self.engine.create_session()
            except EngineError as e:
                assert isinstance(e, Busy) and "busy" in str(e), f"{type(e).__name__}: {e} (expected Busy)"
            else:
                raise AssertionError(f"a session beyond max_sessions={cap} was created")
            opened.pop().close()
            opened.append(self.engine.create_session())
        finally:
            for s in opened:
                s.close()
        return f"max_sessions {cap}"

    def resending_the_tape_hits_the_prefix_cache(self):
        with self.engine.create_session() as s:
            if not hasattr(s, "last_cached"):
                raise Skip("this engine does not report cached tokens")
            s.prefill(self.prompts[0])
            greedy(s, 4)
            s.prefill([MI.text(" Thanks.")])
            cached = s.last_cached
        if cached is None:
            raise Skip("the server reports no cached_tokens (vLLM: --enable-prompt-tokens-details; "
                       "SGLang: --enable-cache-report)")
        n = len(self.engine.tokenize(self.prompts[0]))
        assert cached >= n - 1, f"only {cached} of the {n}+ resent ids were found in the cache: is prefix caching on?"
        return f"{cached} ids cached"

    def timing(self):
        with self.engine.create_session() as s:
            t0 = time.perf_counter()
            s.prefill(self.prompts[1])
            ttft = time.perf_counter() - t0
            s.decode_one(GREEDY)
            t0 = time.perf_counter()
            k = len(greedy(s, self.n))
            rate = k / (time.perf_counter() - t0) if k else 0.0
        return f"prefill {ttft * 1000:.0f} ms; decode_one {rate:.1f} tok/s (one session)"


ORDER = [
    "render_and_tokenize", "prefill_makes_exactly_tokenize_resident", "step_by_step_equals_one_shot_prefill",
    "seek_into_the_reply_equals_a_fresh_session", "stop_from_another_thread_gives_a_terminal_step",
    "stop_then_continue_equals_the_uninterrupted_reply", "same_seed_same_tokens_different_seeds_differ",
    "two_sessions_interleaved_equal_their_solo_runs", "bad_input_is_refused_and_changes_nothing",
    "sessions_beyond_capacity_are_busy", "resending_the_tape_hits_the_prefix_cache", "timing",
]


def run(engine, n: int = 12, out=None) -> int:
    """Run every check on `engine`, print the table (to `out`, default stdout); returns the number of failures."""
    out = out or sys.stdout
    checks = Checks(engine, n)
    rows = []
    for name in ORDER:
        t0 = time.perf_counter()
        try:
            status, detail = "PASS", getattr(checks, name)()
        except Skip as e:
            status, detail = "SKIP", str(e)
        except AssertionError as e:
            status, detail = "FAIL", str(e) or "assertion failed"
        except Exception as e:  # an error is a failure of that check, not of the run
            status, detail = "FAIL", f"{type(e).__name__}: {e}"
            if os.environ.get("CHECK_TRACEBACK"):
                traceback.print_exc()
        rows.append((name.replace("_", " "), status, f"{time.perf_counter() - t0:.1f}s", detail))
    width = max(len(r[0]) for r in rows)
    print(f"{'check':<{width}}  result  time   detail", file=out)
    print(f"{'-' * width}  ------  -----  ------", file=out)
    for name, status, took, detail in rows:
        print(f"{name:<{width}}  {status:<6}  {took:>5}  {detail}", file=out)
    failed = sum(r[1] == "FAIL" for r in rows)
    print(f"\n{len(rows) - failed} of {len(rows)} passed or skipped; {failed} failed", file=out)
    return failed


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m engines.check", description=__doc__.splitlines()[0])
    ap.add_argument("url", help="http://host:port of llama-server, vLLM or SGLang")
    ap.add_argument("--backend", default="auto", choices=["auto", "llama-server", "vllm", "sglang"])
    ap.add_argument("--api-key", default=os.environ.get("PLAYGROUND_API_KEY"))
    ap.add_argument("--tokenizer", default=None, help="the served model's tokenizer (path or hub id), for "
                    "servers that cannot render a chat template")
    ap.add_argument("--chat-template", default=None, help="a file holding a Jinja chat template")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the server")
    ap.add_argument("--max-sessions", type=int, default=4)
    ap.add_argument("--quick", action="store_true", help="fewer tokens per check")
    args = ap.parse_args(argv)
    options = {"api_key": args.api_key, "timeout": args.timeout}
    if args.tokenizer:
        options["tokenizer"] = args.tokenizer
    template = open(args.chat_template, encoding="utf-8").read() if args.chat_template else None
    try:
        engine = load_engine(args.url, backend=args.backend, max_sessions=args.max_sessions,
                             chat_template=template, **options)
    except EngineError as e:
        print(f"no engine at {args.url}: {e}")
        return 2
    cap = engine.capacity
    print(f"{engine.backend} at {args.url}: {engine.name}\n"
          f"context {cap.max_context_len}, {cap.max_sessions} sessions, end ids {sorted(engine.eos_token_ids)}\n")
    return 1 if run(engine, n=4 if args.quick else 12) else 0


if __name__ == "__main__":
    sys.exit(main())
