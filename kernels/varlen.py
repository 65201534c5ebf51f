"""Triton helpers shared by every family's attention kernels for vLLM varlen batches: which sequence a
program works on (found on the device from query_start_loc, so launches need no host-side index
tensors: CUDA-graph safe), and the split-KV (flash-decoding) partial-softmax merge."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@triton.jit
def _seq_start(qsl_ptr, s, BLOCK_Q: tl.constexpr, PER_BLOCK: tl.constexpr):
    v = tl.load(qsl_ptr + s)
    if PER_BLOCK:
        v = v // BLOCK_Q + s
    return v


@triton.jit
def find_seq(qsl_ptr, target, num_seqs, BLOCK_Q: tl.constexpr, PER_BLOCK: tl.constexpr):
    """Largest s in [0, num_seqs) with start(s) <= target. start(s) = qsl[s] when numbering tokens; with
    PER_BLOCK, query blocks of BLOCK_Q tokens, start(s) = qsl[s] // BLOCK_Q + s (the + s gives every
    sequence at least one block, so a grid of T // BLOCK_Q + S blocks covers all).
    vLLM puts one-token (decode) requests first, where qsl[s] = s: the s that such a prefix gives is
    checked first, with two independent loads (start(s) <= target < start(s + 1); qsl has S + 1
    entries), and only a miss runs the binary search, log2(S) loads that each wait for the last. A
    decode step's programs all hit (an e2e profile on the H200 showed such latency-bound launches)."""
    if PER_BLOCK:
        guess = (target * BLOCK_Q) // (BLOCK_Q + 1)  # largest s with s + s // BLOCK_Q <= target
    else:
        guess = target
    guess = tl.maximum(tl.minimum(guess, num_seqs - 1), 0)
    lo = guess
    hi = guess
    hit = (_seq_start(qsl_ptr, guess, BLOCK_Q, PER_BLOCK) <= target) & (
        target < _seq_start(qsl_ptr, guess + 1, BLOCK_Q, PER_BLOCK)
    )
    if not hit:
        lo = 0
        hi = num_seqs - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _seq_start(qsl_ptr, mid, BLOCK_Q, PER_BLOCK) <= target:
            lo = mid
        else:
            hi = mid - 1
    return lo


@triton.jit(do_not_specialize=["num_seqs"])
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


@triton.jit
def query_block(qsl_ptr, seq_lens_ptr, pid_q, num_seqs, BLOCK_Q: tl.constexpr):
    """(sequence, its first new token, its new-token count, this program's block within them, its
    length) for query-block program pid_q; the caller returns early when block * BLOCK_Q >= q_len."""
    i_s = find_seq(qsl_ptr, pid_q, num_seqs, BLOCK_Q, True)
    q_start = tl.load(qsl_ptr + i_s)
    q_len = tl.load(qsl_ptr + i_s + 1) - q_start
    qb = pid_q - (q_start // BLOCK_Q + i_s)
    seq_len = tl.load(seq_lens_ptr + i_s)
    return i_s, q_start, q_len, qb, seq_len


@triton.jit
def block_rows(qb, i_kvh, q_len, ctx, G: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr):
    """Rows = (token, GQA head) pairs of a query block: token index among the new tokens, query head,
    row validity and the token's position in its sequence."""
    o_m = tl.arange(0, BLOCK_M)
    tok = qb * BLOCK_Q + o_m // G
    head = i_kvh * G + o_m % G
    m_row = (o_m // G < BLOCK_Q) & (tok < q_len)
    return tok, head, m_row, ctx + tok


@triton.jit
def kv_tile_range(
    seq_len, ctx, qb, i_seg, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SEGMENTS: tl.constexpr, win
):  # fmt: skip
    """Keys a query block can see (causal; with a recent window of `win` tokens, only those at least
    `win` older than its last query) and this segment's share of their tiles [t_lo, t_hi)."""
    kv_len = tl.maximum(tl.minimum(seq_len, ctx + (qb + 1) * BLOCK_Q) - win, 0)
    num_tiles = tl.cdiv(kv_len, BLOCK_N)
    per_seg = tl.cdiv(num_tiles, NUM_SEGMENTS)
    t_lo = i_seg * per_seg
    return kv_len, t_lo, tl.minimum(t_lo + per_seg, num_tiles)


@triton.jit
def softmax_step(b_s, b_m, b_l):
    """Online softmax over one tile of log2-domain scores b_s [M, N] (masked entries -inf): returns
    probabilities, the rescale factor for earlier sums, and the new running max and sum. Rows that
    have seen nothing yet keep max -inf and weights 0."""
    b_m_new = tl.maximum(b_m, tl.max(b_s, axis=1))
    b_m_safe = tl.where(b_m_new == float("-inf"), 0.0, b_m_new)
    b_alpha = tl.exp2(b_m - b_m_safe)
    b_p = tl.exp2(b_s - b_m_safe[:, None])
    return b_p, b_alpha, b_m_new, b_l * b_alpha + tl.sum(b_p, axis=1)


@triton.jit
def store_rows(
    out_ptr, ml_ptr, b_acc, b_m, b_l, row, head, m_row, stride_ot, stride_oh, num_q_heads, i_seg,
    D: tl.constexpr, NUM_SEGMENTS: tl.constexpr,
):  # fmt: skip
    """Finished rows: normalized into out [T, Hq, D], or (split-KV) the segment's unnormalized sum and
    its (max, sum) into the partial buffers that `merge_segments` combines."""
    o_d = tl.arange(0, D)
    if NUM_SEGMENTS == 1:
        b_o = b_acc / tl.where(b_l == 0.0, 1.0, b_l)[:, None]
        p_o = out_ptr + row[:, None] * stride_ot + head[:, None] * stride_oh + o_d[None, :]
        tl.store(p_o, b_o.to(out_ptr.dtype.element_ty), mask=m_row[:, None])
    else:
        part = (row * num_q_heads + head) * NUM_SEGMENTS + i_seg  # [T, Hq, NUM_SEGMENTS]
        tl.store(out_ptr + part[:, None] * D + o_d[None, :], b_acc, mask=m_row[:, None])
        tl.store(ml_ptr + part * 2, b_m, mask=m_row)
        tl.store(ml_ptr + part * 2 + 1, b_l, mask=m_row)


@dataclass
class LaunchPlan:
    """Tiling of one attention call, the same for every family: decode-only steps take one token per
    query block and split keys over segments; prefill steps take BLOCK_M / G tokens per block."""

    block_q: int
    block_m: int
    num_segments: int
    target: torch.Tensor  # what the kernel writes: out, or float32 partials [T, Hq, S, D]
    ml: torch.Tensor  # (max, sum) partials [T, Hq, S, 2] (out itself when unused)
    stride_ot: int
    stride_oh: int

    def num_query_blocks(self, num_tokens: int, num_seqs: int) -> int:
        return num_tokens // self.block_q + num_seqs

    def finish(self, out: torch.Tensor, query_start_loc: torch.Tensor) -> torch.Tensor:
        if self.num_segments > 1:
            merge_segments(self.target, self.ml, out, query_start_loc)
        return out


def plan_launch(
    query: torch.Tensor,
    out: torch.Tensor | None,
    num_kv_heads: int,
    num_seqs: int,
    max_query_len: int,
    num_segments: int | None = None,
    block_m: int | None = None,
    min_segments: int = 1,
    partials: bool = False,
) -> LaunchPlan:
    """The tiling of one call; `min_segments` 2 forces split-KV partials (the recent window merges
    its own part with them, `window_triton.attend_window_and_merge`), `partials` forces them even for
    one segment (the CUDA kernels, which always write partials or the output themselves); `out` is what
    a one-segment plan without partials writes into."""
    t, hq, d = query.shape
    g = hq // num_kv_heads
    if max_query_len <= 1:
        block_q, block_m = 1, max(16, triton.next_power_of_2(g))
    else:
        block_m = block_m or max(16, triton.next_power_of_2(g), 64 if g <= 8 else 2 * triton.next_power_of_2(g))
        block_q = max(1, block_m // g)
    if num_segments is None:
        sms = torch.cuda.get_device_properties(query.device).multi_processor_count if query.is_cuda else 4
        num_segments = num_segments_for(num_seqs, num_kv_heads, max_query_len, sms)
    num_segments = max(num_segments, min_segments)
    if num_segments == 1 and not partials:
        assert out is not None, "a one-segment plan writes into out"
        return LaunchPlan(block_q, block_m, 1, out, out, out.stride(0), out.stride(1))
    target = torch.empty(t, hq, num_segments, d, dtype=torch.float32, device=query.device)
    ml = torch.empty(t, hq, num_segments, 2, dtype=torch.float32, device=query.device)
    return LaunchPlan(block_q, block_m, num_segments, target, ml, 0, 0)
