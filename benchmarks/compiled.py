"""(h) `compile=True` against the default engine, same weights, dtype and threads:
decode tok/s and TTFT, and a regenerate (seek) at a long history.

Opt-in (`--only compiled`): it loads two more engines and compiles their decode
steps, about a minute each on a 2-core CPU. Both engines run in worker
threads, as Gradio runs them. The compiled engine's caches span its whole
context (`max_context`), and a step attends over every slot, masked or not.
"""

from __future__ import annotations

from engines import MultimodalInput, SamplingConfig, load_engine

from .common import interleaved, now, summarise
from .decode import in_worker, prompt_ids, session_loop


def regen_ttft(engine, ids: list[int]) -> dict:
    """Prefill `ids`, decode one token, then time seek back plus the first new token."""
    with engine.create_session() as s:
        s.prefill([MultimodalInput.tokens(ids)])
        s.decode_one(SamplingConfig())
        t0 = now()
        s.seek(len(ids))
        s.decode_one(SamplingConfig())
        return {"ttft_s": now() - t0}


def run(engine, reps: int, n_tokens: int, history: int = 1024, caps=None) -> dict:
    """A compiled engine per cache size in `caps` (None: the model's whole context,
    as `--compile` gives it). By default that and twice the history."""
    engines, compile_s = {"eager": engine}, {}
    for cap in caps or (None, 2 * history):
        name = "compiled" if cap is None else f"compiled_ctx{cap}"
        comp = load_engine("smollm2", device=engine.device.type, dtype=engine.dtype, max_context=cap, compile=True)
        comp.num_threads = engine.num_threads
        engines[name], compile_s[name] = comp, comp.compiled.compile_s
    ids = prompt_ids(engine)
    text = " ".join(f"Item {i} is on the list." for i in range(history))
    long_ids = engine.tokenize([MultimodalInput.text(text)])[:history]
    cases = {}
    for name, e in engines.items():
        cases[f"{name}_decode_one"] = lambda e=e: in_worker(session_loop, e, ids, n_tokens)
        cases[f"{name}_regenerate_at_{history}"] = lambda e=e: in_worker(regen_ttft, e, long_ids)
    res = summarise(interleaved(reps, cases))
    med = lambda c, k: res[c][k]["median"]  # noqa: E731
    res["ratios"] = {}
    for name in list(engines)[1:]:
        res["ratios"].update({
            f"{name}_vs_eager_tok_s": med(f"{name}_decode_one", "tok_s") / med("eager_decode_one", "tok_s"),
            f"{name}_vs_eager_ttft": med(f"{name}_decode_one", "ttft_s") / med("eager_decode_one", "ttft_s"),
            f"{name}_vs_eager_regenerate": med(f"{name}_regenerate_at_{history}", "ttft_s")
            / med(f"eager_regenerate_at_{history}", "ttft_s"),
        })
    res.update(compile_s=compile_s, cache_tokens={k: e.max_context for k, e in engines.items()},
               prompt_tokens=len(ids), new_tokens=n_tokens, history_tokens=len(long_ids))
    return res
