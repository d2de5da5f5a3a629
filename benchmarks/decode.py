"""(a) Decode speed and time to first token, three ways on the same weights,
dtype and thread count:

1. the contract: `Session.prefill` then a `decode_one` loop;
2. the usual demo: `model.generate()` in a thread feeding a `TextIteratorStreamer`;
3. a raw loop with no contract: one `model(...)` per token on the session's
   cache (`engines.kv.new_cache`), so 1 against 3 is the contract's cost alone.

1 and 3 run in the calling thread; variants run them in a fresh worker thread,
as Gradio runs sync handlers.
"""

from __future__ import annotations

import threading

import torch
from transformers import TextIteratorStreamer

from engines import MultimodalInput, SamplingConfig, kv

from .common import interleaved, now, summarise

PROMPT = "Write a long, detailed story about a robot who learns to paint, with many characters."
SAMPLED = SamplingConfig(temperature=0.7, top_p=0.95, seed=1)  # the UI's default settings


def prompt_ids(engine, text: str = PROMPT) -> list[int]:
    return engine.tokenize(engine.render([{"role": "user", "content": text}]))


def _rates(t0: float, stamps: list[float]) -> dict:
    """TTFT from t0 to the first token; tok/s over the gaps between tokens."""
    n = len(stamps)
    tok_s = (n - 1) / (stamps[-1] - stamps[0]) if n > 1 else 0.0
    return {"ttft_s": stamps[0] - t0, "tok_s": tok_s, "tokens": n}


def session_loop(engine, ids: list[int], n: int, sampling: SamplingConfig = SamplingConfig()) -> dict:
    s = engine.create_session()
    try:
        t0 = now()
        s.prefill([MultimodalInput.tokens(ids)])
        stamps = []
        for _ in range(n):
            r = s.decode_one(sampling)
            if r.is_terminal:
                break
            stamps.append(now())
        return _rates(t0, stamps)
    finally:
        s.close()


def raw_loop(engine, ids: list[int], n: int, decode_threads: int | None = None) -> dict:
    """One forward per token, greedy, no contract: the floor the session is held to.
    Threads as the engine uses them (prefill `num_threads`, decode `decode_threads`),
    unless `decode_threads` is given."""
    from engines.hf_text import decode_threads as engine_decode_threads

    model = engine.model
    step_threads = decode_threads or engine_decode_threads(engine)
    with torch.inference_mode():
        cache = kv.new_cache(model.config)
        torch.set_num_threads(engine.num_threads)
        t0 = now()
        out = model(input_ids=torch.tensor([ids]), past_key_values=cache, use_cache=True, logits_to_keep=1)
        t = int(out.logits[0, -1].argmax())
        stamps = [now()]
        torch.set_num_threads(step_threads)
        for _ in range(n - 1):
            out = model(input_ids=torch.tensor([[t]]), past_key_values=cache, use_cache=True, logits_to_keep=1)
            t = int(out.logits[0, -1].argmax())
            stamps.append(now())
    return _rates(t0, stamps)


class _StampedStreamer(TextIteratorStreamer):
    """Records when each generated token reaches the streamer (generate's thread)."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.stamps: list[float] = []
        self._prompt_seen = False

    def put(self, value):
        if self._prompt_seen:
            self.stamps.extend([now()] * value.numel())
        self._prompt_seen = True
        super().put(value)


def generate_streamer(engine, ids: list[int], n: int, model=None) -> dict:
    """The usual demo path: generate() in a thread, text pieces from a streamer.
    TTFT is to the first text piece the consumer sees (the streamer holds
    text back until a word is complete); tok/s is from generate's own token times."""
    model = model or engine.model
    streamer = _StampedStreamer(engine.tokenizer, skip_prompt=True, skip_special_tokens=True)
    input_ids = torch.tensor([ids])
    kwargs = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=n,
                  do_sample=False, temperature=None, top_p=None, top_k=None, streamer=streamer,
                  pad_token_id=engine.tokenizer.eos_token_id)
    threads = engine.num_threads  # what a fresh process gets by default

    def target():
        torch.set_num_threads(threads)  # do not inherit the engine's last setting
        model.generate(**kwargs)

    t0 = now()
    th = threading.Thread(target=target)
    th.start()
    first = None
    for piece in streamer:
        if piece and first is None:
            first = now()
    th.join()
    r = _rates(t0, streamer.stamps)
    r["ttft_s"] = (first or now()) - t0
    return r


def in_worker(fn, *args) -> dict:
    """Run `fn` in a fresh thread, as Gradio runs a sync handler."""
    box: dict = {}

    def target():
        try:
            box["r"] = fn(*args)
        except BaseException as e:  # noqa: BLE001 - re-raised below
            box["e"] = e

    th = threading.Thread(target=target)
    th.start()
    th.join()
    if "e" in box:
        raise box["e"]
    return box["r"]


def run(engine, reps: int, n_tokens: int) -> dict:
    ids = prompt_ids(engine)
    cases = {
        "session_decode_one": lambda: session_loop(engine, ids, n_tokens),
        "raw_forward_loop": lambda: raw_loop(engine, ids, n_tokens),
        "generate_streamer": lambda: generate_streamer(engine, ids, n_tokens),
        "session_decode_one_worker": lambda: in_worker(session_loop, engine, ids, n_tokens),
        "raw_forward_loop_worker": lambda: in_worker(raw_loop, engine, ids, n_tokens),
        f"raw_forward_loop_{engine.num_threads}_threads_decode": lambda: raw_loop(engine, ids, n_tokens,
                                                                                  engine.num_threads),
        f"raw_forward_loop_{engine.num_threads}_threads_decode_worker": lambda: in_worker(
            raw_loop, engine, ids, n_tokens, engine.num_threads),
        "session_sampled_t0.7_p0.95": lambda: session_loop(engine, ids, n_tokens, SAMPLED),
    }
    res = summarise(interleaved(reps, cases))
    med = lambda c, k="tok_s": res[c][k]["median"]  # noqa: E731
    res["ratios"] = {
        "session_vs_raw_tok_s": med("session_decode_one") / med("raw_forward_loop"),
        "session_vs_generate_streamer_tok_s": med("session_decode_one") / med("generate_streamer"),
        "worker_vs_main_session_tok_s": med("session_decode_one_worker") / med("session_decode_one"),
        "session_vs_raw_worker_tok_s": med("session_decode_one_worker") / med("raw_forward_loop_worker"),
        "decode_1_thread_vs_all_threads_tok_s": med("raw_forward_loop")
        / med(f"raw_forward_loop_{engine.num_threads}_threads_decode"),
        "decode_1_thread_vs_all_threads_worker_tok_s": med("raw_forward_loop_worker")
        / med(f"raw_forward_loop_{engine.num_threads}_threads_decode_worker"),
    }
    from engines.hf_text import decode_threads

    res["prompt_tokens"] = len(ids)
    res["threads"] = {"prefill": engine.num_threads, "decode": decode_threads(engine)}
    res["new_tokens"] = n_tokens
    return res
