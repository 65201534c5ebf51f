"""Triton: paged attention over CQ codes, one kernel for prefill, chunked prefill and decode.

Grid: (query blocks, kv segments, kv heads): head-major, so co-running programs share a head's
codebooks. A program owns BLOCK_Q query tokens of one sequence and all G query heads of one kv head
(GQA heads share every key tile: rows = token x head, BLOCK_M >= 16 so the products run on tensor
cores). It walks its keys in tiles of BLOCK_N positions: reads each key's code bytes from the paged
cache, gathers the centroids into registers (never a dequantized cache in memory), rotates pre-RoPE
keys by their positions, and keeps an online softmax; values are gathered from the V codebook the same
way. Channels are handled as the two halves of each RoPE pair (idx1, idx2), which covers NeoX and GPT-J.

RoPE, two ways (ROPE_SPLIT): by default each tile loads its keys' own cos/sin rows (what the reference
does); nothing RoPE-sized stays live across tiles and the query rows are never re-rotated. ROPE_SPLIT
rotates as R(P) R(n) instead: R(n) for the tile offsets n held in registers for the whole loop and
R(-P) applied to the query rows per tile, which reads fewer table bytes but costs ~100 more registers
per thread (sm_90, `benchmarks/kernel_resources.py`, whole tiles: decode 207-221 vs 103-138 at
BLOCK_N 32, prefill 255 with spills vs 194-218). Per-tile rows read [BLOCK_N, D] float32 of the table
per tile, from L2/L1 (every sequence and head shares it); which is faster is a GPU question
(`benchmarks/tune_cq.py --rope-split both`). K_PARTS splits a key tile's RoPE pairs into parts that
are gathered, rotated and multiplied in turn, so less of the tile is live at once (decode 2: 104-108
registers, four programs per SM for every format; prefill 4: 153-197, three for all but cq4).

Decode-only steps split each sequence's keys over NUM_SEGMENTS programs (flash-decoding) and a second
kernel merges the partial softmaxes, so a small batch still fills the GPU. Everything the kernels need
is derived on the device from vLLM's query_start_loc / seq_lens (a program finds its sequence by
binary search), so the launch is CUDA-graph safe. The reference is `naive.paged_attention`.

Speed (H100, README "Speed"): bound by one uncoalesced L1/L2 request per code group per key, not by
HBM bytes. On CUDA, `decode_cuda.cu` and `prefill_cuda.cu` take the steps instead where they cover the
shape (codebooks in shared memory, which Triton cannot index: 4.2x faster for cq1 decode at 64 x 32K
and 1.9x for an 8K prefill on the H200).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_cq.kernels.varlen import block_rows, kv_tile_range, plan_launch, query_block, softmax_step, store_rows
from vllm_cq.kernels.window import WindowCache
from vllm_cq.kernels.window_triton import attend_window_and_merge

LOG2E = 1.4426950408889634


@triton.jit
def _gather_half(p_slot, m_n, cb_ptr, g0, NG: tl.constexpr, C: tl.constexpr, BLOCK_N: tl.constexpr):
    """Centroid coordinates of NG consecutive groups starting at group g0, [BLOCK_N, NG * C]: one code
    byte per group, then C contiguous coordinates per centroid (a vector load, not C scalar ones)."""
    o_g = tl.arange(0, NG)
    codes = tl.load(p_slot[:, None] + (g0 + o_g)[None, :], mask=m_n[:, None], other=0).to(tl.int32)
    off = ((g0 + o_g)[None, :] * 256 + codes) * C  # [BLOCK_N, NG], multiple of C
    b = tl.load(cb_ptr + off[:, :, None] + tl.arange(0, C)[None, None, :])  # [BLOCK_N, NG, C]
    return tl.reshape(b, (BLOCK_N, NG * C))


@triton.jit
def _key_norms(p_norm, m_n):
    """[BLOCK_N] float32 key norms, one float16 load per key (2-byte aligned in the slot), 0 for masked
    keys. Two byte loads assembled into a float16 cost the decode kernel half its occupancy (sm_90,
    kernel_resources.py: shared memory 47 -> 79 KB, 4 -> 2 programs per SM)."""
    return tl.load(p_norm.to(tl.pointer_type(tl.float16)), mask=m_n, other=0.0).to(tl.float32)


@triton.jit
def _qk_part(
    b_s, p_q, m_row, p_slot, m_n, o_n, t, kcb, cos_sin_ptr, stride_cs, rope_rows, b_norm, c: tl.constexpr,
    PAIRS: tl.constexpr, HALF: tl.constexpr, CK: tl.constexpr, BLOCK_N: tl.constexpr, IS_NEOX: tl.constexpr,
    HAS_ROPE: tl.constexpr, ROPE_SPLIT: tl.constexpr, ABLATE: tl.constexpr, IEEE: tl.constexpr,
    NORM_ON_KEYS: tl.constexpr,
):  # fmt: skip
    """b_s + the scores over RoPE pairs [c * PAIRS, (c + 1) * PAIRS) of one key tile: gather, rotate,
    multiply. A part of the pairs at a time keeps fewer float32 key, cos and sin values live (K_PARTS);
    the query and R(n) loads are loop-invariant and hoisted out of the key loop by the compiler."""
    dt = p_q.dtype.element_ty
    o_i = c * PAIRS + tl.arange(0, PAIRS)
    if IS_NEOX:  # RoPE pairs (idx1, idx2): channel i with i + D/2 (NeoX) or 2i with 2i + 1 (GPT-J)
        idx1 = o_i
        idx2 = o_i + HALF
    else:
        idx1 = 2 * o_i
        idx2 = 2 * o_i + 1
    b_q1 = tl.load(p_q + idx1[None, :], mask=m_row[:, None], other=0.0).to(tl.float32)
    b_q2 = tl.load(p_q + idx2[None, :], mask=m_row[:, None], other=0.0).to(tl.float32)
    if ABLATE & 1:  # profiling only: code bytes instead of centroids (no K gathers)
        k1 = tl.load(p_slot[:, None] + (idx1 // CK)[None, :], mask=m_n[:, None], other=0).to(tl.float32)
        k2 = k1
    elif IS_NEOX:
        k1 = _gather_half(p_slot, m_n, kcb, c * PAIRS // CK, PAIRS // CK, CK, BLOCK_N).to(tl.float32)
        k2 = _gather_half(p_slot, m_n, kcb, (HALF + c * PAIRS) // CK, PAIRS // CK, CK, BLOCK_N).to(tl.float32)
    else:
        b_k = _gather_half(p_slot, m_n, kcb, c * 2 * PAIRS // CK, 2 * PAIRS // CK, CK, BLOCK_N).to(tl.float32)
        k1, k2 = tl.split(tl.reshape(b_k, (BLOCK_N, PAIRS, 2)))
    if NORM_ON_KEYS:  # the key tile's layout, where the code bytes were read: no per-score reload
        k1 = k1 * b_norm[:, None]
        k2 = k2 * b_norm[:, None]
    if HAS_ROPE and not (ABLATE & 4) and not ROPE_SPLIT:
        # this tile's own rows: loaded per tile, so they are not live across the loop
        p_ck = cos_sin_ptr + o_n[:, None] * stride_cs + o_i[None, :]
        cos_k = tl.load(p_ck, mask=m_n[:, None], other=1.0)
        sin_k = tl.load(p_ck + HALF, mask=m_n[:, None], other=0.0)
        qr1 = b_q1.to(dt)
        qr2 = b_q2.to(dt)
        r1 = (k1 * cos_k - k2 * sin_k).to(dt)
        r2 = (k2 * cos_k + k1 * sin_k).to(dt)
    elif HAS_ROPE and not (ABLATE & 4):
        # R(P) R(n): R(n) for the tile's local offsets n (loop-invariant, so held for the whole loop);
        # R(-P) for the tile base P applied to the (few) query rows instead of to the keys
        o_nt = tl.arange(0, BLOCK_N)
        p_cs = cos_sin_ptr + o_nt[:, None] * stride_cs + o_i[None, :]
        m_nt = o_nt < rope_rows
        cos_n = tl.load(p_cs, mask=m_nt[:, None], other=1.0)
        sin_n = tl.load(p_cs + HALF, mask=m_nt[:, None], other=0.0)
        p_cs0 = cos_sin_ptr + t * BLOCK_N * stride_cs
        cos_p = tl.load(p_cs0 + o_i)[None, :]
        sin_p = tl.load(p_cs0 + HALF + o_i)[None, :]
        qr1 = (b_q1 * cos_p + b_q2 * sin_p).to(dt)
        qr2 = (b_q2 * cos_p - b_q1 * sin_p).to(dt)
        r1 = (k1 * cos_n - k2 * sin_n).to(dt)
        r2 = (k2 * cos_n + k1 * sin_n).to(dt)
    else:
        qr1 = b_q1.to(dt)
        qr2 = b_q2.to(dt)
        r1 = tl.where(m_n[:, None], k1, 0.0).to(dt)
        r2 = tl.where(m_n[:, None], k2, 0.0).to(dt)
    if IEEE:
        b_s = tl.dot(qr1, tl.trans(r1), b_s, input_precision="ieee")
        b_s = tl.dot(qr2, tl.trans(r2), b_s, input_precision="ieee")
    else:
        b_s = tl.dot(qr1, tl.trans(r1), b_s)
        b_s = tl.dot(qr2, tl.trans(r2), b_s)
    return b_s


@triton.jit(do_not_specialize=["num_seqs"])
def _cq_attention_kernel(
    q_ptr,  # [T, Hq, D]
    out_ptr,  # [T, Hq, D] (NUM_SEGMENTS == 1) or float32 [T, Hq, NUM_SEGMENTS, D] partials
    ml_ptr,  # float32 [T, Hq, NUM_SEGMENTS, 2]: running max (log2 domain) and sum per segment
    cache_ptr,  # uint8 [num_blocks, Hkv, block_size, slot_bytes]
    kcb_ptr,  # [Hkv * GK, 256, CK]
    vcb_ptr,  # [Hkv * GV, 256, CV]
    block_table_ptr,  # [S, max_blocks] int32
    seq_lens_ptr,  # [S]
    qsl_ptr,  # [S + 1]
    cos_sin_ptr,  # [max_pos, D]: cos | sin
    num_seqs,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_cb,
    stride_ch,
    stride_co,
    stride_bt,
    stride_cs,
    rope_rows,
    qk_scale,  # softmax scale * log2(e)
    block_size,
    v_offset,
    win,  # recent window W (0: none): keys j <= i - W only, the window kernel attends the rest
    norm_offset,  # byte of each key's float16 norm in its slot (KEY_NORM)
    G: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_M: tl.constexpr,
    HALF: tl.constexpr,
    CK: tl.constexpr,
    GK: tl.constexpr,
    CV: tl.constexpr,
    GV: tl.constexpr,
    IS_NEOX: tl.constexpr,
    HAS_ROPE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_SEGMENTS: tl.constexpr,
    IEEE: tl.constexpr,
    HEAD_MAJOR: tl.constexpr,
    ABLATE: tl.constexpr,
    ROPE_SPLIT: tl.constexpr,
    K_PARTS: tl.constexpr,
    KEY_NORM: tl.constexpr,
    NORM_ON_KEYS: tl.constexpr,
):
    pid_q = tl.program_id(0)
    if HEAD_MAJOR:  # grid (q blocks, segments, kv heads): co-running programs share a head's codebooks
        i_seg = tl.program_id(1)
        i_kvh = tl.program_id(2)
        num_kvh = tl.num_programs(2)
    else:
        i_kvh = tl.program_id(1)
        i_seg = tl.program_id(2)
        num_kvh = tl.num_programs(1)
    i_s, q_start, q_len, qb, seq_len = query_block(qsl_ptr, seq_lens_ptr, pid_q, num_seqs, BLOCK_Q)
    if qb * BLOCK_Q >= q_len:
        return
    ctx = seq_len - q_len
    D: tl.constexpr = 2 * HALF
    tok, head, m_row, q_pos = block_rows(qb, i_kvh, q_len, ctx, G, BLOCK_Q, BLOCK_M)
    p_q = q_ptr + (q_start + tok).to(tl.int64)[:, None] * stride_qt + head[:, None] * stride_qh
    dt = q_ptr.dtype.element_ty
    kcb = kcb_ptr + i_kvh * (GK * 256 * CK)
    vcb = vcb_ptr + i_kvh * (GV * 256 * CV)
    o_d = tl.arange(0, D)
    o_nt = tl.arange(0, BLOCK_N)

    # keys this query block can see, split into segments of whole tiles
    kv_len, t_lo, t_hi = kv_tile_range(seq_len, ctx, qb, i_seg, BLOCK_Q, BLOCK_N, NUM_SEGMENTS, win)

    b_m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    b_l = tl.zeros([BLOCK_M], tl.float32)
    b_acc = tl.zeros([BLOCK_M, D], tl.float32)
    p_bt = block_table_ptr + i_s.to(tl.int64) * stride_bt
    for t in range(t_lo, t_hi):
        o_n = t * BLOCK_N + o_nt
        m_n = o_n < kv_len
        blk = tl.load(p_bt + o_n // block_size, mask=m_n, other=0).to(tl.int64)
        p_slot = cache_ptr + blk * stride_cb + i_kvh * stride_ch + (o_n % block_size) * stride_co  # [BLOCK_N]
        b_s = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        # keys coded as directions (cq2n): q.k = |k| (q.R c), one float16 norm per key, applied to the key
        # tile (NORM_ON_KEYS) or to the scores
        b_norm = _key_norms(p_slot + norm_offset, m_n) if KEY_NORM else m_n.to(tl.float32)
        for c in tl.static_range(K_PARTS):
            b_s = _qk_part(
                b_s, p_q, m_row, p_slot, m_n, o_n, t, kcb, cos_sin_ptr, stride_cs, rope_rows, b_norm, c,
                HALF // K_PARTS, HALF, CK, BLOCK_N, IS_NEOX, HAS_ROPE, ROPE_SPLIT, ABLATE, IEEE,
                KEY_NORM and NORM_ON_KEYS,
            )  # fmt: skip
        if KEY_NORM and not NORM_ON_KEYS:
            b_s = b_s * b_norm[None, :]
        b_s = b_s * qk_scale
        visible = m_n[None, :] & (o_n[None, :] <= q_pos[:, None] - win)
        b_s = tl.where(visible, b_s, float("-inf"))
        b_p, b_alpha, b_m, b_l = softmax_step(b_s, b_m, b_l)
        if ABLATE & 2:  # profiling only: no V gathers
            b_v = tl.load(p_slot[:, None] + v_offset + (o_d // CV)[None, :], mask=m_n[:, None], other=0).to(dt)
        else:
            b_v = _gather_half(p_slot + v_offset, m_n, vcb, 0, GV, CV, BLOCK_N)
        b_v = tl.where(m_n[:, None], b_v, 0.0).to(dt)  # also keeps the reshape off the MMA operand path
        if IEEE:
            b_acc = tl.dot(b_p.to(dt), b_v, b_acc * b_alpha[:, None], input_precision="ieee")
        else:
            b_acc = tl.dot(b_p.to(dt), b_v, b_acc * b_alpha[:, None])

    store_rows(
        out_ptr, ml_ptr, b_acc, b_m, b_l, (q_start + tok).to(tl.int64), head, m_row, stride_ot, stride_oh,
        G * num_kvh, i_seg, D, NUM_SEGMENTS,
    )  # fmt: skip


def paged_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    k_codebook: torch.Tensor,
    v_codebook: torch.Tensor,
    key_bytes: int,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    cos_sin_cache: torch.Tensor | None,
    is_neox: bool,
    max_query_len: int,
    out: torch.Tensor | None = None,
    num_segments: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    block_m: int | None = None,
    head_major: bool = True,
    rope_split: bool | None = None,
    k_parts: int | None = None,
    window: WindowCache | None = None,
    key_norm_offset: int = -1,
    norm_on_keys: bool | None = None,
    _ablate: int = 0,
) -> torch.Tensor:
    """query [T, Hq, D] -> out [T, Hq, D] (query's dtype unless `out` is given); causal, sequence s owns
    queries query_start_loc[s]:[s+1], its last tokens. Codebooks may be float32 or the model dtype
    (what the tensor-core products run in). Requires 8-bit codes, a power-of-two head_dim and (with
    RoPE) rotary_dim == head_dim. `max_query_len` picks the decode (split) or prefill tiling;
    `rope_split` the register-heavy R(P) R(n) rotation (see the module docstring); `k_parts` (a power
    of two) splits each key tile's RoPE pairs into parts gathered, rotated and multiplied one after
    another, so fewer float32 values are live (capped so a part holds >= 16 pairs, what a tensor-core
    product needs, and whole centroids). Defaults, from the H200 timings: decode 32-key tiles in 2
    parts without rope_split (cq4 and cq_k4v1 10-22% faster at 32K x 64 on 2026-12-02 than the old
    form, cq1 the same); prefill the old form, 64-key tiles, one part, rope_split (8K causal cq1 4.95 ms
    on 2026-11-23; the register-cut form took 7.30 ms on 2026-12-02). With a recent
    `window` the codes cover keys j <= i - W and `window_triton` adds the exact window, one softmax.
    `key_norm_offset` >= 0: key codes are directions and each key's float16 norm sits at that slot byte;
    `norm_on_keys` scales the gathered key tile by it instead of the scores (default: prefill only)."""
    t, hq, d = query.shape
    hkv = kv_cache.shape[1]
    num_seqs = seq_lens.shape[0]
    gk_total, kk, ck = k_codebook.shape
    gv_total, kv, cv = v_codebook.shape
    assert kv_cache.stride(3) == 1 and kk == 256 and kv == 256, "8-bit codes in contiguous slots"
    assert d & (d - 1) == 0 and d >= 32, "head_dim must be a power of two >= 32 for the Triton path"
    assert query.stride(2) == 1 and hq % hkv == 0
    assert (d // 2) % ck == 0 and ck % 2 == 0, "centroids must not straddle a RoPE half or split a pair"
    assert key_norm_offset < 0 or (key_norm_offset % 2 == 0 and all(st % 2 == 0 for st in kv_cache.stride()[:3])), (
        "key norms are read as float16: 2-byte aligned slots"
    )
    has_rope = cos_sin_cache is not None
    if has_rope:
        assert cos_sin_cache.shape[1] == d, "partial rotary embeddings take the reference path"
        assert cos_sin_cache.stride(1) == 1
    if out is None:
        out = torch.empty(t, hq, d, dtype=query.dtype, device=query.device)
    if t == 0:
        return out
    decode = max_query_len <= 1
    window_block_n = block_n  # the window merge's own tile: the caller's, else window_triton's defaults
    if rope_split is None:
        rope_split = not decode
    block_n = block_n or (32 if decode else 64)  # decode at 64: twice the registers (kernel_resources.py)
    k_parts = k_parts or (2 if decode else 1)  # kernel_resources.py: 4 spills in cq2 decode
    if norm_on_keys is None:  # prefill's score-layout norm load re-reads the block table per score column
        # (sm_90, kernel_resources.py --norm-on: loop 2,986 -> 2,476 instructions, spills 728 -> 600 B; H200
        # 8K causal cq2n 11.24 -> 7.99 ms); decode's 16-row scores are cheaper to scale (10.48 ms at 64 x 32K)
        norm_on_keys = not decode
    assert k_parts & (k_parts - 1) == 0, "k_parts must be a power of two"
    k_parts = max(1, min(k_parts, (d // 2) // max(16, ck)))
    plan = plan_launch(query, out, hkv, num_seqs, max_query_len, num_segments, block_m, 2 if window else 1)
    nq = plan.num_query_blocks(t, num_seqs)
    grid = (nq, plan.num_segments, hkv) if head_major else (nq, hkv, plan.num_segments)
    _cq_attention_kernel[grid](
        query,
        plan.target,
        plan.ml,
        kv_cache,
        k_codebook,
        v_codebook,
        block_table,
        seq_lens,
        query_start_loc,
        cos_sin_cache if has_rope else query,
        num_seqs,
        query.stride(0),
        query.stride(1),
        plan.stride_ot,
        plan.stride_oh,
        kv_cache.stride(0),
        kv_cache.stride(1),
        kv_cache.stride(2),
        block_table.stride(0),
        cos_sin_cache.stride(0) if has_rope else 0,
        cos_sin_cache.shape[0] if has_rope else 0,
        float(scale) * LOG2E,
        kv_cache.shape[2],
        key_bytes,
        window.W if window is not None else 0,
        max(key_norm_offset, 0),
        G=hq // hkv,
        BLOCK_Q=plan.block_q,
        BLOCK_M=plan.block_m,
        HALF=d // 2,
        CK=ck,
        GK=gk_total // hkv,
        CV=cv,
        GV=gv_total // hkv,
        IS_NEOX=is_neox,
        HAS_ROPE=has_rope,
        BLOCK_N=block_n,
        NUM_SEGMENTS=plan.num_segments,
        IEEE=query.dtype == torch.float32,
        HEAD_MAJOR=head_major,
        ABLATE=_ablate,
        ROPE_SPLIT=rope_split,
        K_PARTS=k_parts,
        KEY_NORM=key_norm_offset >= 0,
        NORM_ON_KEYS=norm_on_keys,
        num_warps=num_warps or 4,
        # a stored key norm at 3 decode stages doubles the pipeline's shared memory (4 -> 2 programs per
        # SM on sm_90, kernel_resources.py); at 2 it has cq2's profile (106 registers, 46 KB, 4 per SM):
        # H200, 64 x 32K, cq2n 12.47 ms at 3 stages, 10.48 at 2 (cq2 10.27).
        num_stages=num_stages or (1 if not decode else 2 if key_norm_offset >= 0 else 3),
    )
    if window is not None:
        return attend_window_and_merge(query, out, plan, window, seq_lens, query_start_loc, scale, window_block_n)
    return plan.finish(out, query_start_loc)
