"""Render a results dict (see run.py) as a Markdown table with the targets."""

from __future__ import annotations


def _m(s, key="median", fmt="{:.3f}"):
    if not isinstance(s, dict) or s.get(key) is None:
        return "–"
    return fmt.format(s[key])


def _mm(s, fmt="{:.3f}"):
    """'median (min)' of a summary."""
    return f"{_m(s, fmt=fmt)} ({_m(s, 'min', fmt)})" if isinstance(s, dict) and s.get("median") is not None else "–"


def paired(a: dict, b: dict, key: str) -> float | None:
    """Median over repetitions of a[key][i] / b[key][i]: peers ran back to back in
    each repetition, so the paired ratio cancels most of the background load."""
    try:
        va, vb = a[key]["values"], b[key]["values"]
    except (KeyError, TypeError):
        return None
    rs = sorted(x / y for x, y in zip(va, vb) if y)
    if not rs:
        return None
    mid = len(rs) // 2
    return rs[mid] if len(rs) % 2 else (rs[mid - 1] + rs[mid]) / 2


def paired_ratios(r: dict) -> dict:
    """The headline same-run ratios, paired by repetition."""
    out = {}
    d = r.get("decode") or {}
    if "session_decode_one" in d:
        nt = r.get("engine", {}).get("num_threads")
        pairs = {
            "decode_one / raw loop, tok/s (main thread)": ("session_decode_one", "raw_forward_loop", "tok_s"),
            "decode_one / raw loop, tok/s (worker thread)": ("session_decode_one_worker", "raw_forward_loop_worker",
                                                             "tok_s"),
            "decode_one (worker) / generate()+streamer, tok/s": ("session_decode_one_worker", "generate_streamer",
                                                                 "tok_s"),
            "decode_one (worker) / generate()+streamer, TTFT": ("session_decode_one_worker", "generate_streamer",
                                                                "ttft_s"),
            f"raw loop decode on 1 thread / on {nt} threads (main)": (
                "raw_forward_loop", f"raw_forward_loop_{nt}_threads_decode", "tok_s"),
            f"raw loop decode on 1 thread / on {nt} threads (worker)": (
                "raw_forward_loop_worker", f"raw_forward_loop_{nt}_threads_decode_worker", "tok_s"),
        }
        for name, (a, b, k) in pairs.items():
            if a in d and b in d:
                out[name] = paired(d[a], d[b], k)
    u = r.get("ui") or {}
    if "playground_ui" in u:
        out["UI client tok/s: playground / demo (stock model)"] = paired(
            u["playground_ui"], u["demo_generate_streamer_stock"], "client_tok_s")
        out["UI client tok/s: playground / demo (engine's model)"] = paired(
            u["playground_ui"], u["demo_generate_streamer_engine_model"], "client_tok_s")
        out["UI: playground client tok/s / its server-side tok/s"] = paired(
            u["playground_ui"], u["playground_ui"] | {"client_tok_s": u["playground_ui"]["server_tok_s"]},
            "client_tok_s")
    mt = r.get("multiturn") or {}
    if mt.get("last_turn_ratio_per_rep"):
        rs = sorted(mt["last_turn_ratio_per_rep"])
        out[f"turn-{mt['turns']} TTFT / generate() re-send"] = rs[len(rs) // 2]
    for L, row in (r.get("regen") or {}).items():
        if isinstance(row, dict) and "regenerate_ttft_s" in row:
            out[f"regenerate TTFT / generate() re-prefill at {row['history_tokens']}"] = paired(
                row, row | {"regenerate_ttft_s": row["generate_reprefill_ttft_s"]}, "regenerate_ttft_s")
            out[f"edit TTFT / generate() re-prefill at {row['history_tokens']}"] = paired(
                row, row | {"edit_ttft_s": row["generate_reprefill_ttft_s"]}, "edit_ttft_s")
    return out


def targets(r: dict) -> list[tuple[str, float | None, str, bool | None]]:
    """(target, measured ratio or value, threshold text, met)."""
    out = []

    def add(name, value, op, limit):
        met = None if value is None else (value >= limit if op == ">=" else value <= limit)
        out.append((name, value, f"{op} {limit}", met))

    d = r.get("decode", {}).get("ratios", {})
    add("decode_one loop / raw forward loop, tok/s, same thread", d.get("session_vs_raw_tok_s"), ">=", 0.95)
    u = r.get("ui", {}).get("ratios", {})
    add("playground UI / generate()+streamer Gradio demo (stock model), client tok/s",
        u.get("playground_vs_demo_stock_client_tok_s"), ">=", 1.2)
    add("UI client tok/s / engine tok/s (same request)", u.get("playground_client_vs_server_tok_s"), ">=", 0.9)
    mt = r.get("multiturn", {})
    add(f"turn-{mt.get('turns', 10)} TTFT / generate() re-send", mt.get("last_turn_ratio"), "<=", 0.1)
    rg = r.get("regen", {})
    longest = max(rg, key=int) if rg and "error" not in rg else None
    add(f"regenerate TTFT at {longest} / re-prefill", rg[longest]["regenerate_ratio"] if longest else None, "<=", 0.05)
    st = (r.get("startup") or {}).get("warm") or {}
    add("warm start, process start to first token (s)", (st.get("first_token_s") or {}).get("median"), "<=", 5.0)
    return out


def table(r: dict) -> str:
    m = r.get("machine", {})
    lines = [f"Machine: {m.get('cpu')} · {m.get('usable_cpus')} usable CPUs · {m.get('memory_gb')} GB · "
             f"load {m.get('load_avg_at_start')} → {m.get('load_avg_at_end')}",
             f"Python {m.get('python')} · torch {m.get('torch')} ({m.get('torch_threads')} threads) · "
             f"transformers {m.get('transformers')} · gradio {m.get('gradio')} · llama_cpp {m.get('llama_cpp')}",
             f"Engine: {r.get('engine', {}).get('name')} · {r.get('engine', {}).get('dtype')} · "
             f"{r.get('engine', {}).get('num_threads')} threads · {'QUICK' if r.get('quick') else 'full'} run, "
             f"{r.get('params', {}).get('reps')} reps, started {r.get('started')}", ""]
    if "decode" in r and "error" not in r["decode"]:
        d = r["decode"]
        lines += [f"### (a) Decode: {d['prompt_tokens']}-token prompt, {d['new_tokens']} new tokens, greedy",
                  "| case | TTFT s, median (min) | tok/s, median (min) |", "|---|---|---|"]
        for k, v in d.items():
            if isinstance(v, dict) and "tok_s" in v:
                lines.append(f"| {k} | {_mm(v['ttft_s'])} | {_mm(v['tok_s'], '{:.1f}')} |")
        lines += [f"ratios: " + ", ".join(f"{k} **{v:.2f}**" for k, v in d["ratios"].items()), ""]
    if "multiturn" in r and "error" not in r["multiturn"]:
        mt = r["multiturn"]
        lines += [f"### (b) Multi-turn: {mt['turns']} turns, user ~40 tokens, replies {mt['reply_tokens']}",
                  "| turn | context tokens | Conversation TTFT s | generate() re-send TTFT s | ratio |",
                  "|---|---|---|---|---|"]
        for row in mt["per_turn"]:
            lines.append(f"| {row['turn']} | {row['context_tokens']} | {_mm(row['playground_ttft_s'])} | "
                         f"{_mm(row['generate_resend_ttft_s'])} | {row['ratio']:.3f} |")
        lines.append("")
    if "regen" in r and "error" not in r["regen"]:
        lines += ["### (c) Regenerate / edit the last turn",
                  "| history | regenerate (seek) | edit last user turn | generate() re-prefill | fresh session "
                  "re-prefill | regen ratio | edit ratio |", "|---|---|---|---|---|---|---|"]
        for L, row in r["regen"].items():
            lines.append(f"| {row['history_tokens']} | {_mm(row['regenerate_ttft_s'])} | {_mm(row['edit_ttft_s'])} | "
                         f"{_mm(row['generate_reprefill_ttft_s'])} | {_mm(row['session_reprefill_ttft_s'])} | "
                         f"{row['regenerate_ratio']:.3f} | {row['edit_ratio']:.3f} |")
        lines.append("")
    if "startup" in r and "error" not in r["startup"]:
        lines += ["### (d) Start-up, process start to first token (s), median (min)",
                  "| | imports done | engine loaded | first token | process wall |", "|---|---|---|---|---|"]
        for kind in ("warm", "cold"):
            s = r["startup"].get(kind)
            if s:
                lines.append(f"| {kind} (n={s['first_token_s']['n']}) | {_mm(s['imports_s'], '{:.2f}')} | "
                             f"{_mm(s['engine_loaded_s'], '{:.2f}')} | {_mm(s['first_token_s'], '{:.2f}')} | "
                             f"{_mm(s['process_wall_s'], '{:.2f}')} |")
            else:
                lines.append(f"| {kind} | not run in this mode | | | |")
        lines.append("")
    if "ui" in r and "error" not in r["ui"]:
        u = r["ui"]
        lines += [f"### (e) UI streaming through gradio_client, {u['new_tokens']} new tokens",
                  "| app | client tok/s | server-side tok/s | client TTFT s | updates |", "|---|---|---|---|---|"]
        for k, v in u.items():
            if isinstance(v, dict) and "client_tok_s" in v:
                lines.append(f"| {k} | {_mm(v['client_tok_s'], '{:.1f}')} | {_mm(v.get('server_tok_s'), '{:.1f}')} | "
                             f"{_mm(v['ttft_s'])} | {_m(v['updates'], fmt='{:.0f}')} |")
        lines += ["ratios: " + ", ".join(f"{k} **{v:.2f}**" for k, v in u["ratios"].items()), ""]
    if "memory" in r and "error" not in r["memory"]:
        mm = r["memory"]
        lines += ["### (f) Memory",
                  f"KV bytes/token measured {mm['kv_bytes_per_token_measured']:.0f} vs computed "
                  f"{mm['kv_bytes_per_token_computed']} (×{mm['kv_measured_over_computed']:.3f})"
                  + (f", allocated ×{mm['kv_allocated_over_measured']:.3f} of it (spare rows of a 256-token step)"
                     if "kv_allocated_over_measured" in mm else "") + "; "
                  f"RSS per extra session at {mm['context_tokens']} tokens "
                  f"{mm['rss_per_extra_session_bytes'] / 2**20:.1f} MiB vs KV {mm['kv_bytes_at_context_computed'] / 2**20:.1f} MiB "
                  f"(×{mm['rss_over_kv']:.2f}); full-context estimate "
                  f"{mm['estimated_bytes_per_session_full_context'] / 2**20:.0f} MiB", ""]
    if "llamacpp" in r:
        g = r["llamacpp"]
        lines.append("### (g) llama.cpp (llama-cpp-python, same GGUF, same threads)")
        if "skipped" in g or "error" in g:
            lines.append(f"skipped: {g.get('skipped') or g.get('error')}")
        else:
            v = g["llama_cpp_q4_1"]
            lines.append(f"Q4_1, {g['threads']} threads: TTFT {_mm(v['ttft_s'])} s, {_mm(v['tok_s'], '{:.1f}')} tok/s")
        lines.append("")
    if "compiled" in r and "error" not in r["compiled"]:
        c = r["compiled"]
        lines += [f"### (h) compile=True: {c['prompt_tokens']}-token prompt, {c['new_tokens']} new tokens; "
                  f"regenerate at {c['history_tokens']}; cache tokens {c['cache_tokens']}; "
                  f"compile s {({k: round(v, 1) for k, v in c['compile_s'].items()})}",
                  "| case | TTFT s, median (min) | tok/s, median (min) |",
                  "|---|---|---|"]
        for k, v in c.items():
            if isinstance(v, dict) and "ttft_s" in v:
                tok = _mm(v["tok_s"], "{:.1f}") if "tok_s" in v else ""
                lines.append(f"| {k} | {_mm(v['ttft_s'])} | {tok} |")
        lines += ["ratios: " + ", ".join(f"{k} **{v:.2f}**" for k, v in c["ratios"].items()), ""]
    pr = paired_ratios(r)
    if pr:
        lines += ["### Same-run ratios, paired by repetition (median of per-repetition ratios)",
                  "| ratio | value |", "|---|---|"]
        lines += [f"| {k} | {'–' if v is None else f'{v:.3f}'} |" for k, v in pr.items()]
        lines.append("")
    lines += ["### Targets (ratios of medians)", "| target | measured | wanted | met |", "|---|---|---|---|"]
    for name, value, want, met in targets(r):
        val = "–" if value is None else f"{value:.3f}"
        lines.append(f"| {name} | {val} | {want} | {'–' if met is None else ('yes' if met else 'NO')} |")
    errs = [f"{k}: {v['error']}" for k, v in r.items() if isinstance(v, dict) and "error" in v]
    if errs:
        lines += ["", "Errors: " + "; ".join(errs)]
    return "\n".join(lines)


if __name__ == "__main__":  # python -m benchmarks.report benchmarks/out/results.json
    import json
    import sys

    with open(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/out/results.json") as f:
        print(table(json.load(f)))
