"""vLLM's dialect of the serving-engine protocol (engines/openai_server.py).

Fields, from vLLM's own source: `POST /v1/completions`
(vllm/entrypoints/openai/completion/protocol.py, `CompletionRequest`): `prompt`
as a list of ids; `return_token_ids` puts each chunk's new ids in
`choices[0].token_ids`; `logprobs: k` with `return_tokens_as_token_ids` names
every alternative "token_id:N"; `stream_options.include_usage` ends the stream
with a `usage` chunk (`choices: []`) whose `prompt_tokens_details.cached_tokens`
is there when the server runs with `--enable-prompt-tokens-details`;
`stop_reason` names a stop token id (None for the tokenizer's own EOS). A chunk
may carry several tokens (completion/serving.py, `--stream-interval`).
`POST /tokenize` takes `prompt` or chat `messages` and returns `tokens`
(serve/tokenize/protocol.py); `POST /detokenize` returns `prompt`.
"""

from __future__ import annotations

from typing import Callable

from .base import SamplingConfig
from .completions import Evaluated, Token
from .openai_server import OpenAIServerEngine, ServerError, _error_text


def _token_id(name: str) -> int:
    """vLLM's "token_id:N" (return_tokens_as_token_ids) -> N."""
    if not isinstance(name, str) or not name.startswith("token_id:"):
        raise ServerError(f"expected a 'token_id:N' token name (return_tokens_as_token_ids), got {name!r}")
    return int(name[9:])



class VLLMEngine(OpenAIServerEngine):
    """vLLM's OpenAI-compatible server."""

    backend = "vllm"
    stream_path = "/v1/completions"

    def _server_detokenize(self, ids: list[int]) -> str:
        return self.http.post("/detokenize", {"model": self.served_model, "tokens": ids}).get("prompt", "")

    def _server_templater(self):
        return _VLLMTemplater(self)

    def _settings(self, sampling: SamplingConfig) -> dict:
        """Every sampling field vLLM reads, so neither its defaults nor the model's
        generation_config apply. Greedy wants top_p 1 and top_k -1 (older vLLM checks)."""
        greedy = sampling.greedy
        return {
            "temperature": sampling.temperature, "top_p": 1.0 if greedy else sampling.top_p,
            "top_k": -1 if greedy or not sampling.top_k else sampling.top_k, "min_p": 0.0,
            "repetition_penalty": sampling.repetition_penalty, "presence_penalty": 0.0, "frequency_penalty": 0.0,
            "n": 1, "use_beam_search": False, "stop": [], "stop_token_ids": sorted(self.eos_token_ids),
            "ignore_eos": False, "include_stop_str_in_output": False, "min_tokens": 0, "logit_bias": None,
            "bad_words": [],
            "skip_special_tokens": False, "spaces_between_special_tokens": False, "echo": False,
        }

    def _body(self, ids, sampling, seed, n, k, stream) -> dict:
        body = {"model": self.served_model, "prompt": list(ids), "max_tokens": n, "seed": seed, "logprobs": k,
                "return_tokens_as_token_ids": True, "return_token_ids": True, "stream": stream,
                **self._settings(sampling)}
        if stream:
            body["stream_options"] = {"include_usage": True}
        return body

    def stream_request(self, slot, ids, sampling, seed, n) -> dict:
        return self._body(ids, sampling, seed, n, self.top_k_logprobs, True)

    def evaluate(self, slot: int, ids: list[int], k: int) -> Evaluated:
        body = self._body(ids, SamplingConfig(), 0, 1, k, False)
        body["ignore_eos"] = True  # an end-of-generation id is still reported as the one token
        out = self._post_evaluation("/v1/completions", body)
        problem = self._check_model(out)
        if problem:
            raise ServerError(problem)
        tokens, finish, error, cached = _vllm_tokens(out, self._alt_text)
        if error:
            raise ServerError(error)
        if not tokens:
            raise ServerError(f"the server returned no token for a one-token request: {str(out)[:200]}")
        return Evaluated(tokens[0].id, tokens[0].top, cached)

    def _chunks(self, event: dict, state: dict) -> list[dict]:
        problem = self._check_model(event)
        if problem:
            return [{"error": problem}]
        tokens, finish, error, cached = _vllm_tokens(event, self._alt_text)
        if error:
            return [{"error": error}]
        out = [{"token": t} for t in tokens]
        if tokens:
            state["last"] = tokens[-1]
        if finish is not None:  # the usage chunk follows (include_usage): end there, with cached_tokens
            state["pending"] = (finish, (event.get("choices") or [{}])[0].get("stop_reason"))
        elif "usage" in event and "pending" in state:
            finish, matched = state.pop("pending")
            out += self._end(finish, matched, state.get("last"), cached)
        return out

    def _flush(self, state: dict) -> list[dict]:
        if "pending" not in state:  # a server that sent no usage chunk
            return []
        finish, matched = state.pop("pending")
        return self._end(finish, matched, state.get("last"))


def _vllm_tokens(event: dict, alt_text: Callable[[int], str]):
    """(tokens, finish_reason, error, cached_tokens) of one vLLM completion (chunk)."""
    if "error" in event or event.get("object") == "error":
        return [], None, f"the server reported an error: {_error_text(event)}", None
    usage = event.get("usage") or {}
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
    choices = event.get("choices")
    if not isinstance(choices, list):
        return [], None, f"unreadable completion from the server: {str(event)[:200]}", None
    if not choices:
        return [], None, None, cached  # the usage chunk
    c = choices[0]
    lp = c.get("logprobs") or {}
    names = lp.get("tokens") or []
    ids = c.get("token_ids")
    if ids is None:
        ids = [_token_id(t) for t in names]
    elif names and [_token_id(t) for t in names] != list(ids):
        return [], None, f"the server's token ids {ids} and log-probabilities {names} disagree", None
    tops = lp.get("top_logprobs") or []
    lps = lp.get("token_logprobs") or []
    tokens = []
    for i, tid in enumerate(ids):
        alts = tops[i] if i < len(tops) and tops[i] else {}
        top = tuple(sorted(((_token_id(k), alt_text(_token_id(k)), float(v)) for k, v in alts.items()),
                           key=lambda a: -a[2]))
        text = (c.get("text") or "") if i == len(ids) - 1 else ""
        tokens.append(Token(int(tid), text, lps[i] if i < len(lps) else None, top))
    return tokens, c.get("finish_reason"), None, cached


class _VLLMTemplater:
    """Renders with the server's own chat template: `/tokenize` with messages, then `/detokenize`."""

    def __init__(self, engine: VLLMEngine):
        self.engine = engine

    def apply_chat_template(self, messages, chat_template=None, tokenize=False, add_generation_prompt=True):
        body = {"model": self.engine.served_model, "messages": messages,
                "add_generation_prompt": add_generation_prompt, "add_special_tokens": False}
        if chat_template:
            body["chat_template"] = chat_template
        ids = self.engine.http.post("/tokenize", body).get("tokens") or []
        return self.engine._server_detokenize(ids)
