"""Real servers for the serving-engine tests: a llama-server in a child process,
and a small HTTP proxy in front of it that can fail, stall or cut requests.

The server is xllamacpp's llama-server core (the one `LlamaCppEngine` runs in
process) in a process of its own, so a test can kill it mid-stream and start
a fresh one on the same port, exactly as a real deployment would restart.
Nothing here mocks a response: every token comes from the model.

    python -m tests.servers --port 8080 [--host 0.0.0.0] [--gguf PATH] [--slots 4] [--ctx 4096] [--api-key K]
"""

from __future__ import annotations

import argparse
import atexit
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, path: str, timeout: float = 2.0):
    host = url.split("//", 1)[1]
    conn = http.client.HTTPConnection(host, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


class LlamaServerProcess:
    """A llama-server (xllamacpp) in a child process on 127.0.0.1:`port`."""

    def __init__(self, gguf: str | os.PathLike | None = None, *, port: int | None = None, slots: int = 4,
                 ctx_per_slot: int = 4096, threads: int | None = None, slot_save_path: str | None = None,
                 api_key: str | None = None):
        from engines.loading import default_gguf_path

        self.gguf = str(gguf or default_gguf_path())
        self.port = port or free_port()
        self.slots, self.ctx_per_slot, self.threads = slots, ctx_per_slot, threads or os.cpu_count() or 2
        # Slot files (tests measure a slot's KV by saving it) go to a directory of our own.
        if slot_save_path is None:
            slot_save_path = tempfile.mkdtemp(prefix="llama-server-slots-")
            atexit.register(shutil.rmtree, slot_save_path, True)
        self.slot_save_path = slot_save_path
        self.api_key = api_key
        self.proc: subprocess.Popen | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 120.0) -> None:
        args = [sys.executable, "-m", "tests.servers", "--gguf", self.gguf, "--port", str(self.port),
                "--slots", str(self.slots), "--ctx", str(self.ctx_per_slot), "--threads", str(self.threads),
                "--until-stdin-closes"]
        if self.slot_save_path:
            args += ["--slot-save-path", self.slot_save_path]
        if self.api_key:
            args += ["--api-key", self.api_key]
        self.proc = subprocess.Popen(args, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama-server exited: {self.proc.stderr.read().decode()[-2000:]}")
            try:
                if _get(self.url, "/health")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"llama-server did not answer /health within {timeout} s")

    def stop(self) -> None:
        """Kill the server process (SIGKILL: a crash, not a polite shutdown)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        self.proc = None

    def restart(self) -> None:
        """A fresh server on the same port: same model, empty caches."""
        self.stop()
        self.start()

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


# -- a proxy that injects faults in front of a real server


class FaultProxy:
    """Forwards HTTP to `upstream`, streaming responses through as they arrive.

    Faults, each for requests whose path starts with `path` (consumed once unless
    `times` says otherwise): `fail(path, status, body)` answers an error instead of
    forwarding; `stall(path, seconds)` waits before forwarding; `cut(path, after)`
    closes the client connection after `after` response lines of a stream;
    `garble(path)` answers 200 with a body that is not what the server said.
    """

    def __init__(self, upstream: str, port: int | None = None):
        self.upstream = upstream.split("//", 1)[1]
        self._faults: list[dict] = []
        self._lock = threading.Lock()
        self.requests: list[tuple[str, dict | None]] = []  # (path, JSON body) of every request seen
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                proxy._handle(self, "GET")

            def do_POST(self):
                proxy._handle(self, "POST")

        self._server = ThreadingHTTPServer(("127.0.0.1", port or 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _add(self, **fault) -> None:
        fault.setdefault("times", 1)
        with self._lock:
            self._faults.append(fault)

    def fail(self, path: str, status: int = 500, body: str = '{"error": {"message": "injected failure"}}',
             times: int = 1) -> None:
        self._add(kind="fail", path=path, status=status, body=body, times=times)

    def stall(self, path: str, seconds: float, times: int = 1) -> None:
        self._add(kind="stall", path=path, seconds=seconds, times=times)

    def cut(self, path: str, after: int, times: int = 1) -> None:
        self._add(kind="cut", path=path, after=after, times=times)

    def garble(self, path: str, body: str = '{"unexpected": true}', times: int = 1) -> None:
        self._add(kind="garble", path=path, body=body, times=times)

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()

    def _take(self, path: str) -> dict | None:
        with self._lock:
            for f in self._faults:
                if path.startswith(f["path"]):
                    f["times"] -= 1
                    if f["times"] <= 0:
                        self._faults.remove(f)
                    return f
        return None

    def _handle(self, h: BaseHTTPRequestHandler, method: str) -> None:
        body = h.rfile.read(int(h.headers.get("Content-Length") or 0)) if method == "POST" else None
        try:
            parsed = json.loads(body) if body else None
        except ValueError:
            parsed = None
        self.requests.append((h.path, parsed))
        fault = self._take(h.path)
        if fault and fault["kind"] == "stall":
            time.sleep(fault["seconds"])
        if fault and fault["kind"] in ("fail", "garble"):
            data = fault["body"].encode()
            h.send_response(fault.get("status", 200))
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            h.wfile.write(data)
            return
        conn = http.client.HTTPConnection(self.upstream, timeout=600)
        try:
            headers = {k: v for k, v in h.headers.items() if k.lower() not in ("host", "connection")}
            conn.request(method, h.path, body, headers)
            resp = conn.getresponse()
        except OSError as e:  # the upstream is down: what a gateway in front of it would say
            data = json.dumps({"error": {"message": f"upstream unreachable: {e}"}}).encode()
            h.send_response(502)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            h.wfile.write(data)
            return
        try:
            h.send_response(resp.status)
            for k, v in resp.getheaders():
                if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                    h.send_header(k, v)
            h.send_header("Connection", "close")
            h.end_headers()
            lines = 0
            while True:
                line = resp.readline()
                if not line:
                    break
                h.wfile.write(line)
                h.wfile.flush()
                if line.strip():
                    lines += 1
                if fault and fault["kind"] == "cut" and lines >= fault["after"]:
                    break  # drop the client mid-stream, as a dying server would
        except OSError:
            pass  # the client went away (a stop): closing upstream cancels the request there
        finally:
            conn.close()
            h.close_connection = True


def _serve(args) -> None:
    import xllamacpp

    p = xllamacpp.CommonParams()
    p.model.path = args.gguf
    p.n_parallel = args.slots
    p.n_ctx = args.ctx * args.slots
    p.kv_unified = False
    p.ctx_shift = False
    p.cache_ram_mib = 0
    p.n_cache_reuse = 0
    p.swa_full = True
    p.endpoint_slots = True
    p.verbosity = -1
    p.warmup = False
    p.cpuparams.n_threads = args.threads
    p.cpuparams_batch.n_threads = args.threads
    p.hostnames = [args.host]
    p.port = args.port
    if args.slot_save_path:
        p.slot_save_path = args.slot_save_path.rstrip("/") + "/"
    if args.api_key:
        p.api_keys = [args.api_key]
    server = xllamacpp.Server(p)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    print(f"llama-server (xllamacpp) on {server.listening_address}, {args.slots} slots of {args.ctx} tokens",
          file=sys.stderr, flush=True)
    if args.until_stdin_closes:
        sys.stdin.read()  # the parent closed our stdin (or died): stop
    else:
        while True:
            signal.pause()
    os._exit(0)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", default=None)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8080)
    ap.add_argument("--slots", type=int, default=4)
    ap.add_argument("--ctx", type=int, default=4096, help="context per slot")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--slot-save-path", default=None)
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--until-stdin-closes", action="store_true", help="exit when stdin closes (a parent's pipe)")
    args = ap.parse_args(argv)
    if args.gguf is None:
        sys.path.insert(0, str(ROOT))
        from engines.loading import default_gguf_path

        args.gguf = str(default_gguf_path())
    _serve(args)


if __name__ == "__main__":
    main()


# -- vLLM and SGLang as their sources describe them (neither runs here)


class StubOpenAIServer:
    """Answers as vLLM or SGLang do, with the request and response shapes of their
    sources (engines/vllm_dialect.py and sglang_dialect.py cite them), over real HTTP.

    Its "model" is arithmetic, so tests have an oracle: `next_top(tape)` is the
    distribution after a tape; greedy takes its first entry and a seeded sample
    takes entry `seed % 3`. The tokenizer is one id per character (100 + code
    point) plus three special tokens. Knobs: `per_chunk` tokens per vLLM chunk
    (its --stream-interval), `incremental` (SGLang's --incremental-streaming-output),
    `report_eos` (whether the stopping id appears among the output ids), `model`
    (what responses name), `fail_stream` (an error event instead of tokens).
    """

    SPECIAL = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
    EOS = 2
    VOCAB = 100 + 0x30000

    def __init__(self, kind: str, max_model_len: int = 512):
        self.kind, self.max_model_len = kind, max_model_len
        self.model = "stub/model-1b"
        self.served = self.model
        self.per_chunk, self.incremental, self.report_eos = 1, False, True
        self.eos_every = 0  # > 0: the greedy token is EOS after tapes whose length % eos_every == 0
        self.fail_stream = False
        self.requests: list[tuple[str, dict]] = []
        self._last_prompt: list[int] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                stub._route(self, "GET", None)

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
                stub._route(self, "POST", body)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    # -- the "model" and tokenizer

    def encode(self, text: str) -> list[int]:
        ids, i = [], 0
        while i < len(text):
            for s, t in self.SPECIAL.items():
                if text.startswith(s, i):
                    ids.append(t)
                    i += len(s)
                    break
            else:
                ids.append(100 + ord(text[i]))
                i += 1
        return ids

    def decode(self, ids) -> str:
        names = {v: k for k, v in self.SPECIAL.items()}
        return "".join(names.get(t) or chr(t - 100) for t in ids)

    def next_top(self, tape) -> list[tuple[int, float]]:
        if self.eos_every and len(tape) % self.eos_every == 0:
            return [(self.EOS, -0.1), (100 + ord("."), -2.5), (100 + ord("!"), -3.0)]
        h = (sum((i + 1) * t for i, t in enumerate(tape[-8:])) * 31 + len(tape)) % 26
        return [(100 + ord("a") + (h + 7 * j) % 26, -0.5 - j * 0.7) for j in range(6)]

    def sample(self, tape, temperature: float, seed) -> tuple[int, list]:
        top = self.next_top(tape)
        pick = 0 if temperature == 0 else (int(seed or 0) + len(tape)) % 3
        return top[pick][0], top

    # -- HTTP

    def _send(self, h, status: int, obj) -> None:
        data = json.dumps(obj).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    def _route(self, h, method: str, body) -> None:
        path = h.path
        self.requests.append((path, body))
        if path == "/v1/models":
            card = {"id": self.served, "object": "model", "owned_by": self.kind, "max_model_len": self.max_model_len}
            return self._send(h, 200, {"object": "list", "data": [card]})
        if path == "/version" and self.kind == "vllm":
            return self._send(h, 200, {"version": "0.11.0"})
        if path == "/get_model_info" and self.kind == "sglang":
            return self._send(h, 200, {"model_path": self.served, "tokenizer_path": self.served,
                                       "is_generation": True})
        if path == "/tokenize":
            if "messages" in body:  # vLLM's TokenizeChatRequest: ChatML, as the stub's template
                text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in body["messages"])
                if body.get("add_generation_prompt", True):
                    text += "<|im_start|>assistant\n"
                ids = self.encode(text)
            else:
                ids = self.encode(body["prompt"])
                if body.get("add_special_tokens", True) and self.kind == "vllm":
                    ids = [self.SPECIAL["<|im_start|>"]] + ids  # a tokenizer that adds a BOS by itself
            return self._send(h, 200, {"tokens": ids, "count": len(ids), "max_model_len": self.max_model_len})
        if path == "/detokenize":
            key = "prompt" if self.kind == "vllm" else "text"
            return self._send(h, 200, {key: self.decode(body["tokens"])})
        if path == "/v1/completions" and self.kind == "vllm":
            return self._vllm(h, body)
        if path == "/generate" and self.kind == "sglang":
            return self._sglang(h, body)
        self._send(h, 404, {"object": "error", "message": f"no route {path}", "type": "NotFound", "code": 404})

    def _run(self, prompt: list[int], n: int, temperature: float, seed, stop_ids, ignore_eos: bool):
        """[(id, top)] generated, the finish reason, the matched stop id, and cached prompt tokens."""
        if len(prompt) + n > self.max_model_len:
            return None
        bad = [t for t in prompt if not 0 <= t < self.VOCAB]
        if bad:
            return f"Token id {bad[0]} is out of vocabulary"
        cached = 0
        while cached < min(len(prompt), len(self._last_prompt)) and prompt[cached] == self._last_prompt[cached]:
            cached += 1
        self._last_prompt = list(prompt)
        tape, out = list(prompt), []
        for _ in range(n):
            t, top = self.sample(tape, temperature, seed)
            if not ignore_eos and t in stop_ids:
                return out, "stop", t, cached, top
            out.append((t, top))
            tape.append(t)
        return out, "length", None, cached, None

    def _sse(self, h, events) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "text/event-stream")
        h.send_header("Connection", "close")
        h.end_headers()
        try:
            for e in events:
                h.wfile.write(b"data: " + json.dumps(e).encode() + b"\n\n")
                h.wfile.flush()
            h.wfile.write(b"data: [DONE]\n\n")
        except OSError:
            pass
        h.close_connection = True

    def _vllm(self, h, body) -> None:
        run = self._run(body["prompt"], body["max_tokens"], body["temperature"], body.get("seed"),
                        set(body.get("stop_token_ids") or []) | {self.EOS}, body.get("ignore_eos", False))
        if run is None or isinstance(run, str):
            msg = run or f"This model's maximum context length is {self.max_model_len} tokens"
            return self._send(h, 400, {"error": {"message": msg, "type": "BadRequestError", "code": 400}})
        out, finish, matched, cached, eos_top = run
        k = body.get("logprobs") or 0

        def logprobs(items):
            return {"text_offset": [0] * len(items), "token_logprobs": [top[0][1] if top[0][0] == t else -1.0
                                                                        for t, top in items],
                    "tokens": [f"token_id:{t}" for t, _ in items],
                    "top_logprobs": [{f"token_id:{i}": lp for i, lp in top[: k + 1]} for _, top in items]}

        if finish == "stop" and self.report_eos:
            out = out + [(matched, eos_top)]
        stop_reason = matched if matched != self.EOS else None  # vLLM: None when it was the tokenizer's EOS
        if not body.get("stream"):
            choice = {"index": 0, "text": self.decode(t for t, _ in out), "logprobs": logprobs(out),
                      "finish_reason": finish, "stop_reason": stop_reason, "token_ids": [t for t, _ in out]}
            usage = {"prompt_tokens": len(body["prompt"]), "completion_tokens": len(out),
                     "total_tokens": len(body["prompt"]) + len(out), "prompt_tokens_details": {"cached_tokens": cached}}
            return self._send(h, 200, {"id": "cmpl-1", "object": "text_completion", "model": self.model,
                                       "choices": [choice], "usage": usage})

        def events():
            if self.fail_stream:
                yield {"error": {"message": "CUDA out of memory", "type": "InternalServerError", "code": 500}}
                return
            groups = [out[i:i + self.per_chunk] for i in range(0, len(out), self.per_chunk)] or [[]]
            for g, items in enumerate(groups):
                last = g == len(groups) - 1
                yield {"id": "cmpl-1", "object": "text_completion", "model": self.model, "choices": [{
                    "index": 0, "text": self.decode(t for t, _ in items if t != self.EOS), "logprobs": logprobs(items),
                    "finish_reason": finish if last else None, "stop_reason": stop_reason if last else None,
                    "token_ids": [t for t, _ in items]}]}
            if (body.get("stream_options") or {}).get("include_usage"):
                yield {"id": "cmpl-1", "object": "text_completion", "model": self.model, "choices": [],
                       "usage": {"prompt_tokens": len(body["prompt"]), "completion_tokens": len(out),
                                 "total_tokens": len(body["prompt"]) + len(out),
                                 "prompt_tokens_details": {"cached_tokens": cached}}}

        self._sse(h, events())

    def _sglang(self, h, body) -> None:
        sp = body["sampling_params"]
        run = self._run(body["input_ids"], sp["max_new_tokens"], sp["temperature"], sp.get("sampling_seed"),
                        set(sp.get("stop_token_ids") or []) | {self.EOS}, sp.get("ignore_eos", False))
        if run is None or isinstance(run, str):
            return self._send(h, 400, {"object": "error", "message": run or "input too long",
                                       "type": "BadRequestError", "code": 400})
        out, finish, matched, cached, eos_top = run
        if finish == "stop" and self.report_eos:
            out = out + [(matched, eos_top)]
        k = body.get("top_logprobs_num") or 0

        def meta(items, done, fr):
            return {"id": "req-1", "finish_reason": fr, "prompt_tokens": len(body["input_ids"]),
                    "completion_tokens": done, "cached_tokens": cached,
                    "output_token_logprobs": [[top[0][1], t, self.decode([t])] for t, top in items],
                    "output_top_logprobs": [[[lp, i, self.decode([i])] for i, lp in top[:k]] for _, top in items]}

        fr = {"type": "stop", "matched": matched} if finish == "stop" else {"type": "length", "length": len(out)}
        if not body.get("stream"):
            return self._send(h, 200, {"text": self.decode(t for t, _ in out), "output_ids": [t for t, _ in out],
                                       "meta_info": meta(out, len(out), fr)})

        def events():
            if self.fail_stream:
                yield {"object": "error", "message": "scheduler crashed", "type": "InternalServerError", "code": 500}
                return
            for i in range(max(1, len(out))):  # an immediate stop still sends one event
                last = i >= len(out) - 1
                items = out[i:i + 1] if self.incremental else out[: i + 1]
                text = self.decode(t for t, _ in items if t != self.EOS)
                yield {"text": text, "output_ids": [t for t, _ in items],
                       "meta_info": meta(items, i + 1, fr if last else None)}

        self._sse(h, events())
