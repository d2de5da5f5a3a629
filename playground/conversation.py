"""A conversation on one Session: turns <-> KV spans, exact ids, reuse by prefix.

Knows nothing of torch, tokenizers or Gradio: it plans with the engine's
`render` and `tokenize`, and moves the session with `seek`, `prefill` and
`decode_one`. Every action does the same three things:

1. render the conversation it wants (the template, exact reply ids spliced in);
2. keep the longest exact prefix already resident (ids, media by content: residency.py);
3. seek there and prefill the rest; then stream replies token by token.

One lock (one action at a time), one stop flag and one seed source (`turns.seeded`)
serve every action, the compare included.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import replace
from typing import Iterator, Sequence

from engines import ContextFull, EngineError, InvalidArgument, MultimodalInput, SamplingConfig

from . import branches, compare, transcript
from .checks import check_generation, check_index, check_parts
from .compare import COMPARE_MAX, COMPARE_MIN  # noqa: F401 - re-exported
from .prompt import Prompt
from .residency import Residency
from .spans import SpanBook
from .stopstrings import StopMatcher
from .turns import (FINISH_REASONS, ROLES, Began, Busy, Piece, Stats, TokenInfo, Turn,  # noqa: F401 - re-exported
                    plain_token_info, seeded)

RUNNING = "another action is running on this conversation; stop it first"


class Conversation:
    """Turns on top of one engine session, with exact-prefix KV reuse.

    Args:
        engine: any `engines.Engine`.
        system_prompt: becomes a system turn; None means no system turn.
        chat_template: a Jinja template string overriding the model's own.
        raw: skip the template; user text is prefilled as is (completion mode).
        top_alternatives: how many alternatives to record per generated token (0: none).
        lock: the one-action-at-a-time lock, when its owner outlives this conversation (a
            browser tab that swaps conversations); a new one by default.
    """

    def __init__(self, engine, system_prompt: str | None = None, chat_template: str | None = None,
                 raw: bool = False, top_alternatives: int = 5, lock: threading.Lock | None = None):
        if system_prompt is not None and not isinstance(system_prompt, str):
            raise InvalidArgument(f"system_prompt must be a str or None, got {type(system_prompt).__name__}")
        if chat_template is not None and not isinstance(chat_template, str):
            raise InvalidArgument("chat_template must be a Jinja template string or None")
        self.engine = engine
        self._prompt = Prompt(engine, chat_template, bool(raw))  # what the turns render to
        self.top_alternatives = top_alternatives
        self._root = branches.Root()
        self._turns: list[Turn] = []
        if system_prompt:
            self.turns = [Turn("system", [MultimodalInput.text(system_prompt)])]
        self.last_stats: Stats | None = None
        self.last_compare: tuple[int, list[Turn]] | None = None  # (turn index, replies) of the last compare
        self._forks: list = []  # a running compare's extra sessions (for stop)
        self.import_notes: list[str] = []
        self._session = None
        self._residency = Residency(engine.tokenize)
        self._spans = SpanBook()
        self._encoded: dict = {}  # media encoded for export (transcript.tree_to_messages), each once
        self.lock = lock or threading.Lock()  # held for the whole of an action, a stream included
        self._stop = threading.Event()  # the stop flag every stream loop checks (seek/prefill clear the session's)

    # ------------------------------------------------------------------ state

    @property
    def turns(self) -> list[Turn]:
        """The current branch, oldest turn first."""
        return self._turns

    @turns.setter
    def turns(self, path) -> None:
        # Making a path current keeps what it replaces: its new turns join the tree as
        # children, so a regenerated, edited or rewound turn stays behind as a sibling.
        self._turns = list(path)
        branches.graft(self._root, self._turns)

    @property
    def chat_template(self) -> str | None:
        return self._prompt.chat_template

    @chat_template.setter
    def chat_template(self, template: str | None) -> None:
        self._prompt.chat_template = template

    @property
    def raw(self) -> bool:
        return self._prompt.raw

    @raw.setter
    def raw(self, raw: bool) -> None:
        self._prompt.raw = bool(raw)

    @property
    def session(self):
        """The engine session, created on first use (`engines.Busy` when the engine has no room)."""
        if self._session is None:
            self._session = self.engine.create_session()
            self._residency.emptied()
        return self._session

    @property
    def position(self) -> int:
        return 0 if self._session is None else self._session.position

    @property
    def max_context(self) -> int:
        return self.engine.capacity.max_context_len

    @property
    def busy(self) -> bool:
        """Whether an action (a stream included) is running."""
        return self.lock.locked()

    def close(self) -> None:
        """Free the session (the transcript stays; the next action makes a new one)."""
        if self._session is not None:
            self._session.close()
            self._session = None

    # ------------------------------------------------------------------ actions
    # Streaming actions validate, then return a generator of text pieces; with
    # `events=True`, of typed events instead (turns.Began, then turns.Piece).

    def send(self, parts, sampling: SamplingConfig = SamplingConfig(), max_new_tokens: int = 64,
             stop_strings: Sequence[str] = (), *, events: bool = False) -> Iterator[str]:
        """Add a user turn and stream the reply. Raises before returning the generator."""
        parts = self._check_parts(parts)
        return self._start(self.turns + [Turn("user", parts)], None, sampling, max_new_tokens, stop_strings, events)

    def regenerate(self, sampling: SamplingConfig = SamplingConfig(), max_new_tokens: int = 64,
                   stop_strings: Sequence[str] = (), *, events: bool = False) -> Iterator[str]:
        """Replace the last reply with a new one; everything before it is reused."""
        turns = list(self.turns)
        if turns and turns[-1].role == "assistant":
            turns.pop()
        if not turns or turns[-1].role != "user":
            raise InvalidArgument("nothing to regenerate: the conversation has no user turn to answer")
        return self._start(turns, None, sampling, max_new_tokens, stop_strings, events)

    def edit(self, i: int, parts, sampling: SamplingConfig = SamplingConfig(), max_new_tokens: int = 64,
             stop_strings: Sequence[str] = (), *, events: bool = False) -> Iterator[str]:
        """Replace turn `i`, drop the turns after it, and reply again.

        Editing a user turn answers it anew; editing an assistant turn makes
        the new text its reply so far, and the model continues from there."""
        self._check_index(i)
        parts = self._check_parts(parts)
        old = self.turns[i]
        if old.role == "system":
            raise InvalidArgument("turn 0 is the system prompt; edit a user or assistant turn")
        if old.role == "user":
            return self._start(self.turns[:i] + [Turn("user", parts)], None, sampling, max_new_tokens,
                               stop_strings, events)
        if any(p.kind not in ("text", "tokens") for p in parts):
            raise InvalidArgument("an assistant turn can only be edited to text or tokens")
        ids = self.engine.tokenize(parts)
        reply = Turn("assistant", [MultimodalInput.text(self.engine.decode(ids))], token_ids=ids,
                     token_info=plain_token_info(self.engine, ids))
        return self._start(self.turns[:i], reply, sampling, max_new_tokens, stop_strings, events)

    def continue_reply(self, sampling: SamplingConfig = SamplingConfig(), max_new_tokens: int = 64,
                       stop_strings: Sequence[str] = (), *, events: bool = False) -> Iterator[str]:
        """Resume the last reply exactly where it ended (no synthetic message)."""
        if not self.turns or self.turns[-1].role != "assistant":
            raise InvalidArgument("no reply to continue: the last turn is not an assistant reply")
        return self._start(self.turns[:-1], self.turns[-1], sampling, max_new_tokens, stop_strings, events)

    def step(self, sampling: SamplingConfig = SamplingConfig()) -> str:
        """Decode exactly one more token of the current reply (starting one if needed)."""
        if self.turns and self.turns[-1].role == "assistant":
            gen = self.continue_reply(sampling, 1)
        elif self.turns and self.turns[-1].role == "user":
            gen = self._start(list(self.turns), None, sampling, 1, (), False)
        else:
            raise InvalidArgument("nothing to step: send a message first")
        return "".join(gen)

    def rewind(self, i: int, token_offset: int) -> None:
        """Cut assistant turn `i` after `token_offset` generated ids and drop later turns.

        Immediate: the session seeks to the cut now when it can (otherwise the
        next action rebuilds). `continue_reply` then resamples from the cut.
        The whole turn and what followed it stay behind as a sibling branch,
        unless that loses nothing (a cut that was never continued, cut again)."""
        self._check_index(i)
        turn = self.turns[i]
        if turn.role != "assistant":
            raise InvalidArgument(f"turn {i} is a {turn.role} turn; rewind takes an assistant turn")
        n = len(turn.token_ids)
        if isinstance(token_offset, bool) or not isinstance(token_offset, int) or not 0 <= token_offset <= n:
            raise InvalidArgument(f"token_offset {token_offset!r} is outside 0..{n} for turn {i}")
        with self._exclusive():
            ids = turn.token_ids[:token_offset]
            cut = replace(turn, parts=[MultimodalInput.text(self.engine.decode(ids))], token_ids=ids,
                          token_info=turn.token_info[:token_offset], children=[], chosen=None)
            siblings = self._parent(i).children
            if (token_offset == n and not turn.children) or branches.covered(turn, siblings):
                siblings[branches.index_of(siblings, turn)] = cut  # in place: nothing is lost
            self.turns = self.turns[:i] + [cut]
            if self._session is not None:
                keys, _ = self._residency.keys_of(self._prompt.open(self.turns[:i], cut))
                self.last_stats = self._residency.seek_if_prefix(self._session, keys) or self.last_stats
            self._update_spans()

    def drop_from(self, i: int) -> None:
        """Remove turns[i:] (Undo), their branch included; the siblings of turn `i`
        stay in the tree. The KV follows on the next action."""
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i <= len(self.turns):
            raise InvalidArgument(f"turn index {i!r} is outside 0..{len(self.turns)}")
        with self._exclusive():
            if i < len(self.turns):
                branches.prune(self._parent(i), self.turns[i])
            self.turns = self.turns[:i]

    def set_system_prompt(self, text: str | None) -> None:
        """Replace turn 0, the system prompt (None or "" removes it); the turns after it
        and their branches stay. The KV follows on the next action."""
        if text is not None and not isinstance(text, str):
            raise InvalidArgument(f"system_prompt must be a str or None, got {type(text).__name__}")
        with self._exclusive():
            head = Turn("system", [MultimodalInput.text(text)]) if text else None
            self.turns = branches.replace_head(self._root, self.turns, head)
            for t in self.turns:  # nothing after the change is resident as it was
                t.span, t.media_spans = None, []

    def stop(self) -> None:
        """Ask a running stream (in another thread) to end at the next token."""
        self._stop.set()
        if self._session is not None:
            self._session.stop()  # ends a decode step already waiting on the engine
        for fork in list(self._forks):  # a compare's other replies
            fork.stop()

    def reset(self) -> None:
        """Drop every turn and branch but the system prompt and empty the session."""
        with self._exclusive():
            self._root = branches.Root()
            self.turns = [Turn(t.role, t.parts) for t in self.turns if t.role == "system"]
            self.last_stats = None
            self.last_compare = None
            if self._session is not None:
                self._residency.emptied(self._session)
            self._update_spans()

    # ------------------------------------------------------------------ branches

    def siblings(self, i: int) -> list[str]:
        """The texts of the alternatives at turn `i`, the current one included, in creation order."""
        return [t.text for t in self._siblings(i)]

    def sibling_index(self, i: int) -> int:
        """Which of `siblings(i)` is current."""
        return branches.index_of(self._siblings(i), self.turns[i])

    def switch(self, i: int, k: int) -> None:
        """Make sibling `k` of turn `i` current, with everything that followed it on its branch.

        Immediate: the KV moves there now by the usual plan (keep the longest exact
        prefix, seek, prefill the rest), and `last_stats` says what was reused and
        prefilled. Between two replies to one prompt, none of the shared history is
        prefilled again."""
        sibs = self._siblings(i)
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < len(sibs):
            raise InvalidArgument(f"sibling {k!r} is outside 0..{len(sibs) - 1} for turn {i}")
        path = self.turns[:i] + branches.follow(sibs[k])
        with self._exclusive():
            target = self._residency.keys_of(self._prompt.current(path))
            if len(target[0]) > self.max_context:
                raise ContextFull(f"that branch needs {len(target[0])} tokens, but the context is {self.max_context}")
            stats = self._residency.move_to(self.session, *target)
            self.turns = path
            self.last_stats = stats
            self._update_spans()

    def compare(self, samplings: Sequence[SamplingConfig], max_new_tokens: int = 64,
                stop_strings: Sequence[str] = (), parts=None, *, events: bool = False) -> Iterator[tuple[int, str]]:
        """Sample 2-4 replies to the pending user turn from one prefill; yields `(k, piece)`
        for reply `k` as the replies stream, interleaved.

        The pending user turn is `parts` when given (a new message), else the last user
        turn (a reply it has stays as a sibling). Afterwards the replies are siblings
        and the first is current; each equals a solo `regenerate` with its sampling and
        seed. The prompt is prefilled once and the session forked for each other reply
        (`Session.fork`); on an engine that cannot fork, fresh sessions are prefilled
        again and `last_stats.extra_prefilled` says how many tokens that cost. Raises
        `engines.Busy` when the engine has no room for the
        extra sessions, and everything `send` raises, before returning the generator.
        """
        compare.check_samplings(samplings)
        before = compare.turns_before(self.turns, None if parts is None else Turn("user", self._check_parts(parts)))
        check_generation(samplings[0], max_new_tokens, stop_strings)
        self._not_busy()
        target = self._fitting_target(before, None)
        compare.check_room(self.engine, len(samplings), self._session is not None)
        self._stop.clear()
        gen = self._compare_stream(before, target, list(samplings), max_new_tokens, tuple(stop_strings))
        return gen if events else compare.pairs(gen)

    def _compare_stream(self, before, target, samplings, max_new_tokens, stop_strings):
        self._acquire()
        session, run = None, None
        try:
            samplings = [seeded(c) for c in samplings]
            t0 = time.perf_counter()
            self.last_stats = None
            session = self.session
            stats = self._residency.move_to(session, *target)  # the one prefill every reply shares
            start = session.position
            run = compare.Run(self.engine, session, target, samplings, stop_strings, stats, t0)
            self._forks = run.forks
            i = len(before)
            self.turns = before + [run.turns[0]]
            self._parent(i).children.extend(run.turns[1:])
            self.last_compare = (i, run.turns)
            self.last_stats = run.stats
            yield Began(tuple(self.turns), start, run.stats, tuple(run.turns), ("",) * len(run.turns), compare_at=i)
            for piece in run.pieces(start, max_new_tokens, self._stop, self._token_info):
                self.last_stats = piece.stats
                yield piece
        finally:
            try:
                self._forks = []
                if run is not None:
                    self.last_stats = run.close()
                    _done_for_now(session, run.replies[0].finish, max_new_tokens)
                if session is not None:
                    _clear_stop(session)
                    self._update_spans()
            finally:
                self.lock.release()

    def _siblings(self, i: int) -> list[Turn]:
        self._check_index(i)
        return self._parent(i).children

    def _parent(self, i: int):
        return self.turns[i - 1] if i else self._root

    # ------------------------------------------------------------------ export / import

    def to_messages(self) -> list[dict]:
        """JSON-ready messages: text, media (base64), exact reply ids, sampling, model identity;
        the current branch, each message carrying its alternatives (format: transcript.py)."""
        model = {"name": self.engine.name, "tokenizer": self.engine.fingerprint}
        return transcript.tree_to_messages(self.turns, self._root, model, self._encoded)

    @classmethod
    def from_messages(cls, engine, messages: list[dict], chat_template: str | None = None,
                      raw: bool = False, prefill: bool = True, lock: threading.Lock | None = None) -> "Conversation":
        """Rebuild a conversation. Reply ids are trusted only from the same tokenizer;
        otherwise the text is re-tokenised and `import_notes` says so. With
        `prefill`, the KV is rebuilt now, exactly as the exporting session held it."""
        conv = cls(engine, chat_template=chat_template, raw=raw, lock=lock)
        conv._root, path, conv.import_notes = transcript.messages_to_tree(engine, messages, engine.tokenize)
        conv.turns = path
        if prefill and conv.turns:
            try:
                conv._residency.move_to(conv.session, *conv._residency.keys_of(conv._prompt.current(conv.turns)))
            except BaseException:
                conv.close()
                raise
            conv._update_spans()
        return conv

    # ------------------------------------------------------------------ the stream loop

    def _start(self, before: list[Turn], reply: Turn | None, sampling, max_new_tokens, stop_strings, events):
        """Validate everything, then return the stream generator (nothing changed yet)."""
        check_generation(sampling, max_new_tokens, stop_strings)
        self._not_busy()
        target = self._fitting_target(before, reply)
        if reply is None:
            reply = Turn("assistant", [MultimodalInput.text("")], token_ids=[])
        self._stop.clear()
        gen = self._stream(before, reply, target, sampling, max_new_tokens, tuple(stop_strings))
        return gen if events else _texts(gen)

    def _stream(self, before, reply, target, sampling, max_new_tokens, stop_strings):
        self._acquire()
        session, finish = None, "stopped"
        try:
            # Continuing a reply keeps its random stream, so its recorded seed replays it.
            sampling = seeded(sampling, (reply.sampling or {}).get("seed") if reply.token_ids else None)
            t0 = time.perf_counter()
            self.last_stats = None
            session = self.session
            stats = self._residency.move_to(session, *target)  # 1. keep the exact prefix, prefill the rest
            self.turns = before + [reply]
            reply.sampling = sampling.to_dict()
            self.last_stats = stats
            start = session.position
            yield Began(tuple(self.turns), start, stats, (reply,), (reply.text,))
            matcher = StopMatcher(stop_strings)
            stop = self._stop
            finish, n, t_first = "length", 0, None
            while n < max_new_tokens:  # 2. one token per step
                if stop.is_set():
                    finish = "stopped"
                    break
                try:
                    r = session.decode_one(sampling)
                except ContextFull:
                    finish = "context_full"
                    break
                if r.is_terminal:
                    finish = "eos" if r.is_eos else "stopped"
                    break
                n += 1
                reply.token_ids.append(r.token_id)
                reply.token_info.append(self._token_info(session, r))
                visible, hit = matcher.feed(r.text_piece)
                reply.parts = [MultimodalInput.text(reply.text + visible)]
                now = time.perf_counter()
                t_first = t_first or now
                self.last_stats = replace(
                    stats, ttft_s=t_first - t0, new_tokens=n,
                    decode_tok_s=(n - 1) / (now - t_first) if n > 1 else None,
                )
                if hit:
                    finish = "stop_string"
                    break
                if visible:
                    yield Piece(visible, start + n, self.last_stats)
            tail = "" if finish == "stop_string" else matcher.flush()  # 3. text held back for a stop string
            if tail:
                reply.parts = [MultimodalInput.text(reply.text + tail)]
                yield Piece(tail, start + n, self.last_stats)
        except BaseException:
            finish = "stopped"  # closed by the consumer, or an error on its way out
            raise
        finally:
            try:
                if session is not None:
                    if self.last_stats is not None:
                        self.last_stats = replace(self.last_stats, finish_reason=finish)
                    _done_for_now(session, finish, max_new_tokens)
                    _clear_stop(session)
                    self._update_spans()
            finally:
                self.lock.release()

    # ------------------------------------------------------------------ planning

    def _fitting_target(self, before: list[Turn], reply: Turn | None):
        """The target's (keys, pieces); `ContextFull` when it leaves no room for a reply."""
        target = self._residency.keys_of(self._prompt.open(before, reply))
        if len(target[0]) >= self.max_context:
            raise ContextFull(
                f"the conversation needs {len(target[0])} tokens plus room for a reply, but the context is "
                f"{self.max_context}: rewind, edit or drop earlier turns, or reset"
            )
        return target

    def _update_spans(self) -> None:
        if self._session is None:
            for t in self.turns:
                t.span, t.media_spans = None, []
            return
        self._spans.assign(self.turns, self.position, (self.raw, self.chat_template), self._prompt.closed,
                           self._prompt.open, self._residency.keys_of)

    def _token_info(self, session, r) -> TokenInfo:
        if not self.top_alternatives or not hasattr(session, "logprob"):
            return TokenInfo(r.token_id, r.text_piece, None)
        top = tuple(session.top_logprobs(self.top_alternatives))
        return TokenInfo(r.token_id, self.engine.decode([r.token_id]), session.logprob(r.token_id), top)

    # ------------------------------------------------------------------ validation

    def _check_parts(self, parts) -> list[MultimodalInput]:
        return check_parts(self.engine, parts)

    def _check_index(self, i) -> None:
        check_index(i, len(self.turns))

    @contextlib.contextmanager
    def _exclusive(self):
        """Hold the action lock for an immediate action (no stream may start meanwhile)."""
        self._acquire()
        try:
            yield
        finally:
            self.lock.release()

    def _acquire(self) -> None:
        if not self.lock.acquire(blocking=False):
            raise EngineError(RUNNING)

    def _not_busy(self) -> None:
        if self.lock.locked():
            raise EngineError(RUNNING)


def _texts(events):
    """The public stream: the events' text pieces. Closing it closes the action's stream."""
    try:
        for e in events:
            if type(e) is Piece:
                yield e.text
    finally:
        events.close()


def _clear_stop(session) -> None:
    """A stream that ends never leaves a stop request behind."""
    try:
        session.seek(session.position)
    except EngineError:
        pass


def _done_for_now(session, finish: str | None, max_new_tokens: int) -> None:
    """A reply that ended at its budget or a stop string leaves the session idle, so an
    engine that decodes ahead of the reader stops (engines/base.py `Session.pause`). A
    one-token step skips it: stepping through a reply keeps one random stream."""
    if finish == "stop_string" or (finish == "length" and max_new_tokens > 1):
        session.pause()

