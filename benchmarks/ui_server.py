"""The server side of (e): one app per process, as it would be deployed. Either
the real playground (`playground.ui.build_ui`) or the usual demo (generate() +
TextIteratorStreamer in a Gradio handler) on a stock model or on the engine's.
Prints `UI_READY <url>` and serves until stdin closes.

    python -m benchmarks.ui_server playground|demo_stock_model|demo_engine_model
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def demo_app(tokenizer, model, title: str):
    """The usual chat demo: generate() in a thread, a streamer, cumulative yields."""
    import gradio as gr
    import torch
    from transformers import TextIteratorStreamer

    threads = torch.get_num_threads()

    def respond(message: str, max_new: int):
        messages = [{"role": "user", "content": message}]
        enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        n = {"prompt_seen": False, "tokens": 0, "t_first": None, "t_last": None}
        put = streamer.put

        def counting_put(value):  # the first put is the prompt; later ones are generated tokens
            if n["prompt_seen"]:
                n["tokens"] += value.numel()
                n["t_last"] = time.perf_counter()
                n["t_first"] = n["t_first"] or n["t_last"]
            n["prompt_seen"] = True
            put(value)

        streamer.put = counting_put
        kwargs = dict(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], max_new_tokens=int(max_new),
                      do_sample=False, temperature=None, top_p=None, top_k=None, streamer=streamer,
                      pad_token_id=tokenizer.eos_token_id)
        def target():
            torch.set_num_threads(threads)  # a fresh process's default, not the engine's last setting
            model.generate(**kwargs)

        threading.Thread(target=target).start()
        text = ""
        for piece in streamer:
            text += piece
            yield [{"role": "user", "content": message}, {"role": "assistant", "content": text}], ""
        rate = (n["tokens"] - 1) / (n["t_last"] - n["t_first"]) if n["tokens"] > 1 else 0.0
        yield gr.skip(), f"{n['tokens']} new tokens · {rate:.2f} tok/s"

    with gr.Blocks(title=title) as demo:
        chat = gr.Chatbot()
        box = gr.Textbox()
        max_new = gr.Number(64, precision=0)
        stats = gr.Textbox()
        box.submit(respond, [box, max_new], [chat, stats], api_name="chat")
    demo.queue()
    return demo


APPS = ("playground", "demo_stock_model", "demo_engine_model")


def main(name: str) -> None:
    from transformers import AutoModelForCausalLM

    from engines import load_engine
    from engines.loading import DEFAULT_SPEC, _resolve
    from playground.ui import build_ui, launch

    engine = load_engine("smollm2", backend="transformers", max_sessions=8)
    port = free_port()
    if name == "playground":
        app = build_ui(engine)
        launch(app, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    else:
        model = engine.model
        if name == "demo_stock_model":  # the usual demo loads its own model: default layout and threads
            model = AutoModelForCausalLM.from_pretrained(_resolve(DEFAULT_SPEC)[0], dtype=engine.dtype).eval()
        app = demo_app(engine.tokenizer, model, name)
        app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    print(f"UI_READY http://127.0.0.1:{port}", flush=True)
    sys.stdin.read()  # serve until the parent closes our stdin
    app.close()


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in APPS:
        sys.exit(f"usage: python -m benchmarks.ui_server {{{'|'.join(APPS)}}}")
    main(sys.argv[1])
