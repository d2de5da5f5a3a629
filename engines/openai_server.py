"""vLLM and SGLang by URL: the engine side of `CompletionSession` over their HTTP APIs.

Knows nothing of torch or Gradio. A local tokenizer, when one is named, is
loaded with transformers on first use. The session keeps the exact tape; the
server's automatic prefix cache (vLLM's prefix caching, SGLang's RadixAttention)
makes resending it cheap. There are no slots to pin: a "slot" here is only the
session's index, and a fork costs nothing (its first request hits the cache).

What both servers share lives here: `GET /v1/models` (`id`, `max_model_len`),
`POST /tokenize` (`prompt`, `add_special_tokens` -> `tokens`), server-sent
events, OpenAI-style errors, the token tape and sessions. Each dialect
(engines/vllm_dialect.py, engines/sglang_dialect.py) builds its requests and
reads its chunks, with the fields cited from the server's own source.

Neither server was run here: the dialects are tested against a stub that
replays those shapes (tests/test_serving.py), and `python -m engines.check URL`
checks a live one.
"""

from __future__ import annotations

import functools
import hashlib
import http.client
import json
import socket
import threading
import weakref
from typing import Callable, Sequence
from urllib.parse import urlsplit

from .base import Busy, EngineError, InvalidArgument, MultimodalInput, NotSupported, ServingCapacity
from .chat import render_messages
from .completions import CompletionEngine, CompletionSession, Parsed, Token
from .base import check_inputs as _check_inputs
from .llama_server import EOG_STRINGS
from .templates import JinjaTemplater

PROBE = "Hello, world! 你好 <|im_start|> 123"  # text whose ids tell tokenizers apart


class ServerError(EngineError):
    """The server answered, but with an error (`status`) or something unreadable."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class _Client:
    """JSON over HTTP(S) to one server; streams server-sent events, and can abort one."""

    def __init__(self, url: str, api_key: str | None, timeout: float):
        parts = urlsplit(url)
        self.url = url.rstrip("/")
        self._host, self._https = parts.netloc, parts.scheme == "https"
        self._prefix = parts.path.rstrip("/").removesuffix("/v1")
        self.headers = {"Content-Type": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.timeout = timeout
        self._live: dict[int, http.client.HTTPConnection] = {}  # id(request) -> its open stream
        self._aborted: set[int] = set()  # live streams shut by abort()
        self._lock = threading.Lock()

    def _conn(self):
        cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
        return cls(self._host, timeout=self.timeout)

    def _unreachable(self, path: str, e: Exception) -> EngineError:
        if isinstance(e, TimeoutError):
            return EngineError(f"{self.url}{path} sent nothing for {self.timeout:g} s (the timeout); "
                               "the server is overloaded or stuck")
        return EngineError(f"cannot reach the server at {self.url}: {e} (is it running?)")

    def request(self, method: str, path: str, body: dict | None = None) -> dict:
        conn = self._conn()
        try:
            conn.request(method, self._prefix + path, None if body is None else json.dumps(body), self.headers)
            resp = conn.getresponse()
            data = resp.read()
        except OSError as e:
            raise self._unreachable(path, e) from e
        finally:
            conn.close()
        return _json_or_raise(self.url + path, resp.status, data)

    def get(self, path: str) -> dict:
        return self.request("GET", path)

    def post(self, path: str, body: dict) -> dict:
        return self.request("POST", path, body)

    def events(self, path: str, body: dict, on_event: Callable[[dict], bool]) -> None:
        """POST `body` and call `on_event` per server-sent JSON event until it returns True.
        `abort(body)` from another thread shuts the connection: the server then cancels."""
        key = id(body)
        conn = self._conn()
        with self._lock:
            self._live[key] = conn
        try:
            conn.request("POST", self._prefix + path, json.dumps(body), self.headers)
            resp = conn.getresponse()
            if resp.status >= 400:
                _json_or_raise(self.url + path, resp.status, resp.read())
            for line in resp:
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                try:
                    event = json.loads(data)
                except ValueError:
                    raise ServerError(f"{self.url}{path} streamed something that is not JSON: {data[:200]!r}")
                if on_event(event):
                    break
            else:
                with self._lock:
                    aborted = key in self._aborted
                if not aborted:  # the connection closed before the server said it was done
                    raise EngineError(f"lost the server at {self.url} mid-stream (the connection closed early); "
                                      "is it still running?")
        except http.client.HTTPException as e:
            raise EngineError(f"lost the server at {self.url} mid-stream ({type(e).__name__})") from e
        except OSError as e:
            with self._lock:
                aborted = key in self._aborted
            if not aborted:
                raise self._unreachable(path, e) from e
        finally:
            with self._lock:
                self._live.pop(key, None)
                self._aborted.discard(key)
            conn.close()

    def abort(self, body: dict) -> None:
        """Shut the stream of `body` if it is open (one not yet open ends at its first event)."""
        key = id(body)
        with self._lock:
            conn = self._live.get(key)
            if conn is None:
                return
            self._aborted.add(key)
        if conn.sock is not None:
            try:
                conn.sock.shutdown(socket.SHUT_RDWR)  # wakes the reader blocked in recv
            except OSError:
                pass


def _json_or_raise(where: str, status: int, data: bytes) -> dict:
    try:
        out = json.loads(data) if data else {}
    except ValueError:
        raise ServerError(f"{where} answered HTTP {status} with something that is not JSON: {data[:200]!r}") from None
    if status >= 400:
        raise ServerError(f"{where} answered HTTP {status}: {_error_text(out)}", status)
    if not isinstance(out, dict):
        raise ServerError(f"{where} answered with a JSON {type(out).__name__}, not an object")
    return out


def _error_text(out) -> str:
    """The message of an OpenAI-style error ({"error": {...}} or {"object": "error", "message": ...})."""
    if isinstance(out, dict):
        err = out.get("error", out)
        if isinstance(err, dict):
            return str(err.get("message") or err.get("detail") or err)[:300]
        return str(err)[:300]
    return str(out)[:300]


class LocalTokenizer:
    """A tokenizer named by `tokenizer=` (a path or hub id), loaded with transformers."""

    def __init__(self, spec: str):
        try:
            from transformers import AutoTokenizer

            self.tok = AutoTokenizer.from_pretrained(spec)
        except Exception as e:
            raise EngineError(f"cannot load the tokenizer {spec!r}: {e}") from e
        self.spec = spec

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)

    @property
    def vocab_size(self) -> int:
        return len(self.tok)


class OpenAIServerEngine(CompletionEngine):
    """A vLLM or SGLang server at `url`. Subclasses give the dialect."""

    backend = ""
    stream_path = ""

    def __init__(self, url: str, *, max_context: int | None = None, max_sessions: int | None = None,
                 chat_template: str | None = None, api_key: str | None = None, timeout: float = 60.0,
                 tokenizer: str | None = None):
        self.url = url.rstrip("/").removesuffix("/v1")
        self.http = _Client(self.url, api_key, timeout)
        self.timeout = timeout
        self._pieces: dict[int, str] = {}  # id -> text, for display
        model = self._served_model()
        self.served_model = model.get("id") or self.url
        self.name = self.served_model
        self._local = LocalTokenizer(tokenizer) if tokenizer else None
        if self._local is not None:
            self._check_local_tokenizer()
        limit = self._max_model_len(model)
        # One greedy token must fit after a full tape (prompt + max_tokens <= max_model_len).
        self.max_context = min(limit - 1, max_context) if max_context else limit - 1
        sessions = max_sessions or 4
        self.capacity = ServingCapacity(sessions, self.max_context, 0, 0)  # the KV size is the server's secret
        self.modalities = frozenset({"text", "tokens"})
        self.vocab_size = self._local.vocab_size if self._local else 0
        eos = {self._special_id(s) for s in EOG_STRINGS}
        if self._local is not None:
            eos.add(self._local.tok.eos_token_id)
        self.eos_token_ids = frozenset(i for i in eos if i is not None)
        self.bos_token_id = self._local.tok.bos_token_id if self._local else self._bos_from_server()
        self.chat_template = chat_template or (self._local.tok.chat_template if self._local else None)
        self._fingerprint = hashlib.sha256(
            json.dumps([self.served_model, sorted(self.eos_token_ids), self.tokenize_text(PROBE)]).encode()
        ).hexdigest()[:16]
        self._free = list(range(sessions - 1, -1, -1))
        self._sessions: "weakref.WeakValueDictionary[int, CompletionSession]" = weakref.WeakValueDictionary()
        self._slots_lock = threading.Lock()

    # -- what the server serves

    def _served_model(self) -> dict:
        out = self.http.get("/v1/models")
        data = out.get("data") or []
        if not data:
            raise ServerError(f"{self.url}/v1/models lists no model")
        return data[0]

    def _max_model_len(self, model: dict) -> int:
        n = model.get("max_model_len")
        if not isinstance(n, int) or n < 2:
            n = self._server_tokenize_full("x").get("max_model_len")
        if not isinstance(n, int) or not 2 <= n < 10**8:
            raise ServerError(f"{self.url} does not say its context length (no max_model_len in /v1/models)")
        return n

    def _check_local_tokenizer(self) -> None:
        """The local tokenizer must give the server's ids; checked once, on a probe text."""
        mine = self._local.encode(PROBE)
        theirs = self._server_tokenize(PROBE)
        if mine != theirs:
            raise EngineError(
                f"the tokenizer {self._local.spec!r} does not match the model {self.served_model!r} at "
                f"{self.url}: {PROBE!r} gives {mine} here but {theirs} on the server. Name the served "
                "model's own tokenizer (tokenizer=)"
            )

    # -- tokens and templates

    def _server_tokenize_full(self, text: str) -> dict:
        return self.http.post("/tokenize", {"model": self.served_model, "prompt": text, "add_special_tokens": False})

    def _server_tokenize(self, text: str) -> list[int]:
        ids = self._server_tokenize_full(text).get("tokens")
        if not isinstance(ids, list) or not all(isinstance(i, int) for i in ids):
            raise ServerError(f"{self.url}/tokenize did not return a list of ids")
        return ids

    def _special_id(self, text: str) -> int | None:
        ids = self._local.encode(text) if self._local else self._server_tokenize(text)
        return ids[0] if len(ids) == 1 else None

    def _bos_from_server(self) -> int | None:
        """The id the tokenizer puts in front of text by itself, if any."""
        out = self.http.post("/tokenize", {"model": self.served_model, "prompt": "", "add_special_tokens": True})
        ids = out.get("tokens") or []
        return ids[0] if len(ids) == 1 else None

    @functools.lru_cache(maxsize=4096)
    def tokenize_text(self, text: str) -> tuple[int, ...]:
        return tuple(self._local.encode(text) if self._local else self._server_tokenize(text))

    def prepare(self, inputs: Sequence[MultimodalInput]) -> list[int]:
        ids: list[int] = []
        for i, inp in enumerate(_check_inputs(inputs)):
            if inp.kind not in self.modalities:
                raise NotSupported(f"input {i} is {inp.kind}, but {self.name} takes only text and tokens")
            if inp.kind == "text":
                ids.extend(self.tokenize_text(inp.value))
                continue
            bad = [t for t in inp.value if self.vocab_size and t >= self.vocab_size]
            if bad:
                raise InvalidArgument(f"input {i} has token id {bad[0]}, outside the vocabulary of {self.vocab_size}")
            ids.extend(inp.value)
        return ids

    def tokenize(self, inputs: Sequence[MultimodalInput]) -> list[int]:
        return self.prepare(inputs)

    def _piece(self, token_id: int) -> str:
        piece = self._pieces.get(token_id)
        if piece is None:
            piece = self._pieces[token_id] = self._detokenize([token_id])
        return piece

    def _detokenize(self, ids: list[int]) -> str:
        if self._local is not None:
            return self._local.decode(ids)
        return self._server_detokenize(ids)

    def decode(self, ids: Sequence[int]) -> str:
        ids = list(ids)
        if not ids:
            return ""
        return self._piece(ids[0]) if len(ids) == 1 else self._detokenize(ids)

    def render(self, messages, add_generation_prompt=True, chat_template=None):
        template = chat_template or self.chat_template
        if self._local is not None:
            if not template:
                raise NotSupported(f"the tokenizer {self._local.spec!r} has no chat template; pass chat_template=")
            return render_messages(self._local.tok, messages, add_generation_prompt, template, self.modalities)
        if template:
            specials = {"bos_token": self.decode([self.bos_token_id]) if self.bos_token_id is not None else None,
                        "eos_token": self.decode([min(self.eos_token_ids)]) if self.eos_token_ids else None}
            return render_messages(JinjaTemplater(specials), messages, add_generation_prompt, template,
                                   self.modalities)
        return render_messages(self._server_templater(), messages, add_generation_prompt, "", self.modalities)

    def _server_templater(self):
        raise NotSupported(
            f"{self.backend} at {self.url} does not render chat templates for a client: pass tokenizer= "
            "(the served model's tokenizer: a path or hub id) or chat_template=, or use raw mode"
        )

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    # -- sessions (no slots to pin: an index for bookkeeping)

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
        with self._slots_lock:
            self._sessions.pop(slot, None)
            self._free.append(slot)

    @property
    def open_sessions(self) -> int:
        return len(self._sessions)

    def copy_slot(self, src: int, dst: int) -> None:
        """Nothing to copy: the fork's first request finds the shared prefix in the server's cache."""

    def recover_ids(self, slot: int, request: dict, upto: int) -> list[int]:
        raise NotSupported(f"{self.backend} reports every id; nothing to recover")

    # -- streams

    def stream(self, request: dict, on_chunk: Callable[[dict], bool]) -> None:
        """Each event becomes one chunk per token it carries, then one with its end."""
        state = {"seen": 0, "text": ""}

        def on_event(event: dict) -> bool:
            for chunk in self._chunks(event, state):
                if on_chunk(chunk):
                    return True
            return False

        self.http.events(self.stream_path, request, on_event)
        for chunk in self._flush(state):
            if on_chunk(chunk):
                return

    def _flush(self, state: dict) -> list[dict]:
        """Chunks still owed when the stream ends (an end held back for a usage chunk)."""
        return []

    def _alt_text(self, token_id: int) -> str:
        """An alternative's text, without a request per alternative: the local
        tokenizer's, else a piece already decoded, else empty."""
        if self._local is not None:
            return self._local.decode([token_id])
        return self._pieces.get(token_id, "")

    def abort(self, request: dict) -> None:
        self.http.abort(request)

    def parse_chunk(self, chunk: dict, produced: int) -> Parsed:
        return Parsed(token=chunk.get("token"), finish=chunk.get("finish"), error=chunk.get("error"),
                      cached=chunk.get("cached"))

    def _end(self, finish: str | None, matched, last: Token | None, cached=None) -> list[dict]:
        """The final chunk; a stop on an end-of-generation id the server did not
        report as a token becomes that token (it names the id it matched)."""
        out = []
        if finish == "stop" and (last is None or last.id not in self.eos_token_ids):
            eos = matched if isinstance(matched, int) and matched in self.eos_token_ids else None
            if eos is None and self.eos_token_ids:
                eos = min(self.eos_token_ids)
            if eos is not None:
                out.append({"token": Token(eos, "", None)})
        if finish in ("abort", "error"):
            out.append({"error": f"the server aborted the request ({finish})"})
        elif finish is not None:
            out.append({"finish": finish, "cached": cached})
        elif cached is not None:
            out.append({"cached": cached})
        return out

    def _post_evaluation(self, path: str, body: dict) -> dict:
        """POST a one-token request; the server's own validation refusing it (HTTP 400)
        is `InvalidArgument`: nothing ran, so the session stays as it was."""
        try:
            return self.http.post(path, body)
        except ServerError as e:
            if e.status != 400:
                raise
            if "vocab" in str(e).lower():
                raise InvalidArgument(f"a token id is outside the vocabulary of {self.served_model}: {e}") from e
            raise InvalidArgument(f"the server refused the request before running it: {e}") from e

    def _check_model(self, event: dict) -> str | None:
        model = event.get("model")
        if model is not None and model != self.served_model:
            return (f"{self.url} now serves {model!r}, not {self.served_model!r}: this conversation's token ids "
                    "mean nothing to it. Reconnect to the new model")
        return None

