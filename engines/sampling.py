"""Turn pending logits into one token id, using transformers' logits processors.

Knows nothing of sessions or caches: a pure function of logits, history,
settings and a generator.
"""

from __future__ import annotations

import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from .base import SamplingConfig


def build_processors(cfg: SamplingConfig) -> LogitsProcessorList:
    """The same chain, in the same order, as `generate()` builds for these settings."""
    procs = LogitsProcessorList()
    if cfg.repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(cfg.repetition_penalty))
    if cfg.greedy:
        return procs
    if cfg.temperature != 1.0:
        procs.append(TemperatureLogitsWarper(cfg.temperature))
    if cfg.top_k > 0:
        procs.append(TopKLogitsWarper(cfg.top_k))
    if cfg.top_p < 1.0:
        procs.append(TopPLogitsWarper(cfg.top_p))
    return procs


def sample_token(
    logits: torch.Tensor,
    history: list[int],
    cfg: SamplingConfig,
    processors: LogitsProcessorList,
    generator: torch.Generator,
) -> int:
    """Pick one id from 1-D `logits`. `history` feeds the repetition penalty."""
    scores = logits.float().unsqueeze(0)
    if len(processors):
        # Only the repetition penalty reads the history; don't build it per token otherwise.
        seen = history if cfg.repetition_penalty != 1.0 else history[-1:]
        ids = torch.tensor([seen], dtype=torch.long, device=scores.device)
        scores = processors(ids, scores)
    if cfg.greedy:
        return int(scores.argmax(-1))
    probs = torch.softmax(scores, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))
