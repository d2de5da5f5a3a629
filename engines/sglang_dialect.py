"""SGLang's dialect of the serving-engine protocol (engines/openai_server.py).

Fields, from SGLang's own source and docs: native `POST /generate`
(python/sglang/srt/managers/io_struct.py, `GenerateReqInput`; docs.sglang.io
"Sampling Parameters"): `input_ids`, `sampling_params` (`max_new_tokens`,
`sampling_seed`, `top_k` -1 for all, `stop_token_ids`, `no_stop_trim`),
`return_logprob`, `top_logprobs_num`, `return_text_in_logprobs`, `stream`.
Each streamed `{text, output_ids, meta_info}` is cumulative unless the server
runs with `--incremental-streaming-output` (tokenizer_manager.py); `meta_info`
carries `finish_reason` ({"type", "matched"}), `completion_tokens`,
`cached_tokens`, and `output_token_logprobs` / `output_top_logprobs` as
[logprob, id, text]. `POST /tokenize` / `/detokenize`
(entrypoints/openai/serving_tokenize.py) return `tokens` / `text`.
/generate is used rather than /v1/completions because it reports every
alternative's id, which the token view and `next_logprobs` need.
"""

from __future__ import annotations

from .base import SamplingConfig
from .completions import Evaluated, Token
from .openai_server import OpenAIServerEngine, ServerError, _error_text


class SGLangEngine(OpenAIServerEngine):
    """SGLang, through its native /generate (it reports every alternative's id)."""

    backend = "sglang"
    stream_path = "/generate"

    def _server_detokenize(self, ids: list[int]) -> str:
        out = self.http.post("/detokenize", {"model": self.served_model, "tokens": ids, "skip_special_tokens": False})
        return out.get("text", "")

    def _sampling_params(self, sampling: SamplingConfig, seed: int, n: int) -> dict:
        """Every field of SGLang's SamplingParams that changes what is sampled."""
        return {
            "max_new_tokens": n, "min_new_tokens": 0, "temperature": sampling.temperature,
            "top_p": 1.0 if sampling.greedy else sampling.top_p,
            "top_k": -1 if sampling.greedy or not sampling.top_k else sampling.top_k, "min_p": 0.0,
            "repetition_penalty": sampling.repetition_penalty, "frequency_penalty": 0.0, "presence_penalty": 0.0,
            "stop": [], "stop_token_ids": sorted(self.eos_token_ids), "ignore_eos": False,
            "skip_special_tokens": False, "spaces_between_special_tokens": False, "no_stop_trim": True,
            "n": 1, "sampling_seed": seed,
        }

    def _body(self, ids, sampling, seed, n, k, stream) -> dict:
        return {"input_ids": list(ids), "sampling_params": self._sampling_params(sampling, seed, n),
                "return_logprob": True, "top_logprobs_num": k, "logprob_start_len": -1,
                "return_text_in_logprobs": True, "stream": stream}

    def stream_request(self, slot, ids, sampling, seed, n) -> dict:
        return self._body(ids, sampling, seed, n, self.top_k_logprobs, True)

    def evaluate(self, slot: int, ids: list[int], k: int) -> Evaluated:
        body = self._body(ids, SamplingConfig(), 0, 1, k, False)
        body["sampling_params"]["ignore_eos"] = True
        out = self._post_evaluation("/generate", body)
        if isinstance(out, list):
            out = out[0]
        tokens = _sglang_new_tokens(out, {"seen": 0, "text": ""})
        if isinstance(tokens, str):
            raise ServerError(tokens)
        if not tokens:
            raise ServerError(f"the server returned no token for a one-token request: {str(out)[:200]}")
        return Evaluated(tokens[0].id, tokens[0].top, (out.get("meta_info") or {}).get("cached_tokens"))

    def _chunks(self, event: dict, state: dict) -> list[dict]:
        tokens = _sglang_new_tokens(event, state)
        if isinstance(tokens, str):
            return [{"error": tokens}]
        out = [{"token": t} for t in tokens]
        if tokens:
            state["last"] = tokens[-1]
        meta = event.get("meta_info") or {}
        fr = meta.get("finish_reason")
        if fr:
            kind = fr.get("type") if isinstance(fr, dict) else str(fr)
            matched = fr.get("matched") if isinstance(fr, dict) else None
            out += self._end(kind, matched, state.get("last"), meta.get("cached_tokens"))
        return out


def _sglang_new_tokens(event: dict, state: dict):
    """The tokens `event` adds to what `state` saw (a list), or an error message (a str).
    Works whether the server streams cumulative outputs (its default) or deltas."""
    if "error" in event or event.get("object") == "error":
        return f"the server reported an error: {_error_text(event)}"
    meta = event.get("meta_info")
    ids = event.get("output_ids")
    if not isinstance(meta, dict) or not isinstance(ids, list):
        return f"unreadable output from the server: {str(event)[:200]}"
    done = meta.get("completion_tokens", len(ids))
    seen = state["seen"]
    new = ids[seen:] if len(ids) == done and done >= seen else ids  # cumulative, else a delta
    n = len(new)
    lps = (meta.get("output_token_logprobs") or [])[-n:] if n else []
    tops = (meta.get("output_top_logprobs") or [])[-n:] if n else []
    text = event.get("text") or ""
    prev = state["text"]
    piece = text[len(prev):] if text.startswith(prev) else text
    state["text"] = text if text.startswith(prev) else prev + text
    state["seen"] = seen + n
    tokens = []
    for i, tid in enumerate(new):
        lp = lps[i][0] if i < len(lps) and lps[i] else None
        top = tuple(sorted(((int(a[1]), a[2] if len(a) > 2 and a[2] is not None else "", float(a[0]))
                            for a in (tops[i] if i < len(tops) and tops[i] else ())), key=lambda a: -a[2]))
        tokens.append(Token(int(tid), piece if i == n - 1 else "", lp, top))
    return tokens
