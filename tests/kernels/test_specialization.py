"""The per-step Triton kernels compile once per model shape, not once per batch: token and sequence
counts are left unspecialized (Triton otherwise compiles a new copy for == 1 and for multiples of 16),
so serving never stalls on a compile when a batch of a new size arrives."""

from __future__ import annotations

import os

import pytest
import torch

from vllm_cq.formats import get_format
from vllm_cq.kernels import varlen, window_triton
from vllm_cq.kernels.cq import attention, write
from vllm_cq.kernels.kvtq import triton_ops

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
PER_STEP = {
    write._write_kv_kernel: {"num_tokens", "num_seqs", "search_steps"},
    attention._cq_attention_kernel: {"num_seqs"},
    triton_ops._tq_attention_kernel: {"num_seqs"},
    window_triton._window_merge_kernel: {"num_seqs"},
    varlen._merge_segments_kernel: {"num_seqs"},
}


@pytest.mark.skipif(INTERPRETED, reason="the interpreter does not specialize")
@pytest.mark.parametrize("kernel", list(PER_STEP), ids=lambda k: k.fn.__name__)
def test_per_step_integers_are_not_specialized(kernel):
    generic = {p.name for p in kernel.params if p.do_not_specialize}
    assert PER_STEP[kernel] <= generic, PER_STEP[kernel] - generic


@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRETED, reason="compiled kernels need a GPU")
def test_write_compiles_once_per_step_kind():
    """Steps of 1 to 300 tokens over 1 to 5 sequences: one compiled write for decode-sized steps and one
    for prefill-sized steps (`write.LARGE_STEP`), whatever the counts."""
    from vllm_cq.kernels.cq.write import write_kv_cache

    fmt, h, d, bs = get_format("cq1"), 2, 128, 16
    dev = torch.device("cuda")
    kcb = torch.randn(h * d // 8, 256, 8, device=dev)
    vcb = torch.randn(h * d // 8, 256, 8, device=dev)
    cache = torch.zeros(64, h, bs, fmt.slot_bytes(d), dtype=torch.uint8, device=dev)
    cos_sin = torch.randn(1024, d, device=dev)
    cached = write._write_kv_kernel.device_caches[torch.cuda.current_device()][0]
    before = len(cached)
    for n, s in ((1, 1), (16, 1), (17, 3), (33, 5), (256, 1), (300, 4), (301, 2)):
        k, v = torch.randn(n, h, d, device=dev), torch.randn(n, h, d, device=dev)
        qsl = torch.linspace(0, n, s + 1, device=dev).round().int()
        seq_lens = (qsl[1:] - qsl[:-1]) + 7
        slots = torch.randperm(64 * bs, device=dev)[:n]
        write_kv_cache(k, v, cache, slots, kcb, vcb, fmt.key_bytes(d), qsl, seq_lens, cos_sin, True)
    torch.cuda.synchronize()
    assert len(cached) - before <= 2, len(cached) - before
