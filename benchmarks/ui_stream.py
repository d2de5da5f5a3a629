"""(e) UI streaming: tokens per second a `gradio_client` sees from the real
playground app and from the usual demo (generate() + TextIteratorStreamer in a
Gradio handler), measured in the same run against the same server process
(`benchmarks.ui_server`), plus the engine's own rate for the same request."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

from .common import interleaved, now, summarise
from .decode import PROMPT

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STATS = re.compile(r"(\d+) new tokens")
RATE = re.compile(r"([\d.]+) tok/s")


def _text(chat) -> str | None:
    """The last assistant message's text; None for a value that is not a message list (a skip)."""
    if not isinstance(chat, list):
        return None
    for msg in reversed(chat or []):
        if msg.get("role") == "assistant":
            c = msg.get("content")
            if isinstance(c, str):
                return c
            return "".join(p.get("text", "") for p in c if isinstance(p, dict))
    return ""


def _timed(job, chat_index: int, stats_index: int) -> dict:
    """Iterate a streaming job; time each change of the reply text."""
    t0 = now()
    stamps, last_text, stats = [], "", ""
    for out in job:
        text = _text(out[chat_index])
        if text is not None and text != last_text:
            stamps.append(now())
            last_text = text
        s = out[stats_index]
        if isinstance(s, str) and "new tokens" in s:
            stats = s
    final = job.outputs()[-1] if job.outputs() else None
    if final is not None and isinstance(final[stats_index], str) and "new tokens" in final[stats_index]:
        stats = final[stats_index]
    n = int(STATS.search(stats).group(1)) if STATS.search(stats) else len(stamps)
    server = float(RATE.search(stats).group(1)) if RATE.search(stats) else None
    span = stamps[-1] - stamps[0] if len(stamps) > 1 else None
    return {"ttft_s": stamps[0] - t0 if stamps else None,
            "client_tok_s": (n - 1) / span if span else 0.0,
            "server_tok_s": server, "tokens": n, "updates": len(stamps)}


def run(reps: int, n_tokens: int) -> dict:
    from gradio_client import Client

    env = dict(os.environ, PYTHONPATH=ROOT, GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1")
    server = subprocess.Popen([sys.executable, "-m", "benchmarks.ui_server"], cwd=ROOT, env=env,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        urls = None
        for line in server.stdout:
            if line.startswith("UI_READY "):
                urls = json.loads(line[len("UI_READY "):])
                break
        if urls is None:
            raise RuntimeError("the UI server did not start")
        play = Client(urls["playground"], verbose=False)
        stock = Client(urls["demo_stock_model"], verbose=False)
        shared = Client(urls["demo_engine_model"], verbose=False)
        greedy = dict(temperature=0, top_p=1, top_k=0, rep=1, seed=0, stops="", system_prompt="", raw=False)

        def playground() -> dict:
            play.predict(system_prompt="", raw=False, stored={"messages": []}, api_name="/reset")
            job = play.submit({"text": PROMPT, "files": []}, **greedy, max_new=n_tokens,
                              stored={"messages": []}, api_name="/send")
            return _timed(job, 0, 3)  # outputs: chatbot, box, status, context (stats line), ...

        def demo(client):
            return lambda: _timed(client.submit(PROMPT, n_tokens, api_name="/chat"), 0, 1)

        res = summarise(interleaved(reps, {"playground_ui": playground, "demo_generate_streamer_stock": demo(stock),
                                           "demo_generate_streamer_engine_model": demo(shared)}))
    finally:
        try:
            server.stdin.close()
            server.wait(timeout=30)
        except Exception:  # noqa: BLE001
            server.kill()
    med = lambda c, k: res[c][k]["median"]  # noqa: E731
    res["ratios"] = {
        "playground_vs_demo_stock_client_tok_s": med("playground_ui", "client_tok_s")
        / med("demo_generate_streamer_stock", "client_tok_s"),
        "playground_vs_demo_engine_model_client_tok_s": med("playground_ui", "client_tok_s")
        / med("demo_generate_streamer_engine_model", "client_tok_s"),
        "playground_client_vs_server_tok_s": med("playground_ui", "client_tok_s") / med("playground_ui", "server_tok_s"),
    }
    res["new_tokens"] = n_tokens
    return res
