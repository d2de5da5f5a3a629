"""llama-server's protocol: the engine side of `CompletionSession`, by URL.

Knows nothing of torch or Gradio. Talks HTTP to a llama-server (llama.cpp's
own server, or the one `xllamacpp.Server` runs in this process): `/props` and
`/v1/models` for what is served, `/tokenize` and `/detokenize` for exact ids,
the native `/completion` for one greedy token with `return_tokens` (it
reports ids even where the stream drops them), and `/v1/completions` with
token-id prompts for streams. Request fields: llama.cpp tools/server/README.md.
"""

from __future__ import annotations

import functools
import hashlib
import http.client
import json
import os
import threading
import weakref
from typing import Callable, Sequence
from urllib.parse import urlsplit

from .base import Busy, check_inputs, EngineError, InvalidArgument, MultimodalInput, NotSupported, SamplingConfig, ServingCapacity
from .chat import render_messages
from .completions import CompletionEngine, CompletionSession, Evaluated, Parsed, Token
from .templates import JinjaTemplater

# Same order as the transformers engine's logits processors (engines/sampling.py).
SAMPLERS = ["penalties", "temperature", "top_k", "top_p"]
# Strings llama.cpp itself treats as end of generation when they are special tokens.
EOG_STRINGS = ("<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|end_of_text|>",
               "<|return|>", "</s>", "<|eom_id|>")




def _local_gguf(path: str | None) -> tuple[dict, int]:
    """(metadata, KV bytes per token) of the GGUF a server on this machine loaded;
    ({}, 0) when the file is not readable here (a remote server)."""
    if not path or not os.path.isfile(path):
        return {}, 0
    from .gguf_meta import kv_bytes_per_token, read_metadata

    try:
        meta = read_metadata(path)
    except (EngineError, OSError):
        return {}, 0
    return meta, kv_bytes_per_token(meta)


class LlamaServerEngine(CompletionEngine):
    """A llama-server at `url`. Sessions are its slots, pinned with `id_slot`."""

    backend = "llama-server"

    def __init__(
        self,
        url: str,
        *,
        name: str | None = None,
        meta: dict | None = None,
        max_context: int | None = None,
        max_sessions: int | None = None,
        chat_template: str | None = None,
        kv_bytes_per_token: int = 0,
        api_key: str | None = None,
        timeout: float = 60.0,
    ):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise InvalidArgument(f"server URL must look like http://host:port, got {url!r}")
        self.url = url.rstrip("/")
        self._host = parts.netloc
        self._https = parts.scheme == "https"
        self._prefix = parts.path.rstrip("/").removesuffix("/v1")
        self._headers = {"Content-Type": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self.timeout = timeout
        props = self.get("/props")
        if not meta and not kv_bytes_per_token:  # a server on this machine: read what HTTP does not say
            meta, kv_bytes_per_token = _local_gguf(props.get("model_path"))
        models = self.get("/v1/models").get("data") or [{}]
        info = models[0].get("meta") or {}
        meta = meta or {}
        self.vocab_size = int(info.get("n_vocab") or meta.get(f"{meta.get('general.architecture')}.vocab_size") or 0)
        slots = int(props.get("total_slots") or 1)
        per_slot = int((props.get("default_generation_settings") or {}).get("n_ctx") or 0) or 4096
        if max_context is not None:
            per_slot = min(per_slot, max_context)
        sessions = min(slots, max_sessions) if max_sessions else slots
        self.name = name or models[0].get("id") or props.get("model_alias") or self.url
        self.served_model = models[0].get("id")  # every response names it; another name is another model
        self.max_context = per_slot
        self.modalities = frozenset({"text", "tokens"})
        self.capacity = ServingCapacity(sessions, per_slot, kv_bytes_per_token, kv_bytes_per_token * per_slot)
        self.chat_template = chat_template or meta.get("tokenizer.chat_template") or props.get("chat_template")
        self._templater = JinjaTemplater({"bos_token": props.get("bos_token"), "eos_token": props.get("eos_token")})
        self.bos_token_id = meta.get("tokenizer.ggml.bos_token_id", self._special_id(props.get("bos_token")))
        eos = {meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")}
        eos.add(self._special_id(props.get("eos_token")))
        eos.update(self._special_id(s) for s in EOG_STRINGS)
        self.eos_token_ids = frozenset(i for i in eos if i is not None)
        self._fingerprint = hashlib.sha256(
            json.dumps([self.vocab_size, sorted(self.eos_token_ids), self.tokenize_text("Hello, world! 你好")]).encode()
        ).hexdigest()[:16]
        self._free = list(range(sessions - 1, -1, -1))
        # Weak: a session dropped without close() (a notebook re-running a cell) frees its slot in __del__.
        self._sessions: "weakref.WeakValueDictionary[int, CompletionSession]" = weakref.WeakValueDictionary()
        self._slots_lock = threading.Lock()

    # -- HTTP

    def _conn(self, timeout: float | None = None):
        cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
        return cls(self._host, timeout=timeout or self.timeout)

    def request(self, method: str, path: str, body: dict | None = None) -> dict:
        conn = self._conn()
        try:
            conn.request(method, self._prefix + path, None if body is None else json.dumps(body), self._headers)
            resp = conn.getresponse()
            data = resp.read()
        except TimeoutError as e:
            raise EngineError(f"{self.url}{path} sent nothing for {self.timeout:g} s (the timeout): "
                              "the server is overloaded or stuck") from e
        except OSError as e:
            raise EngineError(f"cannot reach the server at {self.url}: {e}") from e
        finally:
            conn.close()
        try:
            out = json.loads(data) if data else {}
        except ValueError:
            raise EngineError(f"{self.url}{path} answered HTTP {resp.status} with non-JSON: {data[:200]!r}") from None
        if resp.status >= 400:
            msg = out.get("error", out) if isinstance(out, dict) else out
            raise EngineError(f"{self.url}{path} answered HTTP {resp.status}: {msg}")
        return out

    def get(self, path: str) -> dict:
        return self.request("GET", path)

    def post(self, path: str, body: dict) -> dict:
        return self.request("POST", path, body)

    # -- tokens and templates

    def _special_id(self, text: str | None) -> int | None:
        if not text:
            return None
        ids = self.post("/tokenize", {"content": text, "add_special": False, "parse_special": True})["tokens"]
        return ids[0] if len(ids) == 1 else None

    @functools.lru_cache(maxsize=4096)
    def tokenize_text(self, text: str) -> tuple[int, ...]:
        ids = self.post("/tokenize", {"content": text, "add_special": False, "parse_special": True})["tokens"]
        return tuple(ids)

    def prepare(self, inputs: Sequence[MultimodalInput]) -> list[int]:
        ids: list[int] = []
        for i, inp in enumerate(check_inputs(inputs)):
            if inp.kind not in self.modalities:
                raise NotSupported(
                    f"input {i} is {inp.kind}, but {self.name} takes only {', '.join(sorted(self.modalities))}"
                )
            if inp.kind == "text":
                ids.extend(self.tokenize_text(inp.value))
            else:
                bad = [t for t in inp.value if self.vocab_size and t >= self.vocab_size]
                if bad:
                    raise InvalidArgument(
                        f"input {i} has token id {bad[0]}, outside the vocabulary of {self.vocab_size}"
                    )
                ids.extend(inp.value)
        return ids

    def tokenize(self, inputs: Sequence[MultimodalInput]) -> list[int]:
        return self.prepare(inputs)

    @functools.lru_cache(maxsize=65536)
    def _piece(self, token_id: int) -> str:
        return self.post("/detokenize", {"tokens": [token_id]})["content"]

    def decode(self, ids: Sequence[int]) -> str:
        ids = list(ids)
        if len(ids) == 1:
            return self._piece(ids[0])
        return self.post("/detokenize", {"tokens": ids})["content"] if ids else ""

    def render(self, messages, add_generation_prompt=True, chat_template=None):
        template = chat_template or self.chat_template
        if not template:
            raise NotSupported(f"{self.name} has no chat template; pass chat_template= or prefill raw text")
        return render_messages(self._templater, messages, add_generation_prompt, template, self.modalities)

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    # -- sessions and slots

    def create_session(self) -> CompletionSession:
        with self._slots_lock:
            if not self._free:
                raise Busy(
                    f"busy: all {self.capacity.max_sessions} sessions of {self.name} are in use; "
                    "close one or try again later"
                )
            slot = self._free.pop()
            session = CompletionSession(self, slot)
            self._sessions[slot] = session
        return session

    def release_slot(self, slot: int) -> None:
        # Not erased: a slot's KV memory is allocated once, so erasing frees nothing, and an
        # erase request waits behind the server's other work (seconds on a busy CPU). The next
        # session's requests keep only the exact prefix of its own tape that the slot holds.
        with self._slots_lock:
            self._sessions.pop(slot, None)
            self._free.append(slot)

    @property
    def open_sessions(self) -> int:
        return len(self._sessions)

    # -- requests

    def _settings(self, sampling: SamplingConfig) -> dict:
        """Every sampling field llama-server reads, so its own defaults never apply."""
        return {
            "temperature": sampling.temperature, "top_k": sampling.top_k, "top_p": sampling.top_p,
            "min_p": 0.0, "typical_p": 1.0, "top_n_sigma": -1.0, "xtc_probability": 0.0, "dynatemp_range": 0.0,
            "repeat_penalty": sampling.repetition_penalty, "repeat_last_n": self.max_context,
            "presence_penalty": 0.0, "frequency_penalty": 0.0, "dry_multiplier": 0.0, "mirostat": 0,
            "samplers": SAMPLERS, "ignore_eos": False, "logit_bias": [], "stop": [], "n_keep": 0,
            "post_sampling_probs": False,
        }

    def evaluate(self, slot: int, ids: list[int], k: int) -> Evaluated:
        body = {"prompt": ids, "n_predict": 1, "n_probs": k, "return_tokens": True, "cache_prompt": True,
                "id_slot": slot, "stream": False, "seed": 0, **self._settings(SamplingConfig())}
        out = self.post("/completion", body)
        if self._other_model(out):
            raise EngineError(self._other_model(out))
        tokens = out.get("tokens") or []
        if not tokens:
            raise EngineError(f"the server returned no token for a one-token request: {str(out)[:200]}")
        probs = out.get("completion_probabilities") or []
        top = tuple((e["id"], e.get("token", ""), e["logprob"]) for e in (probs[0].get("top_logprobs") or [])) if probs else ()
        cached = (out.get("timings") or {}).get("cache_n")
        return Evaluated(int(tokens[0]), top, cached)

    def stream_request(self, slot: int, ids: list[int], sampling: SamplingConfig, seed: int, n: int) -> dict:
        return {"prompt": ids, "n_predict": n, "max_tokens": n, "stream": True, "cache_prompt": True,
                "id_slot": slot, "seed": seed, "logprobs": self.top_k_logprobs, "timings_per_token": True,
                **self._settings(sampling)}

    def stream(self, request: dict, on_chunk: Callable[[dict], bool]) -> None:
        """Over HTTP: server-sent events from /v1/completions; closing the connection cancels."""
        conn = self._conn()
        try:
            conn.request("POST", self._prefix + "/v1/completions", json.dumps(request), self._headers)
            resp = conn.getresponse()
            if resp.status >= 400:
                body = resp.read()[:300].decode("utf-8", "replace")
                raise EngineError(f"{self.url}/v1/completions answered HTTP {resp.status}: {body}")
            for line in resp:
                if not line.startswith(b"data: "):
                    continue
                if line.startswith(b"data: [DONE]"):
                    break
                if on_chunk(json.loads(line[6:])):
                    break
            else:  # the connection closed before the server said it was done
                raise EngineError(f"lost the server at {self.url} mid-stream (the connection closed early); "
                                  "is it still running?")
        except http.client.HTTPException as e:
            raise EngineError(f"lost the server at {self.url} mid-stream ({type(e).__name__}); "
                              "is it still running?") from e
        except TimeoutError as e:
            raise EngineError(f"{self.url} sent no token for {self.timeout:g} s (the timeout): "
                              "the server is overloaded or stuck") from e
        except OSError as e:
            raise EngineError(f"lost the server at {self.url} mid-stream ({e}); is it still running?") from e
        finally:
            conn.close()

    def parse_chunk(self, chunk: dict, produced: int) -> Parsed:
        if "choices" not in chunk:
            err = chunk.get("error") or chunk.get("message") or chunk
            return Parsed(error=f"the server reported an error: {str(err)[:300]}")
        if self._other_model(chunk):
            return Parsed(error=self._other_model(chunk))
        choice = chunk["choices"][0]
        token = None
        content = (choice.get("logprobs") or {}).get("content") or []
        if content:
            e = content[0]
            n = (chunk.get("timings") or {}).get("predicted_n")
            lost = max(0, n - produced - 1) if isinstance(n, int) else 0
            top = tuple((t["id"], t.get("token", ""), t["logprob"]) for t in e.get("top_logprobs") or ())
            token = Token(int(e["id"]), choice.get("text") or "", e.get("logprob"), top, lost)
        finish = choice.get("finish_reason")
        cached = ((chunk.get("usage") or {}).get("prompt_tokens_details") or {}).get("cached_tokens")
        return Parsed(token=token, finish=finish, cached=cached)

    def _other_model(self, response: dict) -> str | None:
        """A message when `response` comes from another model than the one connected to."""
        model = response.get("model")
        if model is None or self.served_model is None or model == self.served_model:
            return None
        return (f"{self.url} now serves {model!r}, not {self.served_model!r}: this conversation's token ids "
                "mean nothing to that model; reconnect (reload the page or restart the app)")

    def recover_ids(self, slot: int, request: dict, upto: int) -> list[int]:
        """By URL the slot's files are out of reach: replay the stream's request
        (same prompt, seed and settings) without streaming; `return_tokens` lists every id."""
        prompt = request["prompt"]
        body = {k: v for k, v in request.items() if k not in ("logprobs", "timings_per_token", "max_tokens")}
        body.update(stream=False, return_tokens=True, n_predict=max(1, upto - len(prompt)))
        out = self.post("/completion", body)
        return list(prompt) + list(out.get("tokens") or [])
