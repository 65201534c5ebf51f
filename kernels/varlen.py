"""Triton helpers shared by every family's attention kernels for vLLM varlen batches: which sequence a
program works on (found on the device from query_start_loc, so launches need no host-side index
tensors: CUDA-graph safe), and the split-KV (flash-decoding) partial-softmax merge."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def find_seq(qsl_ptr, target, num_seqs, BLOCK_Q: tl.constexpr, PER_BLOCK: tl.constexpr):
    """Largest s in [0, num_seqs) with start(s) <= target, by binary search. start(s) = qsl[s] when
    numbering tokens; with PER_BLOCK, query blocks of BLOCK_Q tokens, start(s) = qsl[s] // BLOCK_Q + s
    (the + s gives every sequence at least one block, so a grid of T // BLOCK_Q + S blocks covers all)."""
    lo = 0
    hi = num_seqs - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        v = tl.load(qsl_ptr + mid)
        if PER_BLOCK:
            v = v // BLOCK_Q + mid
        if v <= target:
            lo = mid
        else:
            hi = mid - 1
    return lo


@triton.jit
def _merge_segments_kernel(
    part_ptr,  # float32 [T, Hq, NUM_SEGMENTS, D]
    ml_ptr,  # float32 [T, Hq, NUM_SEGMENTS, 2]
    out_ptr,  # [T, Hq, D]
    qsl_ptr,
    num_seqs,
    stride_ot,
    stride_oh,
    HQ: tl.constexpr,
    D: tl.constexpr,
    NUM_SEGMENTS: tl.constexpr,
):
    """out = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s over the segments of one (token, head)."""
    i_t = tl.program_id(0)
    i_h = tl.program_id(1)
    if i_t >= tl.load(qsl_ptr + num_seqs):
        return
    base = i_t.to(tl.int64) * HQ + i_h
    o_s = tl.arange(0, NUM_SEGMENTS)
    b_m = tl.load(ml_ptr + (base * NUM_SEGMENTS + o_s) * 2)
    b_l = tl.load(ml_ptr + (base * NUM_SEGMENTS + o_s) * 2 + 1)
    m_all = tl.max(b_m, axis=0)
    m_all = tl.where(m_all == float("-inf"), 0.0, m_all)
    w = tl.exp2(b_m - m_all)  # empty segments: 2^-inf = 0
    o_d = tl.arange(0, D)
    b_acc = tl.load(part_ptr + (base * NUM_SEGMENTS + o_s)[:, None] * D + o_d[None, :])
    num = tl.sum(b_acc * w[:, None], axis=0)
    den = tl.sum(b_l * w, axis=0)
    b_o = num / tl.where(den == 0.0, 1.0, den)
    tl.store(out_ptr + i_t.to(tl.int64) * stride_ot + i_h * stride_oh + o_d, b_o.to(out_ptr.dtype.element_ty))


def num_segments_for(num_seqs: int, num_kv_heads: int, max_query_len: int, num_sms: int) -> int:
    """Flash-decoding split for decode-only steps: enough programs for ~4 per SM, at most 16 (the
    partial buffers grow with it). A function of the batch shape only, so a CUDA graph captured for a
    batch size keeps its split. Prefill steps have enough query blocks already."""
    if max_query_len > 1:
        return 1
    want = -(-4 * num_sms // max(1, num_seqs * num_kv_heads))
    return min(16, triton.next_power_of_2(max(1, want)))


def merge_segments(part: torch.Tensor, ml: torch.Tensor, out: torch.Tensor, query_start_loc: torch.Tensor) -> None:
    """out [T, Hq, D] from float32 partials [T, Hq, S, D] and (max, sum) [T, Hq, S, 2]."""
    t, hq, num_segments, d = part.shape
    _merge_segments_kernel[(t, hq)](
        part,
        ml,
        out,
        query_start_loc,
        query_start_loc.shape[0] - 1,
        out.stride(0),
        out.stride(1),
        HQ=hq,
        D=d,
        NUM_SEGMENTS=num_segments,
    )
