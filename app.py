"""Command line and Hugging Face Spaces entry point: load an engine, build the UI, launch.

    python app.py [--model SPEC] [--backend auto|transformers|llama.cpp|llama-server|vllm|sglang]
                  [--device auto|cpu|cuda] [--host 127.0.0.1] [--port 7860]
                  [--share] [--max-sessions N] [--max-new-tokens N]

`GRADIO_SERVER_NAME` / `GRADIO_SERVER_PORT` are honoured (Spaces sets them), and
`PLAYGROUND_MODEL`, `PLAYGROUND_BACKEND`, `PLAYGROUND_DEVICE`, `PLAYGROUND_MAX_SESSIONS` and
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
                   help="'smollm2' (the embedded default), a local directory, a .gguf file, a hub id, "
                        "or http://host:port of a serving engine (API key: $PLAYGROUND_API_KEY)")
    p.add_argument("--backend", default=env("PLAYGROUND_BACKEND", "auto"),
                   choices=["auto", "transformers", "llama.cpp", "llama-server", "vllm", "sglang"],
                   help="auto: llama.cpp for a .gguf or the default on CPU, the server's own kind for a URL, "
                        "else transformers")
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
    # Limits a public deployment needs (docs/reliability.md); each has a PLAYGROUND_* variable.
    p.add_argument("--max-image-pixels", type=int, default=int(env("PLAYGROUND_MAX_IMAGE_PIXELS", "50000000")),
                   help="refuse images with more pixels (checked from the header, before decoding)")
    p.add_argument("--max-audio-seconds", type=float, default=float(env("PLAYGROUND_MAX_AUDIO_SECONDS", "30")),
                   help="refuse longer sounds (checked before decoding; a model's own window may be shorter)")
    p.add_argument("--max-prompt-tokens", type=int, default=int(env("PLAYGROUND_MAX_PROMPT_TOKENS", "4096")),
                   help="the most tokens one new message may have, attachments included (0: no limit)")
    p.add_argument("--max-transcript-mb", type=float, default=float(env("PLAYGROUND_MAX_TRANSCRIPT_MB", "10")),
                   help="the largest transcript file an import reads")
    p.add_argument("--rate-limit", type=float, default=float(env("PLAYGROUND_RATE_LIMIT", "120")),
                   help="actions a minute per browser tab (0: off); Stop is never limited")
    p.add_argument("--rate-burst", type=int, default=int(env("PLAYGROUND_RATE_BURST", "30")),
                   help="actions a tab may start at once before --rate-limit applies")
    p.add_argument("--max-speech-seconds", type=float, default=float(env("PLAYGROUND_MAX_SPEECH_SECONDS", "60")),
                   help="recordings transcribed to text are cut here, with a note (docs/speech.md)")
    p.add_argument("--no-speech", action="store_true", help="no speech to text: text-only models refuse recordings")
    args = p.parse_args(argv)
    if args.max_speech_seconds < 1:
        p.error("--max-speech-seconds must be at least 1")
    if args.max_sessions < 1 or args.max_new_tokens < 1:
        p.error("--max-sessions and --max-new-tokens must be at least 1")
    if args.max_image_pixels < 1 or args.max_audio_seconds <= 0 or args.max_transcript_mb <= 0 \
            or args.max_prompt_tokens < 0 or args.rate_limit < 0 or args.rate_burst < 1:
        p.error("--max-image-pixels, --max-audio-seconds, --max-transcript-mb and --rate-burst must be positive; "
                "--max-prompt-tokens and --rate-limit at least 0")
    return args


def build(args: argparse.Namespace):
    """Load the engine named by `args` and build the Blocks (not launched)."""
    import threading

    from engines import load_engine

    loaded: dict = {}

    def load():
        try:
            extra = {}
            if args.model.startswith(("http://", "https://")):  # serving-engine options (docs/scale-out.md)
                options = (("api_key", "PLAYGROUND_API_KEY", str), ("timeout", "PLAYGROUND_SERVER_TIMEOUT", float),
                           ("tokenizer", "PLAYGROUND_TOKENIZER", str))
                extra = {key: kind(os.environ[name]) for key, name, kind in options if os.environ.get(name)}
            loaded["engine"] = load_engine(args.model, device=args.device, dtype=args.dtype,
                                           max_context=args.max_context, backend=args.backend,
                                           max_sessions=args.max_sessions, compile=args.compile, **extra)
        except BaseException as e:  # re-raised on the main thread
            loaded["error"] = e

    # The engine loads while gradio imports (about 7 s here): start-up is the longer of the two.
    loader = threading.Thread(target=load, name="load-engine")
    loader.start()
    from engines.media import set_media_limits
    from playground.sessions import RateLimit
    from playground.ui import build_ui

    loader.join()
    if "error" in loaded:
        raise loaded["error"]
    engine = loaded["engine"]
    set_media_limits(max_image_pixels=args.max_image_pixels, max_audio_seconds=args.max_audio_seconds)
    print(f"Loaded {engine.name} on {engine.backend} ({', '.join(sorted(engine.modalities))}); "
          f"context {engine.capacity.max_context_len}, {engine.capacity.max_sessions} sessions", file=sys.stderr)
    return build_ui(engine, max_sessions=args.max_sessions, max_new_tokens_cap=args.max_new_tokens,
                    idle_timeout_s=args.idle_timeout, max_file_mb=args.max_file_mb,
                    max_prompt_tokens=args.max_prompt_tokens or None, max_transcript_mb=args.max_transcript_mb,
                    rate_limit=RateLimit(args.rate_limit, args.rate_burst), transcriber=make_transcriber(args))


def make_transcriber(args: argparse.Namespace):
    """Speech to text for the UI, loaded on first use; None with --no-speech or without faster-whisper."""
    import importlib.util

    if args.no_speech:
        return None
    if importlib.util.find_spec("faster_whisper") is None:
        print("faster-whisper is not installed: no speech to text (pip install -r requirements.txt)", file=sys.stderr)
        return None
    from engines.speech import Transcriber

    return Transcriber(device=args.device, max_seconds=args.max_speech_seconds)


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
