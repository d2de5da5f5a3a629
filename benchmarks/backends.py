"""Issue 12's targets: the llama.cpp backend against its peers, paired in one run.

    python -m benchmarks.backends [--quick] [--out FILE] [--only decode,concurrent,...] [--reps N] [--tokens N]

Sections, each peer interleaved with its own, repetition by repetition, after an
unrecorded warm-up (none in --quick), medians over the repetitions:

- decode: `CompletionSession.decode_one` on llama.cpp against raw xllamacpp
  streaming (`Server.handle_completions` with a callback) on the same engine's
  server, on a slot no session holds: same GGUF, threads, token-id prompt,
  greedy settings and token count. Also the raw stream with exactly the request
  the session sends (top-5 log-probabilities, per-token timings), which splits
  the session's cost into "what it asks the server for" and "the Python
  hand-off". And the transformers backend's `decode_one` (target: llama.cpp
  >= 4x), run in a child process so that this process, like `app.py` on
  llama.cpp, never imports torch.
- concurrent: 4 sessions decoding at once (one thread each) against 1, and raw
  xllamacpp's own 4 streams against 1 (target: our ratio >= 0.9x raw's).
- ui: a `gradio_client` streaming /send from the playground served by a child
  process (as deployed; SIGSTOPped while other sections run) against the
  engine's own rate: a plain `decode_one` loop on an identical engine in this
  process, same prompt and tokens (target: >= 0.9x). Diagnostics: the same loop
  inside the UI's process, `Conversation.send` without Gradio, and the UI's own
  stats line, which together say where the difference goes.
- startup: `python app.py` (llama.cpp, the default on CPU) from spawn to the
  first streamed token at an HTTP client, against `python -c "import gradio"`
  (target: <= +1.5 s).
- chat: time to first token at turn 10 keeping the cache against re-sending the
  whole history to an erased slot / fresh session (target <= 0.1x); regenerate
  at ~2k tokens of history against re-sending it (target <= 0.05x). On
  llama.cpp and (in the child) transformers.
- stop: `Conversation.stop()` from another thread while 8 conversations stream
  on one engine with 8 slots; latency to the end of the stream, p50/p95
  (target p95 <= 0.3 s).

The 1-minute load average is sampled through the run and reported per section.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from .common import erase_slot, interleaved, now, summarise, summary  # noqa: E402 (no torch in common's imports)

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = ("decode", "concurrent", "chat", "stop", "ui", "startup")
PROMPT = "Write a long, detailed story about a robot who learns to paint, with many characters."  # as decode.py
GREEDY_UI = dict(temperature=0, top_p=1, top_k=0, rep=1, seed=0, stops="", system_prompt="", raw=False)
TOPICS = ["a steam engine", "the immune system", "a compiler", "photosynthesis", "a bicycle gearbox",
          "the stock market", "a refrigerator", "plate tectonics", "a search engine", "bread baking",
          "a jet engine", "the water cycle"]
FILLER = ("The committee reviewed the quarterly figures in detail, noted the rise in shipping costs, "
          "and asked each regional office to send a short written plan for the next season. ")
TARGETS = {"decode_vs_raw": 0.9, "decode_vs_transformers": 4.0, "concurrent_vs_raw_ratio": 0.9,
           "ui_client_vs_engine": 0.9, "startup_extra_s": 1.5, "turn10_ratio": 0.1, "regen_ratio": 0.05,
           "stop_p95_s": 0.3}


def params(quick: bool) -> dict:
    if quick:
        return dict(reps=1, tokens=8, conc_tokens=8, ui_tokens=12, start_reps=1, turns=2, reply=6, regen_history=256,
                    stop_samples=6, stop_streams=8)
    return dict(reps=5, tokens=128, conc_tokens=128, ui_tokens=128, start_reps=5, turns=10, reply=64,
                regen_history=2048, stop_samples=60, stop_streams=8)


# --------------------------------------------------------------------------- shared pieces (any backend)


def greedy():
    from engines import SamplingConfig

    return SamplingConfig()


def prompt_ids(engine, text: str = PROMPT) -> list[int]:
    return engine.tokenize(engine.render([{"role": "user", "content": text}]))


def user_turn(i: int) -> str:
    """About 40 tokens asking for a long answer (the same turns as benchmarks/chat.py)."""
    return (f"Question {i + 1}: please explain in detail, step by step, how {TOPICS[i % len(TOPICS)]} works, "
            "covering its history, the main ideas behind it, common mistakes people make, and one practical "
            "example a beginner could try today.")


def rates(t0: float, stamps: list[float]) -> dict:
    n = len(stamps)
    return {"ttft_s": stamps[0] - t0 if stamps else None,
            "tok_s": (n - 1) / (stamps[-1] - stamps[0]) if n > 1 else 0.0, "tokens": n}


def session_decode(engine, ids: list[int], n: int) -> dict:
    """prefill, then `n` greedy decode_one calls; tok/s over the gaps between tokens."""
    from engines import MultimodalInput

    sampling = greedy()
    s = engine.create_session()
    try:
        t0 = now()
        s.prefill([MultimodalInput.tokens(ids)])
        stamps, text = [], []
        for _ in range(n):
            r = s.decode_one(sampling)
            if r.is_terminal:
                break
            stamps.append(now())
            text.append(r.text_piece)
        out = rates(t0, stamps)
        out["text"] = "".join(text)
        return out
    finally:
        s.close()


def drain(gen, t0: float | None = None) -> tuple[str, float | None]:
    """Consume a stream; the text and the wall time from `t0` (default: now) to its first piece."""
    t0, first, text = t0 or now(), None, []
    for piece in gen:
        if first is None:
            first = now() - t0
        text.append(piece)
    return "".join(text), first


def resend(engine, messages: list[dict]) -> dict:
    """The stateless peer: template and tokenize the whole history, prefill it into a
    fresh session (llama.cpp: its slot erased first, so nothing is cached), first token."""
    from engines import MultimodalInput

    s = engine.create_session()
    try:
        erase_slot(engine, s)
        t0 = now()
        ids = engine.tokenize(engine.render(messages))
        s.prefill([MultimodalInput.tokens(ids)])
        s.decode_one(greedy())
        out = {"ttft_s": now() - t0, "tokens": len(ids)}
        cached = getattr(s, "last_cached", None)
        if cached is not None:
            out["cached_tokens"] = cached
        return out
    finally:
        s.close()


def wait_idle(engine, timeout: float = 60.0) -> float:
    """Seconds until no slot of a llama.cpp engine is processing (0 for other engines).

    A reply that ends at max_new_tokens leaves its read-ahead stream running to the
    end of its window (the session cancels it only at its next action); a peer
    measured meanwhile would share the CPU with it."""
    if getattr(engine, "_server", None) is None:
        return 0.0
    t0 = now()
    while any(s.get("is_processing") for s in engine.get("/slots")):
        if now() - t0 > timeout:
            break
        time.sleep(0.005)
    return now() - t0


def multiturn_once(engine, turns: int, reply: int) -> dict:
    """One conversation of `turns` turns; after each of our sends, the same history
    re-sent to a fresh session (interleaved turn by turn). Our TTFT runs from the
    call to the first piece (planning included, as the peer's includes templating);
    `ours_stats_ttft_s` is what `last_stats.ttft_s` reports."""
    from engines import MultimodalInput
    from playground import Conversation

    conv = Conversation(engine)
    ours, ours_wall, peer, ctx, reused, left = [], [], [], [], [], []
    try:
        for i in range(turns):
            text = user_turn(i)
            messages = [{"role": m["role"], "content": m["content"]} for m in conv.to_messages()]
            messages.append({"role": "user", "content": text})
            wait_idle(engine)
            t0 = now()
            _, first = drain(conv.send([MultimodalInput.text(text)], greedy(), max_new_tokens=reply), t0)
            st = conv.last_stats
            ours.append(first if first is not None else st.ttft_s)
            ours_wall.append(st.ttft_s)
            reused.append(st.reused)
            ctx.append(st.reused + st.prefilled)
            left.append(wait_idle(engine))
            peer.append(resend(engine, messages)["ttft_s"])
    finally:
        conv.close()
    return {"ours_ttft_s": ours, "ours_stats_ttft_s": ours_wall, "resend_ttft_s": peer,
            "context_tokens": ctx, "reused_tokens": reused, "read_ahead_left_running_s": left}


def build_history(engine, target_tokens: int):
    """A Conversation whose last reply ends near `target_tokens` (as benchmarks/chat.py)."""
    from engines import MultimodalInput
    from playground import Conversation

    messages: list[dict] = []
    while True:
        messages += [{"role": "user", "content": FILLER}, {"role": "assistant", "content": FILLER}]
        n = len(engine.tokenize(engine.render(messages + [{"role": "user", "content": user_turn(0)}])))
        if n + 16 >= target_tokens - 60:
            break
    conv = Conversation.from_messages(engine, messages)
    drain(conv.send([MultimodalInput.text(user_turn(0))], greedy(), max_new_tokens=16))
    return conv, messages + [{"role": "user", "content": user_turn(0)}]


class Regen:
    """Regenerate at a long history, and the re-send peer, one pair per call."""

    def __init__(self, engine, target_tokens: int):
        self.engine = engine
        self.conv, self.messages = build_history(engine, target_tokens)
        self.history_tokens = self.conv.session.position

    def ours(self) -> dict:
        wait_idle(self.engine)
        t0 = now()
        _, first = drain(self.conv.regenerate(greedy(), max_new_tokens=2), t0)
        st = self.conv.last_stats
        return {"ttft_s": first if first is not None else st.ttft_s, "stats_ttft_s": st.ttft_s,
                "reused": st.reused, "prefilled": st.prefilled, "read_ahead_left_running_s": wait_idle(self.engine)}

    def peer(self) -> dict:
        wait_idle(self.engine)
        return resend(self.engine, self.messages)

    def close(self) -> None:
        self.conv.close()


# --------------------------------------------------------------------------- child processes


class Child:
    """A `python -m benchmarks.backends --child KIND` process answering JSON commands.

    kind "transformers": the transformers engine (torch stays out of the parent).
    kind "ui": the playground on llama.cpp, launched as `app.py` does; `url` is set.
    """

    def __init__(self, kind: str):
        env = dict(os.environ, PYTHONPATH=str(ROOT), GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1")
        self.kind = kind
        self.proc = subprocess.Popen([sys.executable, "-m", "benchmarks.backends", "--child", kind], cwd=ROOT,
                                     env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        self.info: dict | None = None
        self.paused = False

    def wait_ready(self, timeout: float = 600) -> dict:
        if self.info is None:
            self.info = self._read("READY", timeout)
        return self.info

    def _read(self, tag: str, timeout: float) -> dict:
        deadline = time.time() + timeout
        for line in self.proc.stdout:
            if line.startswith(tag + " "):
                return json.loads(line[len(tag) + 1:])
            if line.startswith("ERROR "):
                raise RuntimeError(f"{self.kind} child: {json.loads(line[6:])}")
            if time.time() > deadline:
                break
        raise RuntimeError(f"the {self.kind} child ended or timed out (exit {self.proc.poll()})")

    def call(self, cmd: str, **args):
        self.wait_ready()
        self.resume()
        self.proc.stdin.write(json.dumps({"cmd": cmd, "args": args}) + "\n")
        self.proc.stdin.flush()
        return self._read("RESULT", 3600)

    def pause(self) -> None:
        """SIGSTOP: an idle Gradio server polls its queue, which would slow the other sections."""
        if self.proc.poll() is None and not self.paused:
            self.proc.send_signal(signal.SIGSTOP)
            self.paused = True

    def resume(self) -> None:
        if self.paused:
            self.proc.send_signal(signal.SIGCONT)
            self.paused = False

    def close(self) -> None:
        self.resume()
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)
        except Exception:  # noqa: BLE001
            self.proc.kill()
            self.proc.wait()


def child_main(kind: str) -> None:
    """The child side of `Child`: load, print READY, answer commands until stdin closes."""
    from engines import load_engine

    state: dict = {}
    if kind == "transformers":
        engine = load_engine("smollm2", backend="transformers")
        import torch
        import transformers

        info = {"torch": torch.__version__, "transformers": transformers.__version__,
                "num_threads": getattr(engine, "num_threads", None)}
        try:
            from engines.hf_text import decode_threads
            info["decode_threads"] = decode_threads(engine)
        except Exception:  # noqa: BLE001
            pass
    elif kind == "ui":
        from playground.ui import build_ui, launch

        engine = load_engine("smollm2", backend="llama.cpp")  # app.py's default settings
        app = build_ui(engine)
        port = free_port()
        launch(app, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
        state["app"] = app
        info = {"url": f"http://127.0.0.1:{port}"}
    else:
        raise SystemExit(f"unknown child kind {kind!r}")
    info.update(backend=engine.backend, name=engine.name)
    print("READY " + json.dumps(info), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            msg = json.loads(line)
            cmd, args = msg["cmd"], msg.get("args", {})
            if cmd == "decode":
                out = session_decode(engine, args["ids"] or prompt_ids(engine), args["n"])
            elif cmd == "prompt_ids":
                out = prompt_ids(engine)
            elif cmd == "multiturn":
                out = multiturn_once(engine, args["turns"], args["reply"])
            elif cmd == "regen_build":
                if "regen" in state:
                    state.pop("regen").close()
                state["regen"] = Regen(engine, args["target"])
                out = {"history_tokens": state["regen"].history_tokens}
            elif cmd in ("regen_ours", "regen_peer"):
                out = getattr(state["regen"], cmd[6:])()
            elif cmd == "regen_close":
                if "regen" in state:
                    state.pop("regen").close()
                out = {}
            else:
                raise ValueError(f"unknown command {cmd!r}")
            print("RESULT " + json.dumps(out), flush=True)
        except Exception as e:  # noqa: BLE001 - reported to the parent
            traceback.print_exc()
            print("ERROR " + json.dumps(f"{type(e).__name__}: {e}"), flush=True)
    if "app" in state:
        state["app"].sessions.shutdown()
        state["app"].close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- (1) decode


def raw_stream(engine, slot: int, ids: list[int], n: int, same_request: bool = False) -> dict:
    """Raw xllamacpp: one streaming request on an erased slot, a callback per chunk.
    Greedy with the session's own settings; `same_request` adds what the session
    also asks for (top-k log-probabilities, per-token timings)."""
    engine.post(f"/slots/{slot}?action=erase", {})
    req = engine.stream_request(slot, list(ids), greedy(), 0, n)
    if not same_request:
        req.pop("logprobs", None)
        req.pop("timings_per_token", None)
    stamps, text = [], []

    def on_chunk(chunk: dict) -> bool:
        choice = (chunk.get("choices") or [{}])[0]
        if choice.get("finish_reason") is None and "choices" in chunk:
            stamps.append(now())
            text.append(choice.get("text") or "")
        return False

    t0 = now()
    engine._server.handle_completions(req, on_chunk)
    out = rates(t0, stamps)
    out["text"] = "".join(text)
    return out


def paired_ratio(runs: dict, a: str, b: str, key: str = "tok_s") -> float | None:
    """Median over repetitions of a[i][key] / b[i][key] (peers ran back to back)."""
    rs = [x[key] / y[key] for x, y in zip(runs[a], runs[b]) if x.get(key) and y.get(key)]
    return statistics.median(rs) if rs else None


def med(res: dict, case: str, key: str = "tok_s") -> float | None:
    try:
        return res[case][key]["median"]
    except (KeyError, TypeError):
        return None


def run_decode(engine, tf: Child | None, p: dict) -> dict:
    ids = prompt_ids(engine)
    n = p["tokens"]
    holder = engine.create_session()  # reserves a slot for the raw requests: no session uses it
    try:
        cases = {
            "llamacpp_decode_one": lambda: session_decode(engine, ids, n),
            "raw_xllamacpp_stream": lambda: raw_stream(engine, holder.slot, ids, n),
            "raw_xllamacpp_stream_session_request": lambda: raw_stream(engine, holder.slot, ids, n, True),
        }
        tf_ids = None
        if tf is not None:
            tf_ids = tf.call("prompt_ids")
            cases["transformers_decode_one"] = lambda: tf.call("decode", ids=ids, n=n)
        runs = interleaved(p["reps"], cases)
    finally:
        holder.close()
    texts = {c: [r.pop("text", None) for r in rs] for c, rs in runs.items()}
    res = summarise(runs)
    res["ratios"] = {
        "decode_one_vs_raw_tok_s": paired_ratio(runs, "llamacpp_decode_one", "raw_xllamacpp_stream"),
        "decode_one_vs_raw_same_request_tok_s": paired_ratio(runs, "llamacpp_decode_one",
                                                             "raw_xllamacpp_stream_session_request"),
        "raw_same_request_vs_raw_tok_s": paired_ratio(runs, "raw_xllamacpp_stream_session_request",
                                                      "raw_xllamacpp_stream"),
    }
    if tf is not None:
        res["ratios"]["llamacpp_vs_transformers_tok_s"] = paired_ratio(runs, "llamacpp_decode_one",
                                                                       "transformers_decode_one")
        res["transformers_prompt_ids_equal"] = tf_ids == ids
    res["same_text_session_vs_raw"] = texts["llamacpp_decode_one"][-1] == texts["raw_xllamacpp_stream"][-1]
    res["prompt_tokens"] = len(ids)
    res["new_tokens"] = n
    res["threads"] = os.cpu_count()
    return res


# --------------------------------------------------------------------------- (2) concurrent


def sessions_at_once(engine, ids: list[int], k: int, n: int) -> dict:
    """k sessions prefilled, then decoding `n` tokens each at once, one thread each."""
    from engines import MultimodalInput

    sampling = greedy()
    sessions = [engine.create_session() for _ in range(k)]
    try:
        for s in sessions:
            s.prefill([MultimodalInput.tokens(ids)])
        return _at_once(k, lambda i: _decode_n(sessions[i], sampling, n))
    finally:
        for s in sessions:
            s.close()


def _decode_n(session, sampling, n: int) -> int:
    got = 0
    for _ in range(n):
        if session.decode_one(sampling).is_terminal:
            break
        got += 1
    return got


def raw_at_once(engine, slots: list[int], ids: list[int], n: int) -> dict:
    """Raw xllamacpp: the prompt cached in each slot first (as a session's prefill does),
    then one stream per slot at once, one thread each."""
    base = engine.stream_request(slots[0], list(ids), greedy(), 0, n)
    for k in ("logprobs", "timings_per_token"):
        base.pop(k, None)
    for slot in slots:
        engine.post(f"/slots/{slot}?action=erase", {})
        engine._server.handle_completions({**base, "id_slot": slot, "stream": False, "n_predict": 1,
                                           "max_tokens": 1})

    def one(i: int) -> int:
        count = [0]

        def on_chunk(chunk: dict) -> bool:
            if "choices" in chunk and chunk["choices"][0].get("finish_reason") is None:
                count[0] += 1
            return False

        engine._server.handle_completions({**base, "id_slot": slots[i]}, on_chunk)
        return count[0]

    return _at_once(len(slots), one)


def _at_once(k: int, work) -> dict:
    barrier = threading.Barrier(k + 1)
    counts, ends, errors = [0] * k, [0.0] * k, []

    def target(i: int) -> None:
        barrier.wait()
        try:
            counts[i] = work(i)
        except BaseException as e:  # noqa: BLE001 - re-raised below
            errors.append(e)
        ends[i] = now()

    threads = [threading.Thread(target=target, args=(i,)) for i in range(k)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = now()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    wall = max(ends) - t0
    return {"aggregate_tok_s": sum(counts) / wall, "tokens": sum(counts), "wall_s": wall,
            "per_stream_tok_s": statistics.mean(c / (e - t0) for c, e in zip(counts, ends))}


def run_concurrent(engine, p: dict) -> dict:
    ids = prompt_ids(engine)
    n = p["conc_tokens"]
    holders = [engine.create_session() for _ in range(4)]  # 4 slots no session uses, for the raw streams
    slots = [h.slot for h in holders]
    try:
        runs = interleaved(p["reps"], {
            "ours_1_session": lambda: sessions_at_once(engine, ids, 1, n),
            "ours_4_sessions": lambda: sessions_at_once(engine, ids, 4, n),
            "raw_1_stream": lambda: raw_at_once(engine, slots[:1], ids, n),
            "raw_4_streams": lambda: raw_at_once(engine, slots, ids, n),
        })
    finally:
        for h in holders:
            h.close()
    res = summarise(runs)
    ours = [a["aggregate_tok_s"] / b["aggregate_tok_s"] for a, b in zip(runs["ours_4_sessions"], runs["ours_1_session"])]
    raw = [a["aggregate_tok_s"] / b["aggregate_tok_s"] for a, b in zip(runs["raw_4_streams"], runs["raw_1_stream"])]
    res["ratios"] = {
        "ours_4_over_1": statistics.median(ours),
        "raw_4_over_1": statistics.median(raw),
        "ours_ratio_vs_raw_ratio": statistics.median(o / r for o, r in zip(ours, raw)),
        "ours_4_vs_raw_4_aggregate": paired_ratio(runs, "ours_4_sessions", "raw_4_streams", "aggregate_tok_s"),
        "ours_1_vs_raw_1": paired_ratio(runs, "ours_1_session", "raw_1_stream", "aggregate_tok_s"),
    }
    res["ours_4_over_1_per_rep"] = [round(x, 4) for x in ours]
    res["raw_4_over_1_per_rep"] = [round(x, 4) for x in raw]
    res["new_tokens_per_stream"] = n
    return res


# --------------------------------------------------------------------------- (5) chat: turn 10 and regenerate


def run_chat(engine, tf: Child | None, p: dict) -> dict:
    from . import common

    out: dict = {}
    backends = {"llamacpp": None}
    if tf is not None:
        backends["transformers"] = tf
    for name, child in backends.items():
        # multi-turn: each repetition is a whole conversation; peers interleaved turn by turn
        one = (lambda: multiturn_once(engine, p["turns"], p["reply"])) if child is None else (
            lambda c=child: c.call("multiturn", turns=p["turns"], reply=p["reply"]))
        if common.WARMUP:
            (multiturn_once(engine, 2, 4) if child is None else child.call("multiturn", turns=2, reply=4))
        runs = [one() for _ in range(p["reps"])]
        per_turn = []
        for t in range(p["turns"]):
            ours = summary([r["ours_ttft_s"][t] for r in runs])
            peer = summary([r["resend_ttft_s"][t] for r in runs])
            per_turn.append({"turn": t + 1, "context_tokens": runs[0]["context_tokens"][t],
                             "reused_tokens": runs[0]["reused_tokens"][t], "ours_ttft_s": ours, "resend_ttft_s": peer,
                             "ratio": ours["median"] / peer["median"],
                             "ratio_paired": statistics.median(r["ours_ttft_s"][t] / r["resend_ttft_s"][t]
                                                               for r in runs)})
        mt = {"turns": p["turns"], "reply_tokens": p["reply"], "per_turn": per_turn,
              "last_turn_ratio": per_turn[-1]["ratio_paired"],
              "read_ahead_left_running_s": summary([x for r in runs for x in r["read_ahead_left_running_s"]])}

        # regenerate at a long history: one conversation, regenerated rep times, the peer between
        if child is None:
            rg = Regen(engine, p["regen_history"])
            history, ours_fn, peer_fn, close = rg.history_tokens, rg.ours, rg.peer, rg.close
        else:
            history = child.call("regen_build", target=p["regen_history"])["history_tokens"]
            ours_fn = lambda c=child: c.call("regen_ours")  # noqa: E731
            peer_fn = lambda c=child: c.call("regen_peer")  # noqa: E731
            close = lambda c=child: c.call("regen_close")  # noqa: E731
        try:
            rruns = interleaved(p["reps"], {"regenerate": ours_fn, "resend": peer_fn})
        finally:
            close()
        regen = summarise(rruns)
        regen["history_tokens"] = history
        regen["ratio"] = paired_ratio(rruns, "regenerate", "resend", "ttft_s")
        out[name] = {"multiturn": mt, "regen": regen}
    return out


# --------------------------------------------------------------------------- (6) stop latency


class _Run:
    def __init__(self):
        self.pieces = 0
        self.t_end: float | None = None
        self.finish: str | None = None
        self.done = threading.Event()


def run_stop(engine, p: dict) -> dict:
    """`streams` conversations stream long greedy replies, each restarting when it
    ends; another thread stops a random one mid-stream, waits a little, repeats."""
    from engines import MultimodalInput
    from playground import Conversation

    k = min(p["stop_streams"], engine.capacity.max_sessions)
    convs = [Conversation(engine) for _ in range(k)]
    current: list[_Run | None] = [None] * k
    quit_ = threading.Event()
    errors: list = []

    def worker(i: int) -> None:
        j = 0
        try:
            while not quit_.is_set():
                conv = convs[i]
                if conv.turns:
                    conv.reset()
                gen = conv.send([MultimodalInput.text(user_turn(i + j))], greedy(), max_new_tokens=1500)
                run = _Run()
                current[i] = run
                try:
                    for _ in gen:
                        run.pieces += 1
                finally:
                    run.t_end = now()
                    run.finish = conv.last_stats.finish_reason if conv.last_stats else None
                    run.done.set()
                j += 1
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(k)]
    for t in threads:
        t.start()
    rng = random.Random(0)
    samples, skipped = [], 0
    try:
        deadline = time.time() + 300
        while len(samples) < p["stop_samples"]:
            if errors:
                raise errors[0]
            if time.time() > deadline:
                raise TimeoutError("the stop benchmark did not collect its samples in 300 s")
            live = [i for i in range(k) if current[i] is not None and not current[i].done.is_set()
                    and current[i].pieces >= 3]
            if len(live) < max(1, k - 2):  # most streams mid-reply; the others are restarting
                time.sleep(0.01)
                continue
            i = rng.choice(live)
            run = current[i]
            streaming = sum(1 for r in current if r is not None and not r.done.is_set())
            t0 = now()
            convs[i].stop()
            if not run.done.wait(30):
                raise TimeoutError("a stopped stream did not end in 30 s")
            if run.finish != "stopped":  # it ended by itself just then
                skipped += 1
                continue
            samples.append({"latency_s": run.t_end - t0, "streaming": streaming})
            time.sleep(rng.uniform(0.05, 0.25))
    finally:
        quit_.set()
        for c in convs:
            c.stop()
        for t in threads:
            t.join(60)
        for c in convs:
            c.close()
    lat = sorted(s["latency_s"] for s in samples)
    return {"streams": k, "samples": len(lat), "skipped_ended_by_themselves": skipped,
            "p50_s": percentile(lat, 50), "p95_s": percentile(lat, 95), "max_s": lat[-1],
            "latency_s": summary(lat), "streaming_at_stop": summary([s["streaming"] for s in samples])}


def percentile(sorted_vals: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if len(sorted_vals) == 1:
        return sorted_vals[0]
    x = (len(sorted_vals) - 1) * q / 100
    lo = int(x)
    hi = min(lo + 1, len(sorted_vals) - 1)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (x - lo)


# --------------------------------------------------------------------------- (3) UI stream


def _reply_text(chat) -> str | None:
    if not isinstance(chat, list):
        return None
    for msg in reversed(chat):
        if isinstance(msg, dict) and msg.get("role") == "assistant":
            c = msg.get("content")
            if isinstance(c, str):
                return c
            return "".join(p.get("text", "") for p in c if isinstance(p, dict))
    return ""


def _stats_tokens(context_html) -> tuple[int | None, float | None]:
    import re

    if not isinstance(context_html, str):
        return None, None
    n = re.search(r"(\d+) new tokens", context_html)
    r = re.search(r"([\d.]+) tok/s", context_html)
    return (int(n.group(1)) if n else None), (float(r.group(1)) if r else None)


def ui_client_once(client, engine, n: int) -> dict:
    """Reset the tab, stream /send, time each change of the reply text at the client.
    client tok/s counts the tokens that arrived after the first update over the span
    to the last one (the first update's tokens counted with the engine's tokenizer)."""
    from engines import MultimodalInput

    client.predict(system_prompt="", raw=False, stored={"messages": []}, api_name="/reset")
    t0 = now()
    job = client.submit({"text": PROMPT, "files": []}, **GREEDY_UI, max_new=n, stored={"messages": []},
                        api_name="/send")
    stamps, texts, last, stats = [], [], "", (None, None)
    for out in job:
        text = _reply_text(out[0])
        if text is not None and text != last:
            stamps.append(now())
            texts.append(text)
            last = text
        s = _stats_tokens(out[3])
        if s[0] is not None:
            stats = s
    final = job.outputs()[-1] if job.outputs() else None
    if final is not None:
        s = _stats_tokens(final[3])
        if s[0] is not None:
            stats = s
    tokens = stats[0] or 0
    first_tokens = len(engine.tokenize([MultimodalInput.text(texts[0])])) if texts and texts[0] else 1
    span = stamps[-1] - stamps[0] if len(stamps) > 1 else None
    return {"ttft_s": stamps[0] - t0 if stamps else None,
            "client_tok_s": (tokens - first_tokens) / span if span else 0.0,
            "client_end_to_end_tok_s": tokens / (stamps[-1] - t0) if stamps else 0.0,
            "server_stats_tok_s": stats[1], "tokens": tokens, "updates": len(stamps),
            "tokens_in_first_update": first_tokens}


def _end_to_end(r: dict) -> dict:
    r.pop("text", None)
    r["end_to_end_tok_s"] = r["tokens"] / (r["ttft_s"] + (r["tokens"] - 1) / r["tok_s"]) if r["tok_s"] else 0.0
    return r


def run_ui(engine, ui: Child, p: dict) -> dict:
    from gradio_client import Client

    n = p["ui_tokens"]
    ui.wait_ready()
    ui.resume()
    client = Client(ui.info["url"], verbose=False)
    ids = prompt_ids(engine)

    def client_case():
        ui.resume()
        try:
            r = ui_client_once(client, engine, n)
            # /reset cancels the reply's read-ahead stream, still running to its window's end
            client.predict(system_prompt="", raw=False, stored={"messages": []}, api_name="/reset")
            return r
        finally:
            ui.pause()

    def engine_in_server():
        try:
            r = ui.call("decode", ids=ids, n=n)
        finally:
            ui.pause()
        return _end_to_end(r)

    def engine_here():  # the same GGUF and threads in this quiet process, the server paused
        return _end_to_end(session_decode(engine, ids, n))

    def conversation_here():  # what the UI runs per action, without Gradio
        from engines import MultimodalInput
        from playground import Conversation

        conv = Conversation(engine)
        try:
            drain(conv.send([MultimodalInput.text(PROMPT)], greedy(), max_new_tokens=n))
            st = conv.last_stats
            return {"tok_s": st.decode_tok_s, "tokens": st.new_tokens, "ttft_s": st.ttft_s}
        finally:
            conv.close()  # cancels the reply's read-ahead

    ui.pause()
    cases = {"gradio_client": client_case, "engine_decode_one": engine_here,
             "engine_decode_one_in_server_process": engine_in_server,
             "conversation_send_no_ui": conversation_here}
    runs = interleaved(p["reps"], cases)
    try:
        client.close()
    except Exception:  # noqa: BLE001
        pass
    res = summarise(runs)

    def pairs(a: str, b: str, ka: str, kb: str) -> float | None:
        """Median over repetitions of runs[a][i][ka] / runs[b][i][kb]."""
        rs = [x[ka] / y[kb] for x, y in zip(runs[a], runs[b]) if x.get(ka) and y.get(kb)]
        return statistics.median(rs) if rs else None

    res["ratios"] = {
        "client_vs_engine_tok_s": pairs("gradio_client", "engine_decode_one", "client_tok_s", "tok_s"),
        "client_end_to_end_vs_engine_end_to_end": pairs("gradio_client", "engine_decode_one",
                                                        "client_end_to_end_tok_s", "end_to_end_tok_s"),
        "server_stats_vs_engine_tok_s": pairs("gradio_client", "engine_decode_one", "server_stats_tok_s", "tok_s"),
        "client_vs_engine_in_server_process_tok_s": pairs("gradio_client", "engine_decode_one_in_server_process",
                                                          "client_tok_s", "tok_s"),
        "engine_in_server_process_vs_here_tok_s": pairs("engine_decode_one_in_server_process", "engine_decode_one",
                                                        "tok_s", "tok_s"),
        "conversation_vs_engine_tok_s": pairs("conversation_send_no_ui", "engine_decode_one", "tok_s", "tok_s"),
        "server_stats_vs_conversation_tok_s": pairs("gradio_client", "conversation_send_no_ui", "server_stats_tok_s",
                                                    "tok_s"),
    }
    res["new_tokens"] = n
    res["server_backend"] = ui.info.get("backend")
    ui.resume()
    res["send_parameters"] = send_parameters(ui.info["url"])  # for the start-up section's REST calls
    return res


# --------------------------------------------------------------------------- (4) start-up


def import_gradio_once() -> dict:
    t0 = now()
    p = subprocess.run([sys.executable, "-c", "import gradio"], cwd=ROOT, env=_child_env(), capture_output=True,
                       text=True, timeout=300)
    if p.returncode:
        raise RuntimeError(f"import gradio failed: {p.stderr[-1000:]}")
    return {"wall_s": now() - t0}


def _child_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PLAYGROUND_")}
    env.update(HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False", PYTHONPATH=str(ROOT))
    return env


def send_parameters(url: str) -> list[dict]:
    """/send's API parameters, in order (name, default), from a running playground."""
    with urlopen_json(url + "/gradio_api/info") as info:
        return [{"name": q["parameter_name"], "default": q.get("parameter_default")}
                for q in info["named_endpoints"]["/send"]["parameters"]]


class urlopen_json:
    def __init__(self, url: str):
        import urllib.request

        with urllib.request.urlopen(url, timeout=60) as r:
            self.data = json.loads(r.read())

    def __enter__(self):
        return self.data

    def __exit__(self, *a):
        return False


def _spawn_app(port: int, log):
    return subprocess.Popen([sys.executable, "app.py", "--host", "127.0.0.1", "--port", str(port)], cwd=ROOT,
                            env=_child_env(), stdout=log, stderr=subprocess.STDOUT)


def _wait_listening(proc, port: int, log, deadline: float) -> float:
    while True:
        if proc.poll() is not None or time.time() > deadline:
            log.seek(0)
            raise RuntimeError(f"app.py exited or never listened ({proc.poll()}): {log.read()[-2000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return now()
        except OSError:
            time.sleep(0.01)


def _end(proc) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def probe_app_parameters() -> list[dict]:
    """Start app.py once (untimed) to read /send's parameters."""
    port = free_port()
    with tempfile.TemporaryFile(mode="w+") as log:
        proc = _spawn_app(port, log)
        try:
            _wait_listening(proc, port, log, time.time() + 300)
            deadline = time.time() + 120
            while True:
                try:
                    return send_parameters(f"http://127.0.0.1:{port}")
                except Exception:  # noqa: BLE001 - not serving yet
                    if time.time() > deadline:
                        raise
                    time.sleep(0.05)
        finally:
            _end(proc)


def app_start_once(parameters: list[dict]) -> dict:
    """Spawn `python app.py` (defaults), poll its port, POST /send through Gradio's REST
    API (/gradio_api/call/send, positional data as a browser-less client sends it) and
    read the event stream until the reply has text."""
    values = {"box": {"text": PROMPT, "files": []}, **GREEDY_UI, "max_new": 4, "stored": {"messages": []}}
    body = {"data": [values.get(q["name"], q["default"]) for q in parameters]}
    port = free_port()
    log = tempfile.TemporaryFile(mode="w+")
    t0 = now()
    proc = _spawn_app(port, log)
    try:
        deadline = time.time() + 300
        up = _wait_listening(proc, port, log, deadline)
        event_id = None
        while event_id is None:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            try:
                conn.request("POST", "/gradio_api/call/send", json.dumps(body), {"Content-Type": "application/json"})
                resp = conn.getresponse()
                data = resp.read()
                if resp.status == 200:
                    event_id = json.loads(data)["event_id"]
                elif time.time() > deadline:
                    raise RuntimeError(f"/call/send answered {resp.status}: {data[:300]!r}")
                else:
                    time.sleep(0.01)
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.01)
            finally:
                conn.close()
        posted = now()
        first = None
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        try:
            conn.request("GET", f"/gradio_api/call/send/{event_id}")
            resp = conn.getresponse()
            event = None
            for raw in resp:
                line = raw.decode().rstrip("\n")
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: ") and event in ("generating", "complete"):
                    data = json.loads(line[6:])
                    if isinstance(data, list) and data and _reply_text(data[0]):
                        first = now()
                        break
                    if event == "complete":
                        break
                elif line.startswith("data: ") and event == "error":
                    raise RuntimeError(f"/send failed: {line[6:300]}")
        finally:
            conn.close()
        if first is None:
            raise RuntimeError("app.py streamed no reply text")
        log.seek(0)
        text = log.read()
        backend = "llama.cpp" if " on llama.cpp " in text else ("transformers" if " on transformers " in text else "?")
        return {"first_token_s": first - t0, "listening_s": up - t0, "queued_s": posted - t0,
                "backend_llamacpp": float(backend == "llama.cpp")}
    finally:
        _end(proc)
        log.close()


def run_startup(p: dict, parameters: list[dict] | None = None) -> dict:
    reps = p["start_reps"]
    parameters = parameters or probe_app_parameters()
    runs = interleaved(reps, {"import_gradio": import_gradio_once,
                              "app_py_first_token": lambda: app_start_once(parameters)})
    res = summarise(runs)
    extra = [a["first_token_s"] - b["wall_s"] for a, b in zip(runs["app_py_first_token"], runs["import_gradio"])]
    res["extra_over_import_gradio_s"] = summary(extra)
    res["extra_paired_median_s"] = statistics.median(extra)
    return res


# --------------------------------------------------------------------------- load sampling, machine, table


class LoadSampler:
    """The 1-minute load average every few seconds, tagged with the running section."""

    def __init__(self, every: float = 5.0):
        self.section = "setup"
        self.samples: list[tuple[float, str, float]] = []
        self._quit = threading.Event()
        self._every = every
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self):
        while not self._quit.is_set():
            self.samples.append((time.time(), self.section, os.getloadavg()[0]))
            self._quit.wait(self._every)

    def stop(self) -> None:
        self._quit.set()

    def report(self) -> dict:
        out: dict = {}
        for sec in dict.fromkeys(s for _, s, _ in self.samples):
            vals = [v for _, s, v in self.samples if s == sec]
            out[sec] = {"min": min(vals), "median": statistics.median(vals), "max": max(vals), "n": len(vals)}
        vals = [v for _, _, v in self.samples]
        if vals:
            out["all"] = {"min": min(vals), "median": statistics.median(vals), "max": max(vals), "n": len(vals)}
        return out


def machine() -> dict:
    import psutil

    from .common import _cpu_model

    info = {"python": sys.version.split()[0], "platform": platform.platform(), "cpu": _cpu_model(),
            "logical_cpus": os.cpu_count(),
            "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "load_avg_at_start": [round(x, 2) for x in os.getloadavg()]}
    for name in ("xllamacpp", "gradio", "gradio_client"):
        try:
            info[name] = getattr(__import__(name), "__version__", "?")
        except Exception:  # noqa: BLE001
            info[name] = None
    return info


def _f(x, fmt="{:.3f}") -> str:
    return "–" if x is None else fmt.format(x)


def _ok(value, target, smaller_is_better=False) -> str:
    if value is None:
        return "–"
    met = value <= target if smaller_is_better else value >= target
    return "met" if met else "NOT met"


def table(r: dict) -> str:
    """Markdown: each target with its figure, its peer in the same run, and the verdict."""
    rows = []
    d = r.get("decode") or {}
    if "ratios" in d:
        rt = d["ratios"]
        rows.append(("decode_one llama.cpp / raw xllamacpp stream, tok/s",
                     f"{_f(med(d, 'llamacpp_decode_one'), '{:.1f}')} vs {_f(med(d, 'raw_xllamacpp_stream'), '{:.1f}')}",
                     f"×{_f(rt['decode_one_vs_raw_tok_s'])}", "≥ ×0.9",
                     _ok(rt["decode_one_vs_raw_tok_s"], TARGETS["decode_vs_raw"])))
        rows.append(("  (diagnostic) raw with the session's request (top-5 logprobs) / raw",
                     f"{_f(med(d, 'raw_xllamacpp_stream_session_request'), '{:.1f}')} vs "
                     f"{_f(med(d, 'raw_xllamacpp_stream'), '{:.1f}')}",
                     f"×{_f(rt['raw_same_request_vs_raw_tok_s'])}", "", ""))
        if "llamacpp_vs_transformers_tok_s" in rt:
            rows.append(("decode_one llama.cpp / transformers decode_one, tok/s",
                         f"{_f(med(d, 'llamacpp_decode_one'), '{:.1f}')} vs "
                         f"{_f(med(d, 'transformers_decode_one'), '{:.1f}')}",
                         f"×{_f(rt['llamacpp_vs_transformers_tok_s'], '{:.2f}')}", "≥ ×4",
                         _ok(rt["llamacpp_vs_transformers_tok_s"], TARGETS["decode_vs_transformers"])))
    c = r.get("concurrent") or {}
    if "ratios" in c:
        rt = c["ratios"]
        rows.append(("4 sessions / 1, aggregate tok/s: ours vs raw xllamacpp's 4/1",
                     f"×{_f(rt['ours_4_over_1'], '{:.2f}')} ({_f(med(c, 'ours_4_sessions', 'aggregate_tok_s'), '{:.1f}')}"
                     f"/{_f(med(c, 'ours_1_session', 'aggregate_tok_s'), '{:.1f}')}) vs ×{_f(rt['raw_4_over_1'], '{:.2f}')}"
                     f" ({_f(med(c, 'raw_4_streams', 'aggregate_tok_s'), '{:.1f}')}"
                     f"/{_f(med(c, 'raw_1_stream', 'aggregate_tok_s'), '{:.1f}')})",
                     f"×{_f(rt['ours_ratio_vs_raw_ratio'])}", "≥ ×0.9",
                     _ok(rt["ours_ratio_vs_raw_ratio"], TARGETS["concurrent_vs_raw_ratio"])))
    u = r.get("ui") or {}
    if "ratios" in u:
        rt = u["ratios"]
        rows.append(("gradio_client tok/s / the engine's decode_one (same GGUF, threads, prompt)",
                     f"{_f(med(u, 'gradio_client', 'client_tok_s'), '{:.1f}')} vs "
                     f"{_f(med(u, 'engine_decode_one'), '{:.1f}')}",
                     f"×{_f(rt['client_vs_engine_tok_s'])}", "≥ ×0.9",
                     _ok(rt["client_vs_engine_tok_s"], TARGETS["ui_client_vs_engine"])))
        rows.append(("  end to end (request to last token, TTFT included)",
                     f"{_f(med(u, 'gradio_client', 'client_end_to_end_tok_s'), '{:.1f}')} vs "
                     f"{_f(med(u, 'engine_decode_one', 'end_to_end_tok_s'), '{:.1f}')}",
                     f"×{_f(rt['client_end_to_end_vs_engine_end_to_end'])}", "", ""))
        rows.append(("  (diagnostic) the UI's own stats line / the engine's decode_one",
                     f"{_f(med(u, 'gradio_client', 'server_stats_tok_s'), '{:.1f}')} vs "
                     f"{_f(med(u, 'engine_decode_one'), '{:.1f}')}",
                     f"×{_f(rt['server_stats_vs_engine_tok_s'])}", "", ""))
        if rt.get("conversation_vs_engine_tok_s"):
            rows.append(("  (diagnostic) Conversation.send without Gradio / the engine's decode_one",
                         f"{_f(med(u, 'conversation_send_no_ui'), '{:.1f}')} vs "
                         f"{_f(med(u, 'engine_decode_one'), '{:.1f}')}",
                         f"×{_f(rt['conversation_vs_engine_tok_s'])}", "", ""))
        rows.append(("  (diagnostic) decode_one inside the idle UI server process / here",
                     f"{_f(med(u, 'engine_decode_one_in_server_process'), '{:.1f}')} vs "
                     f"{_f(med(u, 'engine_decode_one'), '{:.1f}')}",
                     f"×{_f(rt['engine_in_server_process_vs_here_tok_s'])}", "", ""))
    s = r.get("startup") or {}
    if "extra_paired_median_s" in s:
        rows.append(("warm `python app.py` to first streamed token − `import gradio`, s",
                     f"{_f(med(s, 'app_py_first_token', 'first_token_s'), '{:.2f}')} vs "
                     f"{_f(med(s, 'import_gradio', 'wall_s'), '{:.2f}')}",
                     f"+{_f(s['extra_paired_median_s'], '{:.2f}')} s", "≤ +1.5 s",
                     _ok(s["extra_paired_median_s"], TARGETS["startup_extra_s"], True)))
    ch = r.get("chat") or {}
    for be, v in ch.items():
        if not isinstance(v, dict) or "multiturn" not in v:
            continue
        last = v["multiturn"]["per_turn"][-1]
        rows.append((f"turn-{last['turn']} TTFT, kept cache / re-send ({be}, {last['context_tokens']} tokens)",
                     f"{_f(last['ours_ttft_s']['median'])} s vs {_f(last['resend_ttft_s']['median'])} s",
                     f"×{_f(last['ratio_paired'])}", "≤ ×0.1",
                     _ok(last["ratio_paired"], TARGETS["turn10_ratio"], True)))
        g = v["regen"]
        rows.append((f"regenerate TTFT / re-send ({be}, {g['history_tokens']} tokens)",
                     f"{_f(med(g, 'regenerate', 'ttft_s'))} s vs {_f(med(g, 'resend', 'ttft_s'))} s",
                     f"×{_f(g['ratio'])}", "≤ ×0.05", _ok(g["ratio"], TARGETS["regen_ratio"], True)))
    st = r.get("stop") or {}
    if "p95_s" in st:
        rows.append((f"Stop to end of stream, {st['streams']} streaming, p50 / p95 (n={st['samples']})",
                     f"{_f(st['p50_s'])} / {_f(st['p95_s'])} s", f"max {_f(st['max_s'])} s", "p95 ≤ 0.3 s",
                     _ok(st["p95_s"], TARGETS["stop_p95_s"], True)))
    for name in SECTIONS:
        if isinstance(r.get(name), dict) and "error" in r[name]:
            rows.append((f"{name}: FAILED", r[name]["error"][:80], "", "", ""))
    m = r.get("machine", {})
    lines = [f"Machine: {m.get('cpu')} · {m.get('usable_cpus')} usable CPUs · load at start "
             f"{m.get('load_avg_at_start')} · during the run (1-min) {_load_line(r.get('load', {}))}",
             f"xllamacpp {m.get('xllamacpp')} · gradio {m.get('gradio')} · "
             f"{'quick' if r.get('quick') else 'full'} run, {r.get('params', {}).get('reps')} reps",
             "", "| target | figure vs peer (medians, same run) | paired ratio | target | verdict |",
             "|---|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {t} | {v} |" for a, b, c, t, v in rows]
    return "\n".join(lines)


def _load_line(load: dict) -> str:
    a = load.get("all")
    return "–" if not a else f"median {a['median']:.2f} (min {a['min']:.2f}, max {a['max']:.2f})"


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 repetition, few tokens, no warm-up (CI smoke mode)")
    ap.add_argument("--out", default="benchmarks/out/backends.json")
    ap.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections: " + ",".join(SECTIONS))
    ap.add_argument("--reps", type=int, default=None, help="override the repetitions")
    ap.add_argument("--tokens", type=int, default=None, help="override the tokens per stream (decode, concurrent, ui)")
    ap.add_argument("--no-transformers", action="store_true", help="skip the transformers peers")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child_main(args.child)
        return 0
    sections = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = [s for s in sections if s not in SECTIONS]
    if bad:
        ap.error(f"unknown sections {bad}; choose from {', '.join(SECTIONS)}")
    p = params(args.quick)
    if args.reps:
        p["reps"] = p["start_reps"] = args.reps
    if args.tokens:
        p["tokens"] = p["conc_tokens"] = p["ui_tokens"] = args.tokens

    from . import common

    common.WARMUP = not args.quick
    # SIGTERM runs the `finally` below: a paused (SIGSTOPped) child would otherwise outlive us.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    load = LoadSampler()
    t0 = time.time()
    results: dict = {"machine": machine(), "quick": args.quick, "params": p,
                     "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t0))}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    # Children load while this process loads its engine (in --quick, they also overlap the first sections).
    ui = Child("ui") if "ui" in sections else None
    tf = Child("transformers") if not args.no_transformers and {"decode", "chat"} & set(sections) else None
    failed = []
    try:
        from engines import load_engine

        engine = load_engine("smollm2", backend="llama.cpp", max_sessions=8)
        results["engine"] = {"name": engine.name, "backend": engine.backend, "gguf": str(engine.gguf_path),
                             "max_sessions": engine.capacity.max_sessions,
                             "context_per_session": engine.capacity.max_context_len, "threads": os.cpu_count()}
        if not args.quick:  # quiet children before measuring: wait for them, then pause the UI server
            for ch in (ui, tf):
                if ch is not None:
                    ch.wait_ready()
            if ui is not None:
                ui.pause()
        for name in sections:
            load.section = name
            ts = time.time()
            print(f"[backends] {name} ...", file=sys.stderr, flush=True)
            try:
                if name == "decode":
                    results[name] = run_decode(engine, tf, p)
                elif name == "concurrent":
                    results[name] = run_concurrent(engine, p)
                elif name == "chat":
                    results[name] = run_chat(engine, tf, p)
                elif name == "stop":
                    results[name] = run_stop(engine, p)
                elif name == "ui":
                    results[name] = run_ui(engine, ui, p)
                    ui.close()
                    ui = None
                elif name == "startup":
                    results[name] = run_startup(p, (results.get("ui") or {}).get("send_parameters"))
            except Exception as e:  # noqa: BLE001 - one broken section must not hide the others
                traceback.print_exc()
                results[name] = {"error": f"{type(e).__name__}: {e}"}
                failed.append(name)
            results.setdefault("section_seconds", {})[name] = round(time.time() - ts, 1)
            if tf is not None and tf.info:
                results["transformers_child"] = tf.info
            results["total_seconds"] = round(time.time() - t0, 1)
            results["load"] = load.report()
            results["machine"]["load_avg_at_end"] = [round(x, 2) for x in os.getloadavg()]
            results["torch_imported_in_this_process"] = "torch" in sys.modules
            out.write_text(json.dumps(results, indent=1))  # after every section: a cut-short run keeps its results
    finally:
        load.stop()
        for ch in (ui, tf):
            if ch is not None:
                ch.close()
    results["load"] = load.report()
    out.write_text(json.dumps(results, indent=1))
    print(table(results))
    print(f"\nJSON: {out}  ({results['total_seconds']} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
