"""Triton: paged attention over CQ codes (first correct version; issue 5 makes it fast).

One program per (query token, query head) walks its sequence's keys in tiles of BLOCK_N positions:
it reads each key's code bytes from the paged cache, gathers the centroids (never a dequantized
cache), rotates pre-RoPE keys by their positions, and keeps an online softmax; values are gathered
from the V codebook the same way. Channels are handled as the two halves of each RoPE pair
(idx1, idx2), which covers both NeoX and GPT-J styles. The reference is `naive.paged_attention`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _paged_attention_kernel(
    q_ptr,  # [T, Hq, D]
    out_ptr,  # [T, Hq, D] float32
    cache_ptr,  # uint8 [num_blocks, Hkv, block_size, slot_bytes]
    kcb_ptr,  # [Hkv * GK, KK, CK] float32
    vcb_ptr,  # [Hkv * GV, KV, CV] float32
    block_table_ptr,  # [S, max_blocks] int32
    seq_idx_ptr,  # [T] sequence of each query token
    qpos_ptr,  # [T] position of each query token
    cos_sin_ptr,  # [max_pos, D]: cos | sin
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_cb,
    stride_ch,
    stride_co,
    stride_bt,
    stride_cs,
    scale,
    block_size,
    v_offset,
    GQA: tl.constexpr,
    HALF: tl.constexpr,
    CK: tl.constexpr,
    GK: tl.constexpr,
    KK: tl.constexpr,
    CV: tl.constexpr,
    GV: tl.constexpr,
    KV: tl.constexpr,
    IS_NEOX: tl.constexpr,
    HAS_ROPE: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    i_t = tl.program_id(0)
    i_h = tl.program_id(1)
    i_kvh = i_h // GQA
    i_s = tl.load(seq_idx_ptr + i_t).to(tl.int64)
    q_pos = tl.load(qpos_ptr + i_t).to(tl.int64)
    o_i = tl.arange(0, HALF)
    if IS_NEOX:
        idx1 = o_i
        idx2 = o_i + HALF
    else:
        idx1 = 2 * o_i
        idx2 = 2 * o_i + 1
    b_q1 = tl.load(q_ptr + i_t * stride_qt + i_h * stride_qh + idx1).to(tl.float32)
    b_q2 = tl.load(q_ptr + i_t * stride_qt + i_h * stride_qh + idx2).to(tl.float32)
    # per-channel group ids and offsets inside the group, for the K and V codebooks
    gk1, gk2 = idx1 // CK, idx2 // CK
    gv1, gv2 = idx1 // CV, idx2 // CV
    b_m = tl.full([1], float("-inf"), tl.float32)
    b_l = tl.zeros([1], tl.float32)
    b_acc1 = tl.zeros([HALF], tl.float32)
    b_acc2 = tl.zeros([HALF], tl.float32)
    kv_len = q_pos + 1
    for start in range(0, kv_len, BLOCK_N):
        o_n = start + tl.arange(0, BLOCK_N)
        m_n = o_n < kv_len
        blk = tl.load(block_table_ptr + i_s * stride_bt + o_n // block_size, mask=m_n, other=0).to(tl.int64)
        p_slot = cache_ptr + blk * stride_cb + i_kvh * stride_ch + (o_n % block_size) * stride_co  # [BLOCK_N]
        # keys: code byte of each channel's group, then that centroid's coordinate
        c1 = tl.load(p_slot[:, None] + gk1[None, :], mask=m_n[:, None], other=0).to(tl.int32)
        c2 = tl.load(p_slot[:, None] + gk2[None, :], mask=m_n[:, None], other=0).to(tl.int32)
        k1 = tl.load(kcb_ptr + ((i_kvh * GK + gk1[None, :]) * KK + c1) * CK + (idx1 % CK)[None, :])
        k2 = tl.load(kcb_ptr + ((i_kvh * GK + gk2[None, :]) * KK + c2) * CK + (idx2 % CK)[None, :])
        if HAS_ROPE:
            p_cs = cos_sin_ptr + o_n[:, None] * stride_cs + o_i[None, :]
            b_cos = tl.load(p_cs, mask=m_n[:, None], other=1.0)
            b_sin = tl.load(p_cs + HALF, mask=m_n[:, None], other=0.0)
            r1 = k1 * b_cos - k2 * b_sin
            r2 = k2 * b_cos + k1 * b_sin
        else:
            r1 = k1
            r2 = k2
        b_s = (tl.sum(b_q1[None, :] * r1, axis=1) + tl.sum(b_q2[None, :] * r2, axis=1)) * scale
        b_s = tl.where(m_n, b_s, float("-inf"))
        b_m_new = tl.maximum(b_m, tl.max(b_s, axis=0))
        b_alpha = tl.exp(b_m - b_m_new)
        b_p = tl.exp(b_s - b_m_new)
        b_l = b_l * b_alpha + tl.sum(b_p, axis=0)
        # values, gathered from the V codebook the same way
        d1 = tl.load(p_slot[:, None] + v_offset + gv1[None, :], mask=m_n[:, None], other=0).to(tl.int32)
        d2 = tl.load(p_slot[:, None] + v_offset + gv2[None, :], mask=m_n[:, None], other=0).to(tl.int32)
        v1 = tl.load(vcb_ptr + ((i_kvh * GV + gv1[None, :]) * KV + d1) * CV + (idx1 % CV)[None, :])
        v2 = tl.load(vcb_ptr + ((i_kvh * GV + gv2[None, :]) * KV + d2) * CV + (idx2 % CV)[None, :])
        b_acc1 = b_acc1 * b_alpha + tl.sum(b_p[:, None] * v1, axis=0)
        b_acc2 = b_acc2 * b_alpha + tl.sum(b_p[:, None] * v2, axis=0)
        b_m = b_m_new
    tl.store(out_ptr + i_t * stride_ot + i_h * stride_oh + idx1, b_acc1 / b_l)
    tl.store(out_ptr + i_t * stride_ot + i_h * stride_oh + idx2, b_acc2 / b_l)


def paged_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    k_codebook: torch.Tensor,
    v_codebook: torch.Tensor,
    key_bytes: int,
    block_table: torch.Tensor,
    seq_idx: torch.Tensor,
    positions: torch.Tensor,
    scale: float,
    cos_sin_cache: torch.Tensor | None,
    is_neox: bool,
    block_n: int = 32,
) -> torch.Tensor:
    """query [T, Hq, D] -> float32 [T, Hq, D]; causal, each token sees its sequence's keys 0..position.

    seq_idx / positions [T] say which sequence each query token belongs to and where it sits.
    Requires 8-bit codes, a power-of-two head_dim and (with RoPE) rotary_dim == head_dim.
    """
    t, hq, d = query.shape
    hkv = kv_cache.shape[1]
    gk_total, kk, ck = k_codebook.shape
    gv_total, kv, cv = v_codebook.shape
    assert kv_cache.stride(3) == 1 and kk == 256 and kv == 256, "8-bit codes in contiguous slots"
    assert d & (d - 1) == 0, "head_dim must be a power of two for the Triton path"
    has_rope = cos_sin_cache is not None
    if has_rope:
        assert cos_sin_cache.shape[1] == d, "partial rotary embeddings take the reference path"
        cos_sin_cache = cos_sin_cache.contiguous()
    out = torch.empty(t, hq, d, dtype=torch.float32, device=query.device)
    if t == 0:
        return out
    _paged_attention_kernel[(t, hq)](
        query,
        out,
        kv_cache,
        k_codebook.contiguous(),
        v_codebook.contiguous(),
        block_table,
        seq_idx,
        positions,
        cos_sin_cache if has_rope else out,
        query.stride(0),
        query.stride(1),
        out.stride(0),
        out.stride(1),
        kv_cache.stride(0),
        kv_cache.stride(1),
        kv_cache.stride(2),
        block_table.stride(0),
        cos_sin_cache.stride(0) if has_rope else 0,
        float(scale),
        kv_cache.shape[2],
        key_bytes,
        GQA=hq // hkv,
        HALF=d // 2,
        CK=ck,
        GK=gk_total // hkv,
        KK=kk,
        CV=cv,
        GV=gv_total // hkv,
        KV=kv,
        IS_NEOX=is_neox,
        HAS_ROPE=has_rope,
        BLOCK_N=block_n,
    )
    return out
