"""Perplexity math from given prompt logprobs, window cutting, and the engine glue with a fake engine."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from vllm_cq.eval import ppl


def test_windows_do_not_overlap_and_cover_the_stream():
    ids = list(range(10))
    assert ppl.windows(ids, 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert ppl.windows(ids, 4, max_tokens=8) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert ppl.windows(list(range(9)), 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]  # a 1-token tail scores nothing
    assert ppl.windows(ids, 100) == [ids]
    with pytest.raises(ValueError):
        ppl.windows(ids, 1)


def test_window_nll_skips_the_first_token_and_reads_each_tokens_own_logprob():
    ids = [5, 6, 7]
    # vLLM: None for position 0, then {token_id: Logprob} (may hold other tokens too)
    lps = [None, {6: SimpleNamespace(logprob=-1.0), 9: SimpleNamespace(logprob=-0.1)}, {7: -2.0}]
    assert ppl.window_nll(ids, lps) == (3.0, 2)
    with pytest.raises(ValueError):
        ppl.window_nll(ids, lps[:2])
    with pytest.raises(ValueError):
        ppl.window_nll(ids, [None, None, {7: -2.0}])


def test_perplexity_of_a_uniform_model_is_its_vocabulary():
    v = 50
    nll, n = ppl.window_nll([0, 1, 2, 3, 4], [None] + [{t: -math.log(v)} for t in (1, 2, 3, 4)])
    assert ppl.perplexity(nll, n) == pytest.approx(v)
    assert ppl.perplexity(4.0, 2) == pytest.approx(math.exp(2.0))
    with pytest.raises(ValueError):
        ppl.perplexity(0.0, 0)


class FakeLLM:
    """Scores token t with log p = -t/10, position 0 without a logprob, like vLLM's prompt_logprobs."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def generate(self, prompts, sp, use_tqdm=False):
        assert sp.prompt_logprobs == 0 and sp.max_tokens == 1
        self.calls.append(len(prompts))
        return [
            SimpleNamespace(
                prompt_logprobs=[None] + [{t: SimpleNamespace(logprob=-t / 10)} for t in p["prompt_token_ids"][1:]]
            )
            for p in prompts
        ]


def test_score_sums_over_windows_in_batches():
    wins = ppl.windows(list(range(1, 11)), 3)  # [1,2,3] [4,5,6] [7,8,9] [10] -> last dropped
    llm, seen = FakeLLM(), []
    nll, n = ppl.score(llm, wins, batch=2, on_progress=seen.append)
    assert n == 6  # 2 scored per 3-token window
    assert nll == pytest.approx((2 + 3 + 5 + 6 + 8 + 9) / 10)
    assert llm.calls == [2, 1] and seen == [2, 1]
