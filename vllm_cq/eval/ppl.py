"""Perplexity over non-overlapping windows, from vLLM's prompt logprobs.

Each window is an independent prompt, so its first token has no logprob (nothing precedes it): a
window of W tokens scores W - 1 of them. Windows do not overlap, as in the shared evaluation protocol,
so every scored token sees between 1 and W - 1 tokens of context. The last, shorter window is scored
too (when it has at least 2 tokens).

For a cq format the backend writes each step's codes first and then attends over the stored codes,
in prefill as in decode, so prompt logprobs measure the quantized cache (path: prefill over stored
codes). Only the engine call (`score`) needs vLLM; the math is pure and tested on its own.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

DEFAULT_WINDOW = 1024


def windows(ids: Sequence[int], window: int = DEFAULT_WINDOW, max_tokens: int | None = None) -> list[list[int]]:
    """Cut a token stream (its first `max_tokens` tokens, or all) into non-overlapping windows."""
    if window < 2:
        raise ValueError(f"perplexity window must be at least 2 tokens, got {window}")
    ids = list(ids[:max_tokens] if max_tokens else ids)
    return [ids[i : i + window] for i in range(0, len(ids), window) if len(ids[i : i + window]) >= 2]


def _logprob(entry: Any, token_id: int) -> float:
    """vLLM gives {token_id: Logprob} per position (float values accepted too, for tests)."""
    v = entry[token_id]
    return float(getattr(v, "logprob", v))


def window_nll(prompt_ids: Sequence[int], prompt_logprobs: Sequence[Any]) -> tuple[float, int]:
    """(sum of -log p, tokens scored) for one window; position 0 has no logprob and is skipped."""
    if len(prompt_logprobs) != len(prompt_ids):
        raise ValueError(f"{len(prompt_logprobs)} prompt logprobs for {len(prompt_ids)} prompt tokens")
    nll, n = 0.0, 0
    for tid, entry in zip(prompt_ids[1:], prompt_logprobs[1:], strict=True):
        if entry is None:
            raise ValueError("missing prompt logprob after the first token")
        nll -= _logprob(entry, tid)
        n += 1
    return nll, n


def perplexity(nll: float, n: int) -> float:
    """exp(mean negative log-likelihood)."""
    if n <= 0:
        raise ValueError("no tokens scored")
    return math.exp(nll / n)


def score(
    llm: Any, wins: Sequence[Sequence[int]], batch: int = 8, on_progress: Callable[[int], None] | None = None
) -> tuple[float, int]:
    """(total -log p, tokens scored) over all windows, through a vLLM engine (one token generated per
    window: vLLM needs at least one; its logprob is not used)."""
    from vllm import SamplingParams

    sp = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    nll, n = 0.0, 0
    for i in range(0, len(wins), batch):
        chunk = wins[i : i + batch]
        outs = llm.generate([{"prompt_token_ids": list(w)} for w in chunk], sp, use_tqdm=False)
        for w, o in zip(chunk, outs, strict=True):
            a, b = window_nll(w, o.prompt_logprobs)
            nll, n = nll + a, n + b
        if on_progress:
            on_progress(len(chunk))
    return nll, n
