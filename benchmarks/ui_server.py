"""The server side of (e): the real playground (`playground.ui.build_ui`) and the
usual demo (generate() + TextIteratorStreamer in a Gradio handler), launched in
one process on two ports. Prints `UI_READY {json}` and serves until stdin closes.

    python -m benchmarks.ui_server
"""

from __future__ import annotations

import json
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


def main() -> None:
    from transformers import AutoModelForCausalLM

    from engines import load_engine
    from engines.loading import DEFAULT_SPEC, _resolve
    from playground.ui import build_ui, launch

    engine = load_engine("smollm2", max_sessions=8)
    source, _ = _resolve(DEFAULT_SPEC)
    # The usual demo loads its own model with from_pretrained, default layout and threads.
    stock = AutoModelForCausalLM.from_pretrained(source, dtype=engine.dtype).eval()
    apps = {
        "playground": build_ui(engine),
        "demo_stock_model": demo_app(engine.tokenizer, stock, "generate() demo, stock model"),
        "demo_engine_model": demo_app(engine.tokenizer, engine.model, "generate() demo, the engine's model"),
    }
    urls = {}
    for name, app in apps.items():
        port = free_port()
        if name == "playground":
            launch(app, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
        else:
            app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
        urls[name] = f"http://127.0.0.1:{port}"
    print("UI_READY " + json.dumps(urls), flush=True)
    sys.stdin.read()  # serve until the parent closes our stdin
    for app in apps.values():
        app.close()


if __name__ == "__main__":
    main()
