"""Triton kernels for KVTQ: quantize-and-store a step's K/V into vLLM's paged cache, and paged
attention over the stored digits. The reference is `naive.py` (same byte layout).

Write: one program per (token, kv head) for K and V together; per level, each group's scale from the
residual's max magnitude (rounded to float16 as stored), digits by rounding, five base-3 digits per
byte. Attention: the same tiling as the cq kernel (`kernels/cq/attention.py`: query blocks x GQA
heads as tensor-core rows, split-KV for decode-only steps, on-device sequence lookup, CUDA-graph
safe), with each key/value tile rebuilt in registers as sum over levels of scale x digit before the
products. Keys are stored post-RoPE, so nothing is rotated here.

Level-wise variant (`levelwise=`, compile-time `LEVELWISE_K` / `LEVELWISE_V`; off by default and in
the vLLM backend, the benchmark selects it): the ternary digits go into the tensor-core products
as they are (exact in bf16/fp16, so each product is additions/subtractions of query or probability
entries), and each float16 scale is applied once per level and 32-channel group instead of once per
channel. Both sides are one batched dot per level with the head's groups as the batch:

  keys    S[m, n] = sum_l sum_g s_k[n, g, l] * (q[m, g] . t_l[n, g])
          [G, M, 32] x [G, 32, N] -> [G, M, N], scaled by s_k[:, None, :], summed over g once a tile
  values  O[m, g] += (p[m, n] * s_v[n, g, l]) @ t_l[n, g]
          [G, M, N] x [G, N, 32] -> [G, M, 32]: the per-(token, group, level) value scale can only
          go onto the probabilities, so each level weights p once per group (M x N x groups
          multiplies per level against N x D for rebuilding the tile: fewer for decode, where M is
          the padded GQA group, not for prefill's 64-row blocks); the dot accumulates in place and
          the [G, M, 32] accumulator is laid out as [M, D] only once, at the store.

The price is one dot per level instead of one per tile and, on the value side, probabilities
rounded to the model dtype after the scale rather than before.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_cq.formats import KVFormat, TernarySpec
from vllm_cq.kernels.varlen import block_rows, kv_tile_range, plan_launch, query_block, softmax_step, store_rows
from vllm_cq.kernels.window import WindowCache
from vllm_cq.kernels.window_triton import attend_window_and_merge

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
def _level_scales(p_slot, m_n, lv, LEVELS: tl.constexpr, NG: tl.constexpr):
    """[NG, BLOCK_N] float32 scales of one level: the level-wise path applies them to products."""
    o_g = tl.arange(0, NG)
    p_s = p_slot[None, :] + (lv * NG + o_g)[:, None] * 2
    lo = tl.load(p_s, mask=m_n[None, :], other=0).to(tl.int32)
    hi = tl.load(p_s + 1, mask=m_n[None, :], other=0).to(tl.int32)
    return (lo | (hi << 8)).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _level_digits(
    p_slot,
    m_n,
    lv,
    LEVELS: tl.constexpr,
    GROUP: tl.constexpr,
    D: tl.constexpr,
    NB: tl.constexpr,
    BLOCK_N: tl.constexpr,
    N_LAST: tl.constexpr,
):
    """One level's digits {-1, 0, 1} as float32, groups first so a batched dot runs per group:
    [NG, GROUP, BLOCK_N] (N_LAST, keys transposed for q @ k^T) or [NG, BLOCK_N, GROUP] (values).
    Loaded straight into that shape, so no register reshuffle; masked tokens read 0 bytes (their
    scale is 0 too)."""
    NG: tl.constexpr = D // GROUP
    o_g = tl.arange(0, NG)
    o_c = tl.arange(0, GROUP)
    if N_LAST:
        ch = o_g[:, None, None] * GROUP + o_c[None, :, None]
        p_row = p_slot[None, None, :]
        m = m_n[None, None, :]
    else:
        ch = o_g[:, None, None] * GROUP + o_c[None, None, :]
        p_row = p_slot[None, :, None]
        m = m_n[None, :, None]
    inv_p3 = 1.0 / _pow3(ch % 5).to(tl.float32)  # same exact float digit extraction as _dequant_tile
    byte = tl.load(p_row + NG * 2 * LEVELS + lv * NB + ch // 5, mask=m, other=0)
    b_f = byte.to(tl.float32) + 0.5
    return tl.floor(b_f * inv_p3) - 3.0 * tl.floor(b_f * (inv_p3 * (1.0 / 3.0))) - 1.0


@triton.jit(do_not_specialize=["num_seqs"])
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
    win,  # recent window W (0: none): keys j <= i - W only, `window_triton` attends the rest
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
    LEVELWISE_K: tl.constexpr = False,
    LEVELWISE_V: tl.constexpr = False,
):
    pid_q = tl.program_id(0)
    i_seg = tl.program_id(1)
    i_kvh = tl.program_id(2)
    i_s, q_start, q_len, qb, seq_len = query_block(qsl_ptr, seq_lens_ptr, pid_q, num_seqs, BLOCK_Q)
    if qb * BLOCK_Q >= q_len:
        return
    ctx = seq_len - q_len
    tok, head, m_row, q_pos = block_rows(qb, i_kvh, q_len, ctx, G, BLOCK_Q, BLOCK_M)
    NGK: tl.constexpr = D // GK
    NGV: tl.constexpr = D // GV
    q_row = (q_start + tok).to(tl.int64) * stride_qt + head * stride_qh
    if LEVELWISE_K:  # [NGK, BLOCK_M, GK]: the query split into the key groups, the batch of the dots
        o_ch = tl.arange(0, NGK)[:, None, None] * GK + tl.arange(0, GK)[None, None, :]
        b_q = tl.load(q_ptr + q_row[None, :, None] + o_ch, mask=m_row[None, :, None], other=0.0)
    else:
        o_d = tl.arange(0, D)
        b_q = tl.load(q_ptr + q_row[:, None] + o_d[None, :], mask=m_row[:, None], other=0.0)
    dt = q_ptr.dtype.element_ty
    kv_len, t_lo, t_hi = kv_tile_range(seq_len, ctx, qb, i_seg, BLOCK_Q, BLOCK_N, NUM_SEGMENTS, win)
    b_m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    b_l = tl.zeros([BLOCK_M], tl.float32)
    if LEVELWISE_V:  # [NGV, BLOCK_M, GV], laid out as [BLOCK_M, D] at the store
        b_acc = tl.zeros([NGV, BLOCK_M, GV], tl.float32)
    else:
        b_acc = tl.zeros([BLOCK_M, D], tl.float32)
    p_bt = block_table_ptr + i_s.to(tl.int64) * stride_bt
    for t in range(t_lo, t_hi):
        o_n = t * BLOCK_N + tl.arange(0, BLOCK_N)
        m_n = o_n < kv_len
        blk = tl.load(p_bt + o_n // block_size, mask=m_n, other=0).to(tl.int64)
        p_slot = cache_ptr + blk * stride_cb + i_kvh * stride_ch + (o_n % block_size) * stride_co
        if LEVELWISE_K:
            b_sg = tl.zeros([NGK, BLOCK_M, BLOCK_N], tl.float32)
            for lv in tl.static_range(LK):
                b_t = _level_digits(p_slot, m_n, lv, LK, GK, D, NB, BLOCK_N, True).to(dt)  # exact
                if IEEE:
                    b_d = tl.dot(b_q, b_t, input_precision="ieee")
                else:
                    b_d = tl.dot(b_q, b_t)
                b_sg += b_d * _level_scales(p_slot, m_n, lv, LK, NGK)[:, None, :]
            b_s = tl.sum(b_sg, axis=0)
        else:
            b_k = _dequant_tile(p_slot, m_n, LK, GK, D, NB, BLOCK_N).to(dt)
            if IEEE:
                b_s = tl.dot(b_q, tl.trans(b_k), input_precision="ieee")
            else:
                b_s = tl.dot(b_q, tl.trans(b_k))
        b_s = b_s * qk_scale
        b_s = tl.where(m_n[None, :] & (o_n[None, :] <= q_pos[:, None] - win), b_s, float("-inf"))
        b_p, b_alpha, b_m, b_l = softmax_step(b_s, b_m, b_l)
        if LEVELWISE_V:
            b_acc = b_acc * b_alpha[None, :, None]
            for lv in tl.static_range(LV):
                b_w = (b_p[None, :, :] * _level_scales(p_slot + v_offset, m_n, lv, LV, NGV)[:, None, :]).to(dt)
                b_t = _level_digits(p_slot + v_offset, m_n, lv, LV, GV, D, NB, BLOCK_N, False).to(dt)
                if IEEE:
                    b_acc = tl.dot(b_w, b_t, b_acc, input_precision="ieee")
                else:
                    b_acc = tl.dot(b_w, b_t, b_acc)
        else:
            b_v = _dequant_tile(p_slot + v_offset, m_n, LV, GV, D, NB, BLOCK_N).to(dt)
            if IEEE:
                b_acc = tl.dot(b_p.to(dt), b_v, b_acc * b_alpha[:, None], input_precision="ieee")
            else:
                b_acc = tl.dot(b_p.to(dt), b_v, b_acc * b_alpha[:, None])
    if LEVELWISE_V:
        b_acc = tl.reshape(tl.permute(b_acc, (1, 0, 2)), (BLOCK_M, D))
    store_rows(
        out_ptr, ml_ptr, b_acc, b_m, b_l, (q_start + tok).to(tl.int64), head, m_row, stride_ot, stride_oh,
        G * tl.num_programs(2), i_seg, D, NUM_SEGMENTS,
    )  # fmt: skip


LEVELWISE_MODES = ("none", "k", "v", "kv")


def levelwise_sides(levelwise: str, ks: TernarySpec, vs: TernarySpec, d: int) -> tuple[bool, bool]:
    """(keys, values) level-wise flags for a mode, checked before launch: the per-group batched dots
    need power-of-two groups of at least 16 channels (tensor-core tile) that divide head_dim."""
    if levelwise not in LEVELWISE_MODES:
        raise ValueError(f"levelwise must be one of {LEVELWISE_MODES}, got {levelwise!r}")
    sides = ("k" in levelwise, "v" in levelwise)
    for on, spec in zip(sides, (ks, vs), strict=True):
        g = spec.group
        if on and not (g >= 16 and g & (g - 1) == 0 and d % g == 0):
            raise ValueError(f"level-wise KVTQ needs a power-of-two group >= 16 dividing head_dim {d}, got {g}")
    return sides


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
    levelwise: str = "none",
    window: WindowCache | None = None,
) -> torch.Tensor:
    """Same contract as `naive.paged_attention`, written into `out` (default: query's dtype).
    Requires a power-of-two head_dim >= 16. `levelwise` ("none", "k", "v", "kv") picks the sides
    that multiply the exact digits and scale per level and group (module docstring); "none" is the
    default and what the vLLM backend runs. With a recent `window` the trits cover keys j <= i - W
    and `window_triton` adds the exact window, one softmax."""
    t, hq, d = query.shape
    hkv = kv_cache.shape[1]
    num_seqs = seq_lens.shape[0]
    assert d & (d - 1) == 0 and d >= 16 and kv_cache.stride(3) == 1 and query.stride(2) == 1
    if out is None:
        out = torch.empty(t, hq, d, dtype=query.dtype, device=query.device)
    if t == 0:
        return out
    ks, vs = fmt.key, fmt.value
    lw_k, lw_v = levelwise_sides(levelwise, ks, vs, d)
    plan = plan_launch(query, out, hkv, num_seqs, max_query_len, num_segments, min_segments=2 if window else 1)
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
        window.W if window is not None else 0,
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
        LEVELWISE_K=lw_k,
        LEVELWISE_V=lw_v,
        num_warps=4,
    )
    if window is not None:
        return attend_window_and_merge(query, out, plan, window, seq_lens, query_start_loc, scale, block_n)
    return plan.finish(out, query_start_loc)
