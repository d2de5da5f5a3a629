"""(e) UI streaming: tokens per second a `gradio_client` sees from the real
playground app and from the usual demo (generate() + TextIteratorStreamer in a
Gradio handler), in the same run, plus each server's own rate for the request.

Each app runs in its own server process (`benchmarks.ui_server`), as deployed.
The servers not being measured are paused (SIGSTOP): an idle Gradio queue polls
every millisecond, and on two cores that polling would slow the measured app.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
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


class Server:
    """One `benchmarks.ui_server` process; paused except while measured."""

    def __init__(self, app: str):
        env = dict(os.environ, PYTHONPATH=ROOT, GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1")
        self.proc = subprocess.Popen([sys.executable, "-m", "benchmarks.ui_server", app], cwd=ROOT, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.url = next((line.split()[1] for line in self.proc.stdout if line.startswith("UI_READY ")), None)
        if self.url is None:
            raise RuntimeError(f"the {app} UI server did not start")

    @contextlib.contextmanager
    def running(self):
        self.proc.send_signal(signal.SIGCONT)
        try:
            yield
        finally:
            self.proc.send_signal(signal.SIGSTOP)

    def close(self) -> None:
        self.proc.send_signal(signal.SIGCONT)
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)
        except Exception:  # noqa: BLE001
            self.proc.kill()


def run(reps: int, n_tokens: int) -> dict:
    from gradio_client import Client

    servers = {}
    try:
        for app in ("playground", "demo_stock_model", "demo_engine_model"):
            servers[app] = Server(app)
        clients = {app: Client(srv.url, verbose=False) for app, srv in servers.items()}
        for srv in servers.values():
            srv.proc.send_signal(signal.SIGSTOP)
        greedy = dict(temperature=0, top_p=1, top_k=0, rep=1, seed=0, stops="", system_prompt="", raw=False)

        def playground() -> dict:
            play = clients["playground"]
            with servers["playground"].running():
                play.predict(system_prompt="", raw=False, stored={"messages": []}, api_name="/reset")
                job = play.submit({"text": PROMPT, "files": []}, **greedy, max_new=n_tokens,
                                  stored={"messages": []}, api_name="/send")
                return _timed(job, 0, 3)  # outputs: chatbot, box, status, context (stats line), ...

        def demo(app):
            def once():
                with servers[app].running():
                    return _timed(clients[app].submit(PROMPT, n_tokens, api_name="/chat"), 0, 1)
            return once

        res = summarise(interleaved(reps, {"playground_ui": playground,
                                           "demo_generate_streamer_stock": demo("demo_stock_model"),
                                           "demo_generate_streamer_engine_model": demo("demo_engine_model")}))
    finally:
        for srv in servers.values():
            srv.close()
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
