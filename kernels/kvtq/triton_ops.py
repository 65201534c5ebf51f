"""Triton kernels for KVTQ: quantize-and-store a step's K/V into vLLM's paged cache, and paged
attention over the stored digits. The reference is `naive.py` (same byte layout).

Write: one program per (token, kv head) for K and V together; per level, each group's scale from the
residual's max magnitude (rounded to float16 as stored), digits by rounding, five base-3 digits per
byte. Attention: the same tiling as the cq kernel (`kernels/cq/attention.py`: query blocks x GQA
heads as tensor-core rows, split-KV for decode-only steps, on-device sequence lookup, CUDA-graph
safe), with each key/value tile rebuilt in registers as sum over levels of scale x digit before the
products. Keys are stored post-RoPE, so nothing is rotated here.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_cq.formats import KVFormat, TernarySpec
from vllm_cq.kernels.varlen import block_rows, kv_tile_range, plan_launch, query_block, softmax_step, store_rows

LOG2E = 1.4426950408889634


@triton.jit
def _pow3(i):
    """3**i for i in 0..4, elementwise."""
    return tl.where(i == 0, 1, tl.where(i == 1, 3, tl.where(i == 2, 9, tl.where(i == 3, 27, 81))))


@triton.jit
def _quantize_store(
    x_row,
    dst,
    LEVELS: tl.constexpr,
    GROUP: tl.constexpr,
    D: tl.constexpr,
    NG: tl.constexpr,
    NB: tl.constexpr,
    NB_PAD: tl.constexpr,
):
    o_b = tl.arange(0, NB_PAD)
    o_i = tl.arange(0, 8)
    ch = o_b[:, None] * 5 + o_i[None, :]  # channel of digit i of byte b
    m = (o_i[None, :] < 5) & (ch < D)
    grp = ch // GROUP
    b_r = tl.load(x_row + ch, mask=m, other=0.0).to(tl.float32)
    p3 = _pow3(o_i)[None, :]
    for lv in tl.static_range(LEVELS):
        b_s = tl.zeros([NB_PAD, 8], tl.float32)
        for g in tl.static_range(NG):
            in_g = m & (grp == g)
            s_g = tl.minimum(tl.max(tl.where(in_g, tl.abs(b_r), 0.0)) * (2.0 / 3.0), 65504.0).to(tl.float16)
            bits = s_g.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
            p_s = dst + (lv * NG + g) * 2
            tl.store(p_s, (bits & 0xFF).to(tl.uint8))
            tl.store(p_s + 1, (bits >> 8).to(tl.uint8))
            b_s = tl.where(in_g, s_g.to(tl.float32), b_s)
        ratio = b_r / tl.where(b_s > 0.0, b_s, 1.0)
        t = tl.where(b_s > 0.0, tl.minimum(tl.maximum(tl.floor(ratio + 0.5), -1.0), 1.0), 0.0)
        b_r = b_r - b_s * t
        byte = tl.sum(tl.where(m, (t + 1.0).to(tl.int32) * p3, 0), axis=1) + tl.sum(
            tl.where((o_i[None, :] < 5) & (ch >= D), p3, 0), axis=1
        )  # padding digits hold 0 (stored as 1)
        tl.store(dst + NG * 2 * LEVELS + lv * NB + o_b, byte.to(tl.uint8), mask=o_b < NB)


@triton.jit
def _write_kernel(
    k_ptr,
    v_ptr,
    cache_ptr,
    slot_ptr,
    stride_kn,
    stride_kh,
    stride_vn,
    stride_vh,
    stride_cb,
    stride_ch,
    stride_co,
    block_size,
    v_offset,
    D: tl.constexpr,
    LK: tl.constexpr,
    GK: tl.constexpr,
    LV: tl.constexpr,
    GV: tl.constexpr,
    NB: tl.constexpr,
    NB_PAD: tl.constexpr,
):
    i_n = tl.program_id(0)
    i_h = tl.program_id(1)
    slot = tl.load(slot_ptr + i_n).to(tl.int64)
    if slot < 0:
        return
    dst = cache_ptr + (slot // block_size) * stride_cb + i_h * stride_ch + (slot % block_size) * stride_co
    n64 = i_n.to(tl.int64)
    _quantize_store(k_ptr + n64 * stride_kn + i_h * stride_kh, dst, LK, GK, D, D // GK, NB, NB_PAD)
    _quantize_store(v_ptr + n64 * stride_vn + i_h * stride_vh, dst + v_offset, LV, GV, D, D // GV, NB, NB_PAD)


def write_kv_cache(
    key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor, fmt: KVFormat
) -> None:
    """Same contract as `naive.write_kv_cache`."""
    n, h, d = key.shape
    ks, vs = fmt.key, fmt.value
    assert isinstance(ks, TernarySpec) and isinstance(vs, TernarySpec)
    if n == 0:
        return
    key = key if key.stride(-1) == 1 else key.contiguous()
    value = value if value.stride(-1) == 1 else value.contiguous()
    nb = ks.digit_bytes(d)
    _write_kernel[(n, h)](
        key,
        value,
        kv_cache,
        slot_mapping,
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        kv_cache.stride(0),
        kv_cache.stride(1),
        kv_cache.stride(2),
        kv_cache.shape[2],
        fmt.key_bytes(d),
        D=d,
        LK=ks.levels,
        GK=ks.group,
        LV=vs.levels,
        GV=vs.group,
        NB=nb,
        NB_PAD=triton.next_power_of_2(nb),
    )


@triton.jit
def _dequant_tile(
    p_slot, m_n, LEVELS: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, NB: tl.constexpr, BLOCK_N: tl.constexpr
):
    """[BLOCK_N, D] float32 = sum over levels of scale(group) x digit, from the slots' bytes."""
    NG: tl.constexpr = D // GROUP
    o_d = tl.arange(0, D)
    o_g = tl.arange(0, NG)
    # digit i of byte b is floor(b / 3^i) mod 3: as float multiplies by 1/3^i and 1/3^(i+1) on b + 1/2
    # (exact: every quotient stays >= 1/162 away from an integer), not a per-column integer division
    inv_p3 = (1.0 / _pow3(o_d % 5).to(tl.float32))[None, :]
    x = tl.zeros([BLOCK_N, D], tl.float32)
    for lv in tl.static_range(LEVELS):
        p_s = p_slot[:, None] + (lv * NG + o_g)[None, :] * 2
        lo = tl.load(p_s, mask=m_n[:, None], other=0).to(tl.int32)
        hi = tl.load(p_s + 1, mask=m_n[:, None], other=0).to(tl.int32)
        s = (lo | (hi << 8)).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)  # [BLOCK_N, NG]
        s = tl.reshape(tl.broadcast_to(s[:, :, None], (BLOCK_N, NG, GROUP)), (BLOCK_N, D))
        byte = tl.load(p_slot[:, None] + NG * 2 * LEVELS + lv * NB + (o_d // 5)[None, :], mask=m_n[:, None], other=0)
        b_f = byte.to(tl.float32) + 0.5
        t = tl.floor(b_f * inv_p3) - 3.0 * tl.floor(b_f * (inv_p3 * (1.0 / 3.0))) - 1.0
        x += s * t
    return x


@triton.jit
def _tq_attention_kernel(
    q_ptr,
    out_ptr,
    ml_ptr,
    cache_ptr,
    block_table_ptr,
    seq_lens_ptr,
    qsl_ptr,
    num_seqs,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_cb,
    stride_ch,
    stride_co,
    stride_bt,
    qk_scale,
    block_size,
    v_offset,
    G: tl.constexpr,
    D: tl.constexpr,
    LK: tl.constexpr,
    GK: tl.constexpr,
    LV: tl.constexpr,
    GV: tl.constexpr,
    NB: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_SEGMENTS: tl.constexpr,
    IEEE: tl.constexpr,
):
    pid_q = tl.program_id(0)
    i_seg = tl.program_id(1)
    i_kvh = tl.program_id(2)
    i_s, q_start, q_len, qb, seq_len = query_block(qsl_ptr, seq_lens_ptr, pid_q, num_seqs, BLOCK_Q)
    if qb * BLOCK_Q >= q_len:
        return
    ctx = seq_len - q_len
    tok, head, m_row, q_pos = block_rows(qb, i_kvh, q_len, ctx, G, BLOCK_Q, BLOCK_M)
    o_d = tl.arange(0, D)
    p_q = q_ptr + (q_start + tok).to(tl.int64)[:, None] * stride_qt + head[:, None] * stride_qh + o_d[None, :]
    b_q = tl.load(p_q, mask=m_row[:, None], other=0.0)
    dt = q_ptr.dtype.element_ty
    kv_len, t_lo, t_hi = kv_tile_range(seq_len, ctx, qb, i_seg, BLOCK_Q, BLOCK_N, NUM_SEGMENTS)
    b_m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    b_l = tl.zeros([BLOCK_M], tl.float32)
    b_acc = tl.zeros([BLOCK_M, D], tl.float32)
    p_bt = block_table_ptr + i_s.to(tl.int64) * stride_bt
    for t in range(t_lo, t_hi):
        o_n = t * BLOCK_N + tl.arange(0, BLOCK_N)
        m_n = o_n < kv_len
        blk = tl.load(p_bt + o_n // block_size, mask=m_n, other=0).to(tl.int64)
        p_slot = cache_ptr + blk * stride_cb + i_kvh * stride_ch + (o_n % block_size) * stride_co
        b_k = _dequant_tile(p_slot, m_n, LK, GK, D, NB, BLOCK_N).to(dt)
        if IEEE:
            b_s = tl.dot(b_q, tl.trans(b_k), input_precision="ieee")
        else:
            b_s = tl.dot(b_q, tl.trans(b_k))
        b_s = b_s * qk_scale
        b_s = tl.where(m_n[None, :] & (o_n[None, :] <= q_pos[:, None]), b_s, float("-inf"))
        b_p, b_alpha, b_m, b_l = softmax_step(b_s, b_m, b_l)
        b_v = _dequant_tile(p_slot + v_offset, m_n, LV, GV, D, NB, BLOCK_N).to(dt)
        if IEEE:
            b_acc = tl.dot(b_p.to(dt), b_v, b_acc * b_alpha[:, None], input_precision="ieee")
        else:
            b_acc = tl.dot(b_p.to(dt), b_v, b_acc * b_alpha[:, None])
    store_rows(
        out_ptr, ml_ptr, b_acc, b_m, b_l, (q_start + tok).to(tl.int64), head, m_row, stride_ot, stride_oh,
        G * tl.num_programs(2), i_seg, D, NUM_SEGMENTS,
    )  # fmt: skip


def paged_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    fmt: KVFormat,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    max_query_len: int,
    out: torch.Tensor | None = None,
    num_segments: int | None = None,
    block_n: int = 32,
) -> torch.Tensor:
    """Same contract as `naive.paged_attention`, written into `out` (default: query's dtype).
    Requires a power-of-two head_dim >= 16."""
    t, hq, d = query.shape
    hkv = kv_cache.shape[1]
    num_seqs = seq_lens.shape[0]
    assert d & (d - 1) == 0 and d >= 16 and kv_cache.stride(3) == 1 and query.stride(2) == 1
    if out is None:
        out = torch.empty(t, hq, d, dtype=query.dtype, device=query.device)
    if t == 0:
        return out
    plan = plan_launch(query, out, hkv, num_seqs, max_query_len, num_segments)
    ks, vs = fmt.key, fmt.value
    _tq_attention_kernel[(plan.num_query_blocks(t, num_seqs), plan.num_segments, hkv)](
        query,
        plan.target,
        plan.ml,
        kv_cache,
        block_table,
        seq_lens,
        query_start_loc,
        num_seqs,
        query.stride(0),
        query.stride(1),
        plan.stride_ot,
        plan.stride_oh,
        kv_cache.stride(0),
        kv_cache.stride(1),
        kv_cache.stride(2),
        block_table.stride(0),
        float(scale) * LOG2E,
        kv_cache.shape[2],
        fmt.key_bytes(d),
        G=hq // hkv,
        D=d,
        LK=ks.levels,
        GK=ks.group,
        LV=vs.levels,
        GV=vs.group,
        NB=ks.digit_bytes(d),
        BLOCK_Q=plan.block_q,
        BLOCK_M=plan.block_m,
        BLOCK_N=block_n,
        NUM_SEGMENTS=plan.num_segments,
        IEEE=query.dtype == torch.float32,
        num_warps=4,
    )
    return plan.finish(out, query_start_loc)
