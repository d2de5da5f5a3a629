"""Decode several text sessions in one forward: the N replies of a compare.

Knows nothing of conversations or Gradio. Sessions of one `HFTextEngine` that
sit at the same position join a `BatchGroup`: their caches are copied once into
one cache with a row per session, and each decode step forwards one token per
row, so the weights are read once for all of them. A session takes its own
cache back (a copy of its row) before it does anything alone: seek, prefill,
a solo `decode_one` or a fork.

The step itself is each session's own `decode_one` (checks, sampling, EOS,
stop, detokenizing); only its forward is deferred and run with the others'.

Measured on the 2-core CPU here (SmolLM2-135M, fp32, 1,000 cached tokens): a
forward of 3 rows takes x1.8 the time of a forward of one, against x3 for three
forwards. The gain is smaller than on a GPU because MKL's 3-row matrix product
costs x1.5 its one-row product here, and attention reads each row's own cache.
"""

from __future__ import annotations

import torch

from . import kv
from .base import SessionPoisoned
from .cpu_tuning import use_threads

DUMMY_TOKEN = 0  # fed to a row whose session does not step; that row's result is thrown away


def batchable(engine) -> bool:
    """Plain text engines with growing caches only (`engine.batchable`, False where media
    blocks or M-RoPE state are per session); fixed-size compiled caches are not batched."""
    return getattr(engine, "batchable", False) is True and getattr(engine, "compiled", None) is None


class BatchGroup:
    """Sessions at one position whose caches are rows of one batched cache."""

    def __init__(self, engine, sessions):
        self.engine = engine
        self.members = list(sessions)  # row -> session, None once it left
        self.length = sessions[0].position  # cache length of every row
        self.collecting = False  # while True, a member's forward is queued, not run
        self.broken = False
        self._queued: dict[int, int] = {}  # row -> token id
        self.cache = kv.new_cache(engine.model.config)
        with torch.inference_mode():
            for i in range(len(sessions[0]._cache.layers)):
                keys = torch.cat([s._cache.layers[i].keys for s in sessions])
                values = torch.cat([s._cache.layers[i].values for s in sessions])
                self.cache.update(keys, values, i)
        for s in sessions:
            s._cache, s._batch = None, self

    def can_step(self, sessions) -> bool:
        return (not self.broken and all(s._batch is self for s in sessions)
                and all(s.position == self.length for s in sessions))

    def defer(self, session, ids: list[int]) -> bool:
        """Queue `session`'s one-token forward for `flush` (called from its `_run`)."""
        assert len(ids) == 1 and session.position == self.length and session in self.members
        self._queued[self.members.index(session)] = ids[0]
        session._ids.extend(ids)
        session._logits = None  # set by flush
        return True

    def flush(self) -> None:
        """One forward for every queued token; rows with nothing queued take a dummy."""
        if not self._queued:
            return
        eng = self.engine
        queued, self._queued = self._queued, {}
        tokens = [[queued.get(row, DUMMY_TOKEN)] for row in range(len(self.members))]
        try:
            with eng.lock, torch.inference_mode():
                use_threads(eng, 1)  # one token per row: a decode step (see decode_threads)
                ids = torch.tensor(tokens, dtype=torch.long, device=eng.device)
                out = eng.model(input_ids=ids, past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        except BaseException as e:
            self.broken = True
            for row in queued:
                self.members[row]._poisoned = e
            if not isinstance(e, Exception):
                raise
            raise SessionPoisoned(f"batched forward failed: {e!r}; call reset() to use these sessions again") from e
        self.length += 1
        for row in queued:
            self.members[row]._logits = out.logits[row, -1]

    def leave(self, session, keep: bool = True) -> None:
        """Give `session` its own cache back (a copy of its row when `keep`) and free its row.
        Once one member is left, it leaves too, so the batched cache is freed."""
        row = self.members.index(session)
        self.members[row] = None
        session._batch = None
        if keep and session.position:
            own = kv.new_cache(self.engine.model.config)
            with torch.inference_mode():
                for i, layer in enumerate(self.cache.layers):
                    own.update(layer.keys[row:row + 1, :, :session.position],
                               layer.values[row:row + 1, :, :session.position], i)
            session._cache = own
        else:
            session._cache = None
        rest = [s for s in self.members if s is not None]
        if len(rest) == 1 and not self.collecting:
            self.leave(rest[0])
        if not rest:
            self.cache = None


def decode_batch(engine, sessions, samplings):
    """`Engine.decode_batch` for `HFTextEngine`: one forward when the sessions can
    share one (same engine, same position, plain text), else one `decode_one` each."""
    group = _group_for(engine, sessions)
    if group is None:
        return [s.decode_one(c) for s, c in zip(sessions, samplings)]
    results = []
    group.collecting = True
    try:
        for s, c in zip(sessions, samplings):
            results.append(s.decode_one(c))
    finally:
        group.collecting = False
        group.flush()  # what was queued is forwarded even if a later session raised
    return results


def _group_for(engine, sessions):
    if len(sessions) < 2 or not batchable(engine) or len({id(s) for s in sessions}) != len(sessions):
        return None
    if any(getattr(s, "_engine", None) is not engine or s._closed or s._poisoned is not None
           or s._logits is None and s._batch is None for s in sessions):
        return None
    if len({s.position for s in sessions}) != 1:
        return None
    group = sessions[0]._batch
    if group is not None and group.can_step(sessions):
        return group
    for s in sessions:
        if s._batch is not None:
            s._batch.leave(s)
    if any(s._cache is None or not all(isinstance(layer, kv.GrowingLayer) for layer in s._cache.layers)
           for s in sessions):
        return None
    return BatchGroup(engine, sessions)
