"""Triton: the recent window's exact part of attention, merged with the code part's split-KV partials.

With a recent window (kernels/window.py, the reference: `attend_with_window`), a query at position i
attends keys i - W < j <= i exactly from the window's pages and older keys over codes, one softmax.
The code kernels run as usual with their keys bounded by j <= i - W and write split-KV partials
(unnormalized sums and their log2-domain max and sum per segment, `varlen.store_rows`); this kernel
then computes the window's part per (query block, kv head) from the model-dtype pages with the same
online softmax, and folds every segment's partial into it before normalizing: the window is one more
segment, and the merge that decode steps run anyway now also finishes prefill steps.

Window pages: [blocks, kv heads, block size, 2 * D] in the model dtype, K (post-RoPE, as vLLM hands it
over) then V; the window's own block table. Blocks older than the first query's window may be vLLM's
null block (garbage), so only positions from that window on are loaded.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_cq.kernels.varlen import LaunchPlan, block_rows, query_block, softmax_step
from vllm_cq.kernels.window import WindowCache

LOG2E = 1.4426950408889634
# Tiles of the merge where the caller does not pick them. Decode steps (one token per program): BLOCK_N
# window keys per iteration with NUM_WARPS; in an e2e profile (cq1, 128 x (4096+512), H200, 2026-12-03)
# this merge took 32 us per decode layer, 6% of a decode step, for about 67 MB of window K/V at 128
# sequences (14 us at the HBM's rate). Prefill steps: PREFILL_BLOCK_Q tokens per program (0: the code
# plan's query block, 16 tokens at GQA 4, so each window key is loaded by about (W + 16) / 16 programs;
# 0.45 ms per 16K-token chunk and layer in that profile). `attention_bench --window-set` times other
# values before a default changes.
DECODE_BLOCK_N, DECODE_NUM_WARPS = 32, 4
PREFILL_BLOCK_Q, PREFILL_BLOCK_N, PREFILL_NUM_WARPS = 0, 32, 4


@triton.jit(do_not_specialize=["num_seqs"])
def _window_merge_kernel(
    q_ptr,  # [T, Hq, D] post-RoPE queries
    out_ptr,  # [T, Hq, D]
    part_ptr,  # float32 [T, Hq, NUM_SEGMENTS, D]: the code part's unnormalized sums
    ml_ptr,  # float32 [T, Hq, NUM_SEGMENTS, 2]: their running max (log2 domain) and sum
    win_ptr,  # [blocks_w, Hkv, block_size_w, 2 * D]
    wbt_ptr,  # [S, max_blocks_w] int32
    seq_lens_ptr,
    qsl_ptr,
    num_seqs,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_wb,
    stride_wh,
    stride_wo,
    stride_wbt,
    W,
    qk_scale,  # softmax scale * log2(e)
    win_block_size,
    G: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_M: tl.constexpr,
    D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_SEGMENTS: tl.constexpr,
    IEEE: tl.constexpr,
):
    pid_q = tl.program_id(0)
    i_kvh = tl.program_id(1)
    num_q_heads = G * tl.num_programs(1)
    i_s, q_start, q_len, qb, seq_len = query_block(qsl_ptr, seq_lens_ptr, pid_q, num_seqs, BLOCK_Q)
    if qb * BLOCK_Q >= q_len:
        return
    ctx = seq_len - q_len
    tok, head, m_row, q_pos = block_rows(qb, i_kvh, q_len, ctx, G, BLOCK_Q, BLOCK_M)
    row = (q_start + tok).to(tl.int64)
    o_d = tl.arange(0, D)
    o_nt = tl.arange(0, BLOCK_N)
    dt = q_ptr.dtype.element_ty
    p_q = q_ptr + row[:, None] * stride_qt + head[:, None] * stride_qh + o_d[None, :]
    b_q = tl.load(p_q, mask=m_row[:, None], other=0.0).to(dt)

    # the window of the block's first query on, up to its last query (what vLLM keeps for this step)
    lo = tl.maximum(ctx + qb * BLOCK_Q - W + 1, 0)
    hi = tl.minimum(seq_len, ctx + (qb + 1) * BLOCK_Q)
    b_m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    b_l = tl.zeros([BLOCK_M], tl.float32)
    b_acc = tl.zeros([BLOCK_M, D], tl.float32)
    p_bt = wbt_ptr + i_s.to(tl.int64) * stride_wbt
    for t in range(lo // BLOCK_N, tl.cdiv(hi, BLOCK_N)):
        o_n = t * BLOCK_N + o_nt
        m_n = (o_n >= lo) & (o_n < hi)
        blk = tl.load(p_bt + o_n // win_block_size, mask=m_n, other=0).to(tl.int64)
        p_kv = win_ptr + blk * stride_wb + i_kvh * stride_wh + (o_n % win_block_size) * stride_wo  # [BLOCK_N]
        b_k = tl.load(p_kv[:, None] + o_d[None, :], mask=m_n[:, None], other=0.0).to(dt)
        if IEEE:
            b_s = tl.dot(b_q, tl.trans(b_k), input_precision="ieee")
        else:
            b_s = tl.dot(b_q, tl.trans(b_k))
        b_s = b_s * qk_scale
        visible = m_n[None, :] & (o_n[None, :] <= q_pos[:, None]) & (o_n[None, :] > q_pos[:, None] - W)
        b_s = tl.where(visible, b_s, float("-inf"))
        b_p, b_alpha, b_m, b_l = softmax_step(b_s, b_m, b_l)
        b_v = tl.load(p_kv[:, None] + D + o_d[None, :], mask=m_n[:, None], other=0.0).to(dt)
        if IEEE:
            b_acc = tl.dot(b_p.to(dt), b_v, b_acc * b_alpha[:, None], input_precision="ieee")
        else:
            b_acc = tl.dot(b_p.to(dt), b_v, b_acc * b_alpha[:, None])

    # fold in the code part's segments (rows without old keys hold max -inf, sum 0 and zeros)
    for i_seg in tl.static_range(NUM_SEGMENTS):
        part = (row * num_q_heads + head) * NUM_SEGMENTS + i_seg
        m_s = tl.load(ml_ptr + part * 2, mask=m_row, other=float("-inf"))
        l_s = tl.load(ml_ptr + part * 2 + 1, mask=m_row, other=0.0)
        a_s = tl.load(part_ptr + part[:, None] * D + o_d[None, :], mask=m_row[:, None], other=0.0)
        m_new = tl.maximum(b_m, m_s)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        f_old = tl.exp2(b_m - m_safe)
        f_seg = tl.exp2(m_s - m_safe)
        b_acc = b_acc * f_old[:, None] + a_s * f_seg[:, None]
        b_l = b_l * f_old + l_s * f_seg
        b_m = m_new
    b_o = b_acc / tl.where(b_l == 0.0, 1.0, b_l)[:, None]
    p_o = out_ptr + row[:, None] * stride_ot + head[:, None] * stride_oh + o_d[None, :]
    tl.store(p_o, b_o.to(out_ptr.dtype.element_ty), mask=m_row[:, None])


@triton.jit
def _write_window_kernel(
    k_ptr,  # [N, Hkv, D]
    v_ptr,
    win_ptr,  # [blocks_w, Hkv, block_size_w, 2 * D]
    slot_ptr,  # [N] int: block * block_size_w + offset, -1 = skip
    stride_kn,
    stride_kh,
    stride_vn,
    stride_vh,
    stride_wb,
    stride_wh,
    stride_wo,
    win_block_size,
    D: tl.constexpr,
):
    """One program per (token, kv head): copy its K and V into the window page (skipped slots: no store)."""
    i_t = tl.program_id(0)
    i_h = tl.program_id(1)
    slot = tl.load(slot_ptr + i_t).to(tl.int64)
    if slot < 0:
        return
    o_d = tl.arange(0, D)
    p_w = win_ptr + (slot // win_block_size) * stride_wb + i_h * stride_wh + (slot % win_block_size) * stride_wo
    dt = win_ptr.dtype.element_ty
    k = tl.load(k_ptr + i_t.to(tl.int64) * stride_kn + i_h * stride_kh + o_d)
    v = tl.load(v_ptr + i_t.to(tl.int64) * stride_vn + i_h * stride_vh + o_d)
    tl.store(p_w + o_d, k.to(dt))
    tl.store(p_w + D + o_d, v.to(dt))


def write_window(
    window_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """`window.write_window` without a host sync (the torch version selects the valid slots, which waits
    for the GPU), one launch for all new tokens; a power-of-two head_dim."""
    n, hkv, d = key.shape
    assert window_cache.shape[-1] == 2 * d and window_cache.stride(3) == 1 and d & (d - 1) == 0
    assert key.stride(2) == 1 and value.stride(2) == 1
    if n == 0:
        return
    _write_window_kernel[(n, hkv)](
        key,
        value,
        window_cache,
        slot_mapping,
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        window_cache.stride(0),
        window_cache.stride(1),
        window_cache.stride(2),
        window_cache.shape[2],
        D=d,
    )


def attend_window_and_merge(
    query: torch.Tensor,
    out: torch.Tensor,
    plan: LaunchPlan,
    window: WindowCache,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    block_n: int | None = None,
    num_warps: int | None = None,
) -> torch.Tensor:
    """out [T, Hq, D] = the window's exact part of attention merged with the code part's partials in
    `plan` (partials: `plan_launch(..., min_segments=2)`, or the CUDA decode kernel's); the attention
    kernels of every family call this instead of `plan.finish` when a recent window is configured. The
    partials are rows of tokens, so the merge tiles queries its own way (`PREFILL_BLOCK_Q`)."""
    t, hq, d = query.shape
    wc = window.kv_cache
    hkv = wc.shape[1]
    assert plan.target.dim() == 4, "the window merges split-KV partials [T, Hq, S, D] (S may be 1)"
    assert wc.shape[3] == 2 * d and wc.stride(3) == 1 and query.stride(2) == 1
    if t == 0:
        return out
    num_seqs = seq_lens.shape[0]
    g = hq // hkv
    block_q, block_m = plan.block_q, plan.block_m
    if block_q > 1 and PREFILL_BLOCK_Q:  # a prefill-step tiling (decode steps keep one token per program)
        block_q = PREFILL_BLOCK_Q
        block_m = max(16, triton.next_power_of_2(block_q * g))
    decode = block_q == 1
    block_n = block_n or (DECODE_BLOCK_N if decode else PREFILL_BLOCK_N)
    num_warps = num_warps or (DECODE_NUM_WARPS if decode else PREFILL_NUM_WARPS)
    grid = (t // block_q + num_seqs, hkv)
    _window_merge_kernel[grid](
        query,
        out,
        plan.target,
        plan.ml,
        wc,
        window.block_table,
        seq_lens,
        query_start_loc,
        num_seqs,
        query.stride(0),
        query.stride(1),
        out.stride(0),
        out.stride(1),
        wc.stride(0),
        wc.stride(1),
        wc.stride(2),
        window.block_table.stride(0),
        window.W,
        float(scale) * LOG2E,
        wc.shape[2],
        G=g,
        BLOCK_Q=block_q,
        BLOCK_M=block_m,
        D=d,
        BLOCK_N=block_n,
        NUM_SEGMENTS=plan.num_segments,
        IEEE=query.dtype == torch.float32,
        num_warps=num_warps,
    )
    return out
