"""Command line and Hugging Face Spaces entry point: load an engine, build the UI, launch.

    python app.py [--model SPEC] [--device auto|cpu|cuda] [--host 127.0.0.1] [--port 7860]
                  [--share] [--max-sessions N] [--max-new-tokens N]

`GRADIO_SERVER_NAME` / `GRADIO_SERVER_PORT` are honoured (Spaces sets them), and
`PLAYGROUND_MODEL`, `PLAYGROUND_DEVICE`, `PLAYGROUND_MAX_SESSIONS` and
`PLAYGROUND_MAX_NEW_TOKENS` give the defaults, so a Space is configured from its
settings page. `import app` loads nothing: the module-level `demo` (what Spaces
and `gradio app.py` look for) is built on first access.
"""

from __future__ import annotations

import argparse
import os
import sys


def parse_args(argv=None) -> argparse.Namespace:
    env = os.environ.get
    p = argparse.ArgumentParser(description="LLM session playground (Gradio).")
    p.add_argument("--model", default=env("PLAYGROUND_MODEL", "smollm2"),
                   help="'smollm2' (the embedded default), a local directory, a .gguf file or a hub id")
    p.add_argument("--device", default=env("PLAYGROUND_DEVICE", "auto"), choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default=env("PLAYGROUND_DTYPE"), help="float32, bfloat16, float16 (default: per device)")
    p.add_argument("--max-context", type=int, default=None, help="cap the context length")
    p.add_argument("--compile", action="store_true",
                   default=env("PLAYGROUND_COMPILE", "").lower() in ("1", "true", "yes"),
                   help="fixed-size caches and a torch.compile'd decode step, compiled at start-up "
                        "(text models with full attention; meant for CUDA)")
    p.add_argument("--host", default=env("GRADIO_SERVER_NAME", "127.0.0.1"))
    p.add_argument("--port", type=int, default=int(env("GRADIO_SERVER_PORT", "7860")))
    p.add_argument("--share", action="store_true", help="make a public gradio.live link")
    p.add_argument("--max-sessions", type=int, default=int(env("PLAYGROUND_MAX_SESSIONS", "4")),
                   help="browser tabs that may hold a conversation at once")
    p.add_argument("--max-new-tokens", type=int, default=int(env("PLAYGROUND_MAX_NEW_TOKENS", "512")),
                   help="the most tokens one action may generate (cap for public Spaces)")
    p.add_argument("--idle-timeout", type=float, default=900.0, help="free a tab's session after this many idle seconds")
    p.add_argument("--max-file-mb", type=float, default=20.0, help="upload limit per file")
    args = p.parse_args(argv)
    if args.max_sessions < 1 or args.max_new_tokens < 1:
        p.error("--max-sessions and --max-new-tokens must be at least 1")
    return args


def build(args: argparse.Namespace):
    """Load the engine named by `args` and build the Blocks (not launched)."""
    from engines import load_engine
    from playground.ui import build_ui

    engine = load_engine(args.model, device=args.device, dtype=args.dtype, max_context=args.max_context,
                         max_sessions=args.max_sessions, compile=args.compile)
    print(f"Loaded {engine.name} ({', '.join(sorted(engine.modalities))}); "
          f"context {engine.capacity.max_context_len}, {args.max_sessions} sessions", file=sys.stderr)
    return build_ui(engine, max_sessions=args.max_sessions, max_new_tokens_cap=args.max_new_tokens,
                    idle_timeout_s=args.idle_timeout, max_file_mb=args.max_file_mb)


def main(argv=None) -> None:
    from playground.ui import launch

    args = parse_args(argv)
    demo = build(args)
    launch(demo, server_name=args.host, server_port=args.port, share=args.share)


_demo = None


def __getattr__(name):
    """`app.demo`, built on first access with the settings from the environment."""
    global _demo
    if name == "demo":
        if _demo is None:
            _demo = build(parse_args([]))
        return _demo
    raise AttributeError(name)


if __name__ == "__main__":
    main()
