"""Passkey retrieval: prompts of an exact token length, and greedy-answer scoring.

The protocol is the one in the evaluation README shared by the project (so numbers compare across
tools): an intro line, a filler sentence repeated, the needle inserted at depth d of the filler, then
the question. The length counts every token of the prompt plus the answer ` KEY`. A trial passes
when the greedy continuation starts with all tokens of ` KEY`. Keys are random 5-digit numbers.

Prompt building and scoring are pure functions of a Hugging Face (fast) tokenizer, so they are
tested without vLLM; `run` is the only part that needs an engine.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

INTRO = "There is an important pass key hidden inside a lot of irrelevant text. Find it and remember it.\n"
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = " What is the pass key? The pass key is"
DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)
# Greedy tokens generated beyond the answer's own: none, since only the first len(` KEY`) tokens are
# scored (a trial costs a prefill and a decode of about 6 tokens; the JSON shows what came instead).
EXTRA_NEW_TOKENS = 0


@dataclass
class Trial:
    """One passkey prompt. `needle_depth` is where the needle landed (fraction of filler characters
    before it); it differs from `depth` by at most half a filler sentence."""

    length: int
    depth: float
    key: str
    prompt_ids: list[int]
    answer_ids: list[int]
    needle_depth: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def make_keys(lengths: Sequence[int], keys_per_depth: int, seed: int = 0) -> list[tuple[int, float, str]]:
    """(length, depth, key) for every trial, seeded so every format sees the same keys."""
    rng = random.Random(seed)
    return [
        (length, depth, str(rng.randint(10000, 99999)))
        for length in lengths
        for depth in DEPTHS
        for _ in range(keys_per_depth)
    ]


def needle_position(filler: str, depth: float) -> int:
    """Character offset in `filler` of the sentence boundary nearest to `depth` of its length, so the
    needle never splits a sentence."""
    bounds = [0] + [i + 2 for i in range(len(filler)) if filler.startswith(". ", i)]
    if bounds[-1] != len(filler):
        bounds.append(len(filler))
    target = depth * len(filler)
    return min(bounds, key=lambda b: abs(b - target))


def prompt_text(filler: str, depth: float, key: str) -> tuple[str, int]:
    """The prompt text for a filler of given text, and the needle's character offset in the filler."""
    p = needle_position(filler, depth)
    return INTRO + filler[:p] + NEEDLE.format(key=key) + filler[p:] + QUESTION, p


def build_trial(tokenizer: Any, length: int, depth: float, key: str) -> Trial:
    """A prompt whose token count plus the answer's is exactly `length`.

    The filler is the repeated sentence cut at a token boundary of its own tokenization; the number of
    filler tokens is adjusted until the whole prompt, tokenized as one string (with the tokenizer's
    special tokens, as a server would), hits the target.
    """
    answer_ids = tokenizer.encode(" " + key, add_special_tokens=False)
    unit = len(tokenizer.encode(FILLER, add_special_tokens=False))
    reps = math.ceil(length / max(unit, 1)) + 2
    while True:  # enough filler tokens for the whole length (a joined repetition may take fewer tokens)
        stream = FILLER * reps
        enc = tokenizer(stream, add_special_tokens=False, return_offsets_mapping=True)
        ends = [int(e) for _s, e in enc["offset_mapping"]]
        if len(ends) >= length:
            break
        reps *= 2

    def attempt(m: int) -> tuple[list[int], int, str, int]:
        filler = stream[: ends[m - 1]] if m > 0 else ""
        text, p = prompt_text(filler, depth, key)
        ids = tokenizer.encode(text)
        return ids, len(ids) + len(answer_ids), filler, p

    _, base, _, _ = attempt(0)
    if base > length:
        raise ValueError(f"passkey length {length} is shorter than the prompt without filler ({base} tokens)")
    m, seen = length - base, set()
    while m not in seen and 0 <= m <= len(ends):
        seen.add(m)
        ids, n, filler, p = attempt(m)
        if n == length:
            return Trial(length, depth, key, ids, answer_ids, p / max(len(filler), 1))
        m += length - n
    for m2 in range(max(0, m - 4), min(len(ends), m + 4) + 1):  # a merge across a cut can cycle; look around
        ids, n, filler, p = attempt(m2)
        if n == length:
            return Trial(length, depth, key, ids, answer_ids, p / max(len(filler), 1))
    raise ValueError(f"could not build a passkey prompt of exactly {length} tokens (depth {depth}, key {key})")


def build_trials(tokenizer: Any, lengths: Sequence[int], keys_per_depth: int = 4, seed: int = 0) -> list[Trial]:
    """All trials: every length x depth x key (5 depths x 4 keys = 20 per length by default)."""
    return [build_trial(tokenizer, n, d, k) for n, d, k in make_keys(lengths, keys_per_depth, seed)]


def passed(output_ids: Sequence[int], answer_ids: Sequence[int]) -> bool:
    """True when the greedy continuation starts with every token of ` KEY`."""
    return list(output_ids[: len(answer_ids)]) == list(answer_ids)


def accuracy(results: Sequence[tuple[int, bool]]) -> dict[int, float]:
    """Fraction passed per length, from (length, passed) pairs."""
    by: dict[int, list[bool]] = {}
    for length, ok in results:
        by.setdefault(length, []).append(ok)
    return {n: sum(v) / len(v) for n, v in sorted(by.items())}


def run(
    llm: Any, trials: Sequence[dict[str, Any]], batch: int = 8, on_progress: Callable[[int], None] | None = None
) -> list[dict[str, Any]]:
    """Greedy answers from a vLLM engine, so retrieval goes through the decode path over the cache.
    Returns one record per trial: length, depth, key, passed, and the generated token ids."""
    from vllm import SamplingParams

    max_new = max(len(t["answer_ids"]) for t in trials) + EXTRA_NEW_TOKENS
    sp = SamplingParams(temperature=0.0, max_tokens=max_new)
    out: list[dict[str, Any]] = []
    for i in range(0, len(trials), batch):
        chunk = trials[i : i + batch]
        gens = llm.generate([{"prompt_token_ids": t["prompt_ids"]} for t in chunk], sp, use_tqdm=False)
        for t, g in zip(chunk, gens, strict=True):
            got = list(g.outputs[0].token_ids)
            out.append(
                {
                    "length": t["length"],
                    "depth": t["depth"],
                    "key": t["key"],
                    "passed": passed(got, t["answer_ids"]),
                    "output_ids": got,
                    "output_text": g.outputs[0].text,
                }
            )
        if on_progress:
            on_progress(len(chunk))
    return out
