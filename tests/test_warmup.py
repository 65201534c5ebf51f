"""The start-up warm-up (`vllm_cq.integration.warmup`): its synthetic steps are consistent vLLM-style
batches that go through the real families' write and attention (the CPU reference path here; the CUDA
kernels on a GPU), and the backend runs it once per layer shape, on CUDA only, never failing a start."""

from __future__ import annotations

import types

import pytest
import torch

from tests.kernels.test_cq_naive import random_codebooks
from vllm_cq.formats import get_format
from vllm_cq.integration import warmup
from vllm_cq.integration.families import CQFamily, CQLayerState, TernaryFamily
from vllm_cq.kernels.cq import write as cq_write
from vllm_cq.kernels.rope import build_cos_sin_cache


def test_synthetic_step_is_a_consistent_batch():
    md = warmup.synthetic_step([(18, 1), (40, 1), (300, 256)], 16, torch.device("cpu"))
    assert md.query_start_loc.tolist() == [0, 1, 2, 258] and md.seq_lens.tolist() == [18, 40, 300]
    assert md.max_query_len == 256 and md.num_decodes == 2  # the leading one-token sequences
    assert md.block_table.dtype == torch.int32 and md.query_start_loc.dtype == torch.int32
    slots = md.slot_mapping.tolist()
    assert len(slots) == 258 and len(set(slots)) == 258
    # each new token's slot is its position's slot in its own sequence's blocks
    for s, (lo, hi, length) in enumerate([(0, 1, 18), (1, 2, 40), (2, 258, 300)]):
        q_len = hi - lo
        for j, slot in enumerate(slots[lo:hi]):
            pos = length - q_len + j
            assert slot == int(md.block_table[s, pos // 16]) * 16 + pos % 16
    owned = [set(md.block_table[s, : -(-length // 16)].tolist()) for s, length in enumerate([18, 40, 300])]
    assert not (owned[0] & owned[1]) and not (owned[1] & owned[2]) and not (owned[0] & owned[2])


def cq_family(fmt_name: str, head_size: int) -> tuple[CQFamily, CQLayerState]:
    family = CQFamily.__new__(CQFamily)  # what write/attend read of it, without a vLLM config
    family.fmt, family.head_size, family.scale = get_format(fmt_name), head_size, head_size**-0.5
    k, v = random_codebooks(family.fmt, 2, head_size)
    return family, CQLayerState(k, v, k, v, build_cos_sin_cache(head_size, 512), True)


@pytest.mark.parametrize("window", [None, (16, 32)], ids=["codes", "window16"])
def test_run_steps_writes_the_codes_and_attends(window):
    """Both synthetic steps run through the cq family's write and attention (with the window's pages too):
    outputs of the steps' token counts, finite and not all zero."""
    family, st = cq_family("cq4", 32)
    slot_bytes = family.fmt.slot_bytes(32)
    outs = warmup.run_steps(family, st, 4, 2, 32, slot_bytes, torch.float32, torch.device("cpu"), window=window)
    prompt = max(cq_write.LARGE_STEP, 32)  # the mixed step reaches the write's prefill-sized form
    assert [tuple(o.shape) for o in outs] == [(prompt + 1, 4, 32), (2, 4, 32)]
    assert all(bool(torch.isfinite(o).all()) and float(o.abs().sum()) > 0 for o in outs)


def test_run_steps_with_the_ternary_family():
    fam = TernaryFamily(get_format("kvtq1"), 32, 32**-0.5, 2)
    outs = warmup.run_steps(fam, None, 4, 2, 32, get_format("kvtq1").slot_bytes(32), torch.float32, torch.device("cpu"))
    assert all(bool(torch.isfinite(o).all()) for o in outs)


def test_warm_up_once_per_shape_on_cuda_only_and_never_fails_a_start(monkeypatch, caplog):
    calls = []
    monkeypatch.setattr(warmup, "run_steps", lambda *a, **k: calls.append(k.get("window")))
    monkeypatch.setattr(warmup, "_DONE", set())
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    family, st = cq_family("cq1", 64)
    impl = types.SimpleNamespace(fmt=family.fmt, family=family, num_heads=4, num_kv_heads=2, head_size=64)
    plain = types.SimpleNamespace()
    windowed = types.SimpleNamespace(_vllm_cq_window=types.SimpleNamespace(window=128, block_size=32, cq_block_size=64))
    warmup.warm_up(impl, plain, st, torch.bfloat16, torch.device("cpu"))
    assert calls == []  # CPU: the reference path has nothing to compile
    for layer in (plain, plain, windowed, windowed):
        warmup.warm_up(impl, layer, st, torch.bfloat16, torch.device("cuda", 0))
    assert calls == [None, (128, 32)]  # once per layer shape

    def broken(*a, **k):
        raise RuntimeError("no kernel today")

    monkeypatch.setattr(warmup, "run_steps", broken)
    warmup.warm_up(impl, plain, st, torch.float16, torch.device("cuda", 0))
    assert "kernel warm-up for cq1 failed (RuntimeError: no kernel today)" in caplog.text
