"""llama.cpp in process, through xllamacpp's server core, behind the contract.

Knows nothing of torch, transformers or Gradio. `xllamacpp.Server` runs
llama.cpp's server loop in this process: one slot per session, each with its
own KV (continuous batching decodes every busy slot in one step). Streams go
through `Server.handle_completions` with a callback (returning True cancels
the request); the same server also listens on 127.0.0.1, and the few calls
without an in-process entry point (tokenize, detokenize, slot save/restore,
the native one-token request) use that.

The tokenizer and chat template come from the GGUF itself. Sessions are
`engines.completions.CompletionSession`; the request and chunk formats are
llama-server's and live in `engines.llama_server`, shared with a llama-server
reached by URL.
"""

from __future__ import annotations

import atexit
import itertools
import os
import shutil
import sys
import tempfile
import threading
import weakref
from dataclasses import replace
from pathlib import Path

from .base import EngineError, InvalidArgument
from .completions import end_all_streams
from .gguf_meta import arch_value, kv_bytes_per_token, read_metadata, token_bytes
from .llama_server import LlamaServerEngine

_ENGINES: "weakref.WeakSet[LlamaCppEngine]" = weakref.WeakSet()


class LlamaCppEngine(LlamaServerEngine):
    """A GGUF model on llama.cpp's CPU (or GPU build's) backend, in this process."""

    backend = "llama.cpp"

    def __init__(
        self,
        gguf: str | os.PathLike,
        *,
        name: str | None = None,
        max_context: int | None = None,
        max_sessions: int = 4,
        chat_template: str | None = None,
        n_threads: int | None = None,
    ):
        if not isinstance(max_sessions, int) or isinstance(max_sessions, bool) or max_sessions < 1:
            raise InvalidArgument(f"max_sessions must be an int >= 1, got {max_sessions!r}")
        if max_context is not None and (not isinstance(max_context, int) or max_context < 2):
            raise InvalidArgument(f"max_context must be an int >= 2, got {max_context!r}")
        path = Path(gguf).expanduser()
        if not path.is_file():
            raise EngineError(f"GGUF file not found: {gguf}")
        meta = read_metadata(path)  # a truncated or foreign file fails here, not inside C++
        if meta.get("general.type", "model") != "model":
            raise EngineError(f"{path.name} is a GGUF {meta.get('general.type')!r}, not a model")
        try:
            import xllamacpp
        except ImportError as e:
            raise EngineError("the llama.cpp backend needs the xllamacpp package: pip install xllamacpp") from e
        trained = int(arch_value(meta, "context_length", 0) or 0) or 4096
        per_slot = min(trained, max_context) if max_context else trained
        self._slot_dir = tempfile.mkdtemp(prefix="llamacpp-slots-")
        p = xllamacpp.CommonParams()
        p.model.path = str(path)
        p.n_parallel = max_sessions
        p.n_ctx = per_slot * max_sessions  # split evenly: each slot gets `per_slot`
        p.kv_unified = False  # one pool for all slots made every sequence attend over all of it
        p.ctx_shift = False  # never drop history silently; ContextFull instead
        p.cache_ram_mib = 0  # no host-memory prompt cache: memory stays what the slots were given
        p.n_cache_reuse = 0
        p.swa_full = True  # full-size KV on sliding-window layers, so any prefix can be reused
        p.slot_save_path = self._slot_dir + "/"
        p.endpoint_slots = True
        p.verbosity = -1
        # $PLAYGROUND_THREADS: llama.cpp's threads spin at each step's barrier, and on a
        # 2-core machine shared with other work 2 threads ran 5-10x slower than 1.
        threads = n_threads or int(os.environ.get("PLAYGROUND_THREADS") or 0) or os.cpu_count() or 2
        p.cpuparams.n_threads = threads
        p.cpuparams_batch.n_threads = threads
        p.warmup = False
        try:
            server = xllamacpp.Server(p)
        except Exception as e:
            shutil.rmtree(self._slot_dir, ignore_errors=True)
            raise EngineError(f"llama.cpp could not load {path.name}: {e}") from e
        self._server = server
        self.gguf_path = path
        self._vocab = None  # (bytes per id, id per bytes), read on the first skipped id
        super().__init__(
            server.listening_address,
            name=name or meta.get("general.name") or path.stem,
            meta=meta,
            max_context=per_slot,
            max_sessions=max_sessions,
            chat_template=chat_template,
            kv_bytes_per_token=kv_bytes_per_token(meta),
        )
        _ENGINES.add(self)

    def parse_chunk(self, chunk: dict, produced: int):
        parsed = super().parse_chunk(chunk, produced)
        tok = parsed.token
        if tok is not None and tok.lost:
            ids = self._split_lost(tok)
            if ids:
                parsed.token = replace(tok, lost_ids=ids)
        return parsed

    def _split_lost(self, tok) -> tuple | None:
        """The ids the stream skipped before `tok`, read off the bytes it carries, when
        only one split of them into vocabulary entries fits; else None (the session
        then reads them from the slot). Each skipped token left the text ending
        inside a character: that is why the server held it back."""
        if self._vocab is None:
            pieces = token_bytes(self.gguf_path)
            by_bytes: dict = {}
            for i, b in enumerate(pieces):
                if b is not None:
                    by_bytes[b] = -1 if b in by_bytes else i  # -1: two ids share these bytes
            self._vocab = (pieces, by_bytes)
        pieces, by_bytes = self._vocab
        own = pieces[tok.id] if 0 <= tok.id < len(pieces) else None
        text = tok.text.encode()
        if not own or not text.endswith(own) or len(text) - len(own) < tok.lost:
            return None
        missing = text[: len(text) - len(own)]
        found = None
        for cuts in itertools.combinations(range(1, len(missing)), tok.lost - 1):
            bounds = (0, *cuts, len(missing))
            parts = [missing[a:b] for a, b in zip(bounds, bounds[1:])]
            ids = [by_bytes.get(p, -1) for p in parts]
            if -1 in ids or any(_complete(missing[:b]) for b in bounds[1:]):
                continue
            if found is not None:
                return None  # ambiguous
            found = tuple(ids)
        return found

    def stream(self, request: dict, on_chunk) -> None:
        """In process: llama.cpp calls `on_chunk` per token; True cancels the request."""
        self._server.handle_completions(request, on_chunk)

    def recover_ids(self, slot: int, request: dict, upto: int) -> list[int]:
        return self.slot_ids(slot)

    def slot_ids(self, slot: int) -> list[int]:
        """The ids a slot holds, read from a slot save file (format version 4:
        the 4th int32 is -1, the 6th the token count, the ids follow)."""
        import struct

        name = f"s{slot}-{threading.get_ident()}.bin"
        self.post(f"/slots/{slot}?action=save", {"filename": name})
        file = Path(self._slot_dir) / name
        try:
            with open(file, "rb") as f:
                head = f.read(24)
                words = struct.unpack("<6i", head)
                if words[3] != -1:
                    raise EngineError(f"unexpected slot file layout {words}")
                n = words[5]
                return list(struct.unpack(f"<{n}i", f.read(4 * n)))
        finally:
            file.unlink(missing_ok=True)

    def copy_slot(self, src: int, dst: int) -> None:
        name = f"copy{src}-{dst}-{threading.get_ident()}.bin"
        try:
            self.post(f"/slots/{src}?action=save", {"filename": name})
            self.post(f"/slots/{dst}?action=restore", {"filename": name})
        finally:
            (Path(self._slot_dir) / name).unlink(missing_ok=True)

    def shutdown(self) -> None:
        """End every stream (a thread left inside llama.cpp aborts the process at exit)."""
        for s in list(self._sessions.values()):
            s._close_stream()
        end_all_streams()
        shutil.rmtree(self._slot_dir, ignore_errors=True)


def _complete(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


@atexit.register
def _shutdown_all() -> None:
    for engine in list(_ENGINES):
        try:
            engine.shutdown()
        except Exception as e:  # at exit, report and go on
            print(f"llama.cpp shutdown: {e!r}", file=sys.stderr)
