"""Connect to a serving engine by URL: find out which kind it is, and return
the Engine that speaks its dialect. Knows nothing of torch or Gradio.

Detection asks each server's own endpoints: llama-server answers `/props`
with its generation settings, SGLang answers `/get_model_info`, vLLM answers
`/version`.
"""

from __future__ import annotations

import http.client
import json
from urllib.parse import urlsplit

from .base import Engine, EngineError, InvalidArgument, NotSupported

KINDS = ("llama-server", "vllm", "sglang")


def _get_json(base: str, path: str, headers: dict, timeout: float):
    """(status, JSON or None) of GET base+path; raises EngineError when nothing answers."""
    parts = urlsplit(base)
    cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    conn = cls(parts.netloc, timeout=timeout)
    try:
        conn.request("GET", parts.path.rstrip("/") + path, headers=headers)
        resp = conn.getresponse()
        body = resp.read()
    except OSError as e:
        raise EngineError(f"cannot reach a server at {base}: {e} (is it running, and is the port right?)") from e
    finally:
        conn.close()
    try:
        return resp.status, json.loads(body)
    except ValueError:
        return resp.status, None


def detect(base: str, headers: dict | None = None, timeout: float = 10.0) -> str:
    """Which serving engine answers at `base`: "llama-server", "sglang" or "vllm"."""
    headers = headers or {}
    status, props = _get_json(base, "/props", headers, timeout)
    if status == 401:
        raise EngineError(f"{base} wants an API key: set PLAYGROUND_API_KEY (or pass api_key=)")
    if status == 200 and isinstance(props, dict) and "default_generation_settings" in props:
        return "llama-server"
    status, info = _get_json(base, "/get_model_info", headers, timeout)
    if status == 200 and isinstance(info, dict) and "model_path" in info:
        return "sglang"
    status, version = _get_json(base, "/version", headers, timeout)
    if status == 200 and isinstance(version, dict) and "version" in version:
        return "vllm"
    raise EngineError(
        f"{base} answers HTTP, but not as llama-server (/props), SGLang (/get_model_info) or vLLM (/version); "
        f"pass backend= one of {', '.join(KINDS)} if you know which it is"
    )


def connect(url: str, backend: str = "auto", max_context=None, max_sessions=None, chat_template=None,
            api_key: str | None = None, timeout: float = 60.0, tokenizer: str | None = None) -> Engine:
    """An Engine over the server at `url` ("http://host:port", with or without "/v1")."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise InvalidArgument(f"server URL must look like http://host:port, got {url!r}")
    if not isinstance(timeout, (int, float)) or timeout <= 0:
        raise InvalidArgument(f"timeout must be a positive number of seconds, got {timeout!r}")
    base = url.rstrip("/").removesuffix("/v1")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    kind = detect(base, headers, min(timeout, 10.0)) if backend == "auto" else backend
    if kind == "llama-server":
        if tokenizer is not None:
            raise InvalidArgument("llama-server tokenizes itself; tokenizer= is for servers without /tokenize")
        from .llama_server import LlamaServerEngine

        return LlamaServerEngine(base, max_context=max_context, max_sessions=max_sessions,
                                 chat_template=chat_template, api_key=api_key, timeout=timeout)
    if kind in ("vllm", "sglang"):
        if kind == "vllm":
            from .vllm_dialect import VLLMEngine as cls
        else:
            from .sglang_dialect import SGLangEngine as cls
        return cls(base, max_context=max_context, max_sessions=max_sessions, chat_template=chat_template,
                   api_key=api_key, timeout=timeout, tokenizer=tokenizer)
    raise NotSupported(f"unknown serving backend {kind!r}; one of {', '.join(KINDS)}")
