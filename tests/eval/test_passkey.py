"""Passkey prompts: exact token length, the needle where it was asked for, the protocol's text, and
scoring by the answer's tokens. A tokenizer trained on the spot stands in for a model's (no vLLM)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_cq.eval import passkey as pk
from vllm_cq.tiny import sample_text, train_tokenizer


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(sample_text(), 512)


def needle_token_index(tok, trial: pk.Trial) -> int:
    """Index of the needle's first token: how many tokens the prompt's text before the needle has."""
    text = tok.decode(trial.prompt_ids, skip_special_tokens=True)
    needle = pk.NEEDLE.format(key=trial.key)
    return len(tok.encode(text[: text.index(needle)]))


@pytest.mark.parametrize("length", [256, 1000, 1024, 2048])
@pytest.mark.parametrize("depth", pk.DEPTHS)
def test_length_is_exact_and_text_follows_the_protocol(tok, length, depth):
    t = pk.build_trial(tok, length, depth, "12345")
    assert len(t.prompt_ids) + len(t.answer_ids) == length
    assert t.answer_ids == tok.encode(" 12345", add_special_tokens=False)
    text = tok.decode(t.prompt_ids, skip_special_tokens=True)
    assert text.startswith(pk.INTRO + "The grass is green.")
    assert text.endswith(pk.QUESTION)
    assert text.count(pk.NEEDLE.format(key="12345")) == 1
    assert text.count("12345") == 2  # only in the needle: the answer is not in the prompt


@settings(max_examples=20, deadline=None)
@given(length=st.integers(min_value=200, max_value=1500), key=st.integers(10000, 99999), d=st.sampled_from(pk.DEPTHS))
def test_length_is_exact_for_any_length(tok, length, key, d):
    t = pk.build_trial(tok, length, d, str(key))
    assert len(t.prompt_ids) + len(t.answer_ids) == length


@pytest.mark.parametrize("depth", pk.DEPTHS)
def test_needle_sits_at_the_requested_depth(tok, depth):
    length = 2048
    t = pk.build_trial(tok, length, depth, "54321")
    intro = len(tok.encode(pk.INTRO))
    filler_tokens = length - intro - len(tok.encode(pk.NEEDLE.format(key="54321"))) - len(tok.encode(pk.QUESTION))
    at = (needle_token_index(tok, t) - intro) / filler_tokens
    # at a sentence boundary: within one filler sentence (~6 tokens) of the exact depth
    assert abs(at - depth) < 0.02, (at, depth)
    assert abs(t.needle_depth - depth) < 0.02


def test_needle_moves_with_depth(tok):
    at = [needle_token_index(tok, pk.build_trial(tok, 1024, d, "11111")) for d in pk.DEPTHS]
    assert at == sorted(at) and len(set(at)) == len(at)


def test_needle_position_is_a_sentence_boundary():
    filler = pk.FILLER * 10
    for d in (0.0, 0.1, 0.33, 0.5, 0.9, 1.0):
        p = pk.needle_position(filler, d)
        assert p == 0 or p == len(filler) or filler[p - 2 : p] == ". "
        assert abs(p / len(filler) - d) <= 0.5 * max(len(s) + 2 for s in pk.FILLER.split(". ")) / len(filler)


def test_keys_are_seeded_five_digit_and_cover_every_depth():
    a = pk.make_keys([1024, 2048], 4, seed=0)
    assert a == pk.make_keys([1024, 2048], 4, seed=0)
    assert a != pk.make_keys([1024, 2048], 4, seed=1)
    assert len(a) == 2 * 5 * 4
    assert all(len(k) == 5 and k.isdigit() and k[0] != "0" for _n, _d, k in a)
    assert {(n, d) for n, d, _k in a} == {(n, d) for n in (1024, 2048) for d in pk.DEPTHS}


def test_build_trials_counts(tok):
    trials = pk.build_trials(tok, [300, 400], keys_per_depth=2, seed=3)
    assert len(trials) == 20
    assert [len(t.prompt_ids) + len(t.answer_ids) for t in trials] == [300] * 10 + [400] * 10


def test_too_short_is_refused(tok):
    with pytest.raises(ValueError, match="shorter than the prompt"):
        pk.build_trial(tok, 20, 0.5, "12345")


def test_scoring_needs_every_answer_token_first():
    ans = [7, 8, 9]
    assert pk.passed([7, 8, 9], ans)
    assert pk.passed([7, 8, 9, 1, 2], ans)  # anything may follow the key
    assert not pk.passed([7, 8], ans)  # cut short
    assert not pk.passed([7, 1, 9], ans)
    assert not pk.passed([1, 7, 8, 9], ans)  # must start with it
    assert pk.accuracy([(1024, True), (1024, False), (2048, True), (1024, True)]) == {1024: 2 / 3, 2048: 1.0}
