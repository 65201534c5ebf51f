"""Triton: encode a step's new keys and values into CQ codes and store them in vLLM's paged cache.

One launch per layer for K and V together, one program per (16 tokens, kv head, code group; prefill-sized
steps take more tokens per program, LARGE_BLOCK_T below): a decode
step of 64 sequences is 4 x heads x (key + value groups) programs, not 2 x heads, so small decode-step
writes spread over the GPU instead of running each head's groups one after another (2026-11-23, H200:
0.33 ms for a 64-sequence cq1 step with one program per (32 tokens, head)). 16 tokens keep the widest
form (cq1, 8-channel groups, keys un-rotated) at 128 registers without spills for sm_90 (Triton 3.9,
cuobjdump); 32 spilled. Keys arrive post-RoPE (as vLLM hands them over) and are un-rotated in registers
at the token's position, which the program derives from query_start_loc / seq_lens (CUDA-graph safe, no
host-side positions). Per group: distances to all 256 centroids of the group's codebook (`_encode_group`),
argmin, one byte stored in the token's slot. 8-bit codes only (every registered format); the reference
is `naive.write_kv_cache`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Tokens per program: BLOCK_T for decode-sized steps (many small programs spread a small step over the
# GPU). Steps of at least LARGE_STEP tokens take LARGE_BLOCK_T tokens with LARGE_NUM_WARPS, their groups
# of >= MATMUL_MIN_C channels as a matmul whose products run on tensor cores as three TF32 products
# ("tf32x3": float32-level error; the argmin differs from float32 FMAs only at near-ties). Each program
# reads its group's whole codebook, so 16-token programs re-read 2.1 GB of codebooks per 8K-token chunk
# of 8 KV heads. 8K-token chunk, 8 KV heads, H200, 2026-12-03 (ninth session, `attention_bench
# --write-set`, benchmarks/results/attention-h200-2026-12-03-s9.json; tokens per program / warps), ms:
#   cq1:  16 / 4 FMA 1.82 (before), 16 / 4 tf32x3 0.83, 64 / 8 tf32x3 1.05, 64 / 4 tf32x3 0.48,
#         128 / 8 tf32x3 0.54, 128 / 4 tf32x3 1.53, 256 / 4 tf32x3 4.77
#   cq4 (2-channel groups): per channel at 16 tokens 4.84 (before; 32 / 64 / 128 tokens spill: 12 / 36 /
#         154), as tf32x3 matmuls (channels zero-padded to 16) at 16 / 4: 3.68, 64 / 4: 1.97
#   cq2 0.95-0.96, cq_k4v1 1.13-1.14 at 64 / 4 as matmuls (their per-channel rows were not re-measured)
# 64 tokens with 4 warps is the setting measured for every format.
# LARGE_STEP: decode steps of many sequences are faster in the large-step form too. H200, 2026-12-03
# (eleventh session, benchmarks/results/write-h200-2026-12-03-s11.json), us per layer, small -> large form:
#   cq1:     8 seqs 6.4 -> 7.2, 32: 11.8 -> 7.3, 64: 21.0 -> 7.7, 128: 38.8 -> 12.3
#   cq4:     8 seqs 11.3 -> 20.2, 32: 19.0 -> 20.5, 64: 34.3 -> 21.1, 128: 64.9 -> 38.0
#   cq_k4v1: 8 seqs 10.6 -> 14.0, 32: 16.3 -> 14.7, 64: 31.5 -> 15.1; cq2 at 128: 55.6 -> 20.6
# (e2e cq1 128 x (4096+512): 2,828 -> 2,884 out tok/s). Steps of 32+ tokens take it (256 before).
BLOCK_T, LARGE_STEP, LARGE_BLOCK_T, LARGE_NUM_WARPS = 16, 32, 64, 4
DOT_PRECISION, MATMUL_MIN_C = "tf32x3", 2
# Decode-sized steps (under LARGE_STEP tokens): float32 FMA products, 8-channel groups as matmuls, the
# rest per channel. In an e2e profile (cq1, 128 x (4096+512), H200, 2026-12-03) a 128-token step took
# 40 us per layer in this form (7% of a decode step), which is why such steps now take the large form.
# SMALL_* let `attention_bench --write-set` time other settings. Per step of 128 tokens, cq1: tf32x3
# 18.4 us, tf32x3 with 8 warps 21.9; cq4 with tf32x3 2-channel matmuls 68.6; cq2 31.7.
SMALL_NUM_WARPS, SMALL_PRECISION, SMALL_MATMUL_MIN_C = 4, "ieee", 8
# Prefill-sized steps with one program per (token block, head, K or V) looping over the groups instead of
# one per group: each token's position search, un-rotation rows and norm once per block instead of once
# per key group, the rows' cache lines reused from L1, 16x fewer programs. H200, 8K-token chunk, ms
# (2026-12-03, eleventh session): cq1 0.495 -> 0.469, cq4 2.040 -> 1.923; with 8 warps 0.961 / 3.908.
# A 5% gain measured once, with no vLLM test through it yet: off.
LARGE_GROUP_LOOP = False
# The argmin over a group's 256 distances as one integer min: each squared distance's float32 bits (which
# order like the floats for distances >= 0) with the low 8 bits replaced by the centroid's index, so `min`
# alone finds the nearest and its index; distances within 2^-15 of each other go to the lower index (exact
# ties do in torch.argmin too). Where the matmul has two padding channels (groups of <= 14 channels) it
# yields the distance itself, [x, 1, |x|^2] . [-2c, |c|^2, 1], so no arithmetic per distance is left but
# one LOP3 and the min. Why: cq4's 8K-token write takes 2.03 ms on the H200 (cq1 0.49; 64 groups per head
# against 16), and programs x SASS instructions / issue rate accounts for about half of that: tl.argmin's
# (value, index) pairs take most of each program's instructions. Static sm_90 SASS per program
# (`benchmarks/kernel_resources.py` on the CPU, 2026-12-04), tl.argmin -> packed: prefill-step form cq1
# 3,627 -> 2,721, cq4 3,717 -> 3,213, cq2 3,651 -> 2,749, cq_k4v1 3,487 -> 2,612, registers 172-210 ->
# 167-171 (3 programs per SM instead of 2 for cq1, cq2, cq4); decode-step form cq4 2,688 -> 1,319,
# cq1 2,825 -> 2,130. Written without a GPU: off until `attention_bench --kinds write --write-set
# PACKED_ARGMIN=1` times it faster (the write tests run both forms).
PACKED_ARGMIN = False
# Integers that change from step to step. Triton specializes integer arguments on == 1 and divisibility
# by 16 unless told not to, so each new combination of them compiled another copy of the kernel while
# serving (vLLM 0.26's JIT monitor warned of it on the H200). Every per-step kernel leaves them generic.
PER_STEP_ARGS = ["num_tokens", "num_seqs", "search_steps"]


@triton.jit
def _unrope(x_rows, x, o, m, cos_rows, HALF: tl.constexpr, IS_NEOX: tl.constexpr):
    """Pre-RoPE value of channels o (any shape, broadcast with the [BLOCK_T] row pointers' shape):
    x cos + partner sin for the first channel of a rotation pair, x cos - partner sin for the second."""
    if IS_NEOX:  # pairs (i, i + D/2)
        first = o < HALF
        partner = tl.where(first, o + HALF, o - HALF)
        i_pair = o % HALF
    else:  # pairs (2i, 2i + 1)
        first = o % 2 == 0
        partner = tl.where(first, o + 1, o - 1)
        i_pair = o // 2
    b_p = tl.load(x_rows + partner, mask=m, other=0.0).to(tl.float32)
    b_cos = tl.load(cos_rows + i_pair, mask=m, other=1.0)
    b_sin = tl.load(cos_rows + HALF + i_pair, mask=m, other=0.0)
    return x * b_cos + tl.where(first, b_p, -b_p) * b_sin


@triton.jit
def _encode_group(
    x_rows,  # [BLOCK_T] pointers to each token's D channels of this head
    m_t,  # [BLOCK_T] real tokens with a slot
    cb_ptr,  # this head's codebook [G, 256, C] float32
    g,  # the group: channels g*C .. g*C + C - 1
    dst,  # [BLOCK_T] pointers to each token's first code byte
    cos_rows,  # [BLOCK_T] pointers to each token's cos row (sin at + HALF); unused without ROTATE
    C: tl.constexpr,
    C_DOT: tl.constexpr,
    HALF: tl.constexpr,
    ROTATE: tl.constexpr,
    IS_NEOX: tl.constexpr,
    BLOCK_T: tl.constexpr,
    PRECISION: tl.constexpr,
    MATMUL_C: tl.constexpr,
    PACKED: tl.constexpr,
    inv_norm=None,  # [BLOCK_T] float32: code x * inv_norm (the direction of a key with a stored norm)
):
    """Nearest of the group's 256 centroids for BLOCK_T tokens (the codebook is read once per BLOCK_T
    tokens). Groups of >= MATMUL_C channels: argmin |c|^2 - 2 x.c with the products as one matmul
    (channels zero-padded to C_DOT = 16) in PRECISION. Smaller groups: squared distances accumulated one
    channel at a time. Which form is faster was measured: in float32 FMAs, cq1's 8-channel groups took
    1.35 ms per 8K-token chunk as a matmul (H100) vs 11.3 ms per channel (H200), cq4's 2-channel groups
    7.0 vs 6.7 ms (2026-11-23), so decode steps keep 2- and 4-channel groups per channel; as tf32x3 on
    tensor cores the padded matmul wins for 2-channel groups too (module note above)."""
    o_k = tl.arange(0, 256)
    if C >= MATMUL_C:
        o_c = tl.arange(0, C_DOT)
        m_c = o_c < C
        m_x = m_t[:, None] & m_c[None, :]
        o = g * C + o_c
        b_x = tl.load(x_rows[:, None] + o[None, :], mask=m_x, other=0.0).to(tl.float32)
        if ROTATE:
            b_x = _unrope(x_rows[:, None], b_x, o[None, :], m_x, cos_rows[:, None], HALF, IS_NEOX)
        if inv_norm is not None:
            b_x = b_x * inv_norm[:, None]
        b_cb = tl.load(cb_ptr + (g * 256 + o_k[:, None]) * C + o_c[None, :], mask=m_c[None, :], other=0.0)
        b_norm = tl.sum(b_cb * b_cb, axis=1)  # [256]
        if PACKED and C + 2 <= C_DOT:  # the squared distance straight from the matmul: [x, 1, |x|^2] .
            # [-2c, |c|^2, 1] in two of the padding channels, so no per-distance arithmetic is left
            b_xx = tl.sum(b_x * b_x, axis=1)
            b_x = tl.where(o_c[None, :] == C, 1.0, tl.where(o_c[None, :] == C + 1, b_xx[:, None], b_x))
            b_cb = tl.where(o_c[None, :] == C, b_norm[:, None], tl.where(o_c[None, :] == C + 1, 1.0, -2.0 * b_cb))
            code = _nearest_packed(tl.dot(b_x, tl.trans(b_cb), input_precision=PRECISION), o_k)
        else:
            b_xc = tl.dot(b_x, tl.trans(b_cb), input_precision=PRECISION)  # [BLOCK_T, 256]
            if PACKED:  # no padding channel to spare (16-channel groups): |x|^2 added per distance
                code = _nearest_packed(tl.sum(b_x * b_x, axis=1)[:, None] + b_norm[None, :] - 2.0 * b_xc, o_k)
            else:
                code = tl.argmin(b_norm[None, :] - 2.0 * b_xc, axis=1)
    else:
        b_d = tl.zeros([BLOCK_T, 256], tl.float32)
        for j in tl.static_range(C):
            o = g * C + j
            b_x = tl.load(x_rows + o, mask=m_t, other=0.0).to(tl.float32)
            if ROTATE:
                b_x = _unrope(x_rows, b_x, o, m_t, cos_rows, HALF, IS_NEOX)
            if inv_norm is not None:
                b_x = b_x * inv_norm
            b_c = tl.load(cb_ptr + (g * 256 + o_k) * C + j)  # [256]
            b_diff = b_x[:, None] - b_c[None, :]
            b_d += b_diff * b_diff
        code = _nearest_packed(b_d, o_k) if PACKED else tl.argmin(b_d, axis=1)
    tl.store(dst + g, code.to(tl.uint8), mask=m_t)


@triton.jit
def _nearest_packed(b_d, o_k):
    """Index of each row's least distance in [BLOCK_T, 256] float32 distances (PACKED_ARGMIN): their bits
    as int32 order like the floats for d >= 0, the low 8 bits make room for the index. A distance that
    rounding left just below zero has its sign bit set, so it sorts first: it is the nearest anyway."""
    key = (b_d.to(tl.int32, bitcast=True) & -256) | o_k[None, :]
    return tl.min(key, axis=1) & 255


@triton.jit
def _key_norm(x_rows, m_t, dst, norm_offset, is_first, D: tl.constexpr, D_P2: tl.constexpr):
    """1/|x| of each token's key row (RoPE keeps the norm, so the post-RoPE row gives it); the program of
    group 0 also stores |x| as float16 (two little-endian bytes at dst + norm_offset), clamped to float16's
    largest finite value like the reference (`naive.NORM_MAX`, `naive.NORM_EPS`)."""
    o_d = tl.arange(0, D_P2)
    m = m_t[:, None] & (o_d < D)[None, :]
    b_x = tl.load(x_rows[:, None] + o_d[None, :], mask=m, other=0.0).to(tl.float32)
    norm = tl.sqrt(tl.sum(b_x * b_x, axis=1))
    if is_first:
        bits = tl.minimum(norm, 65504.0).to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        tl.store(dst + norm_offset, (bits & 0xFF).to(tl.uint8), mask=m_t)
        tl.store(dst + norm_offset + 1, (bits >> 8).to(tl.uint8), mask=m_t)
    return 1.0 / tl.maximum(norm, 1e-6)


@triton.jit(do_not_specialize=PER_STEP_ARGS)
def _write_kv_kernel(
    k_ptr,  # [N, H, D]
    v_ptr,  # [N, H, D]
    kcb_ptr,  # [H * GK, 256, CK] float32
    vcb_ptr,  # [H * GV, 256, CV] float32
    cache_ptr,  # uint8 [num_blocks, H, block_size, slot_bytes] (any strides)
    slot_ptr,  # [N] int, -1 = skip
    qsl_ptr,  # [S + 1]
    seq_lens_ptr,  # [S]
    cos_sin_ptr,  # [max_pos, D]: cos | sin
    num_tokens,
    num_seqs,
    search_steps,
    stride_kn,
    stride_kh,
    stride_vn,
    stride_vh,
    stride_cb,
    stride_ch,
    stride_co,
    stride_cs,
    block_size,
    v_offset,
    norm_offset,  # byte of the key's float16 norm in the slot (KEY_NORM)
    GK: tl.constexpr,
    CK: tl.constexpr,
    GV: tl.constexpr,
    CV: tl.constexpr,
    HALF: tl.constexpr,
    HAS_ROPE: tl.constexpr,
    IS_NEOX: tl.constexpr,
    BLOCK_T: tl.constexpr,
    KEY_NORM: tl.constexpr,
    D_P2: tl.constexpr,
    PRECISION: tl.constexpr,
    MATMUL_C: tl.constexpr,
    GROUP_LOOP: tl.constexpr,
    PACKED: tl.constexpr,
):
    i_h = tl.program_id(1)
    # GROUP_LOOP: program 0 of axis 2 encodes every key group, program 1 every value group (positions
    # and norms once per token block, the rows' lines reused from L1); else one group per program:
    # key groups 0 .. GK-1, then value groups
    i_g = tl.program_id(2) * (GK if GROUP_LOOP else 1)
    o_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    slot = tl.load(slot_ptr + o_t, mask=o_t < num_tokens, other=-1).to(tl.int64)
    m_t = slot >= 0
    slot = tl.where(m_t, slot, 0)
    dst = cache_ptr + (slot // block_size) * stride_cb + i_h * stride_ch + (slot % block_size) * stride_co
    o_t64 = o_t.to(tl.int64)
    if i_g < GK:
        cos_rows = tl.zeros([BLOCK_T], tl.int64) + cos_sin_ptr
        if HAS_ROPE:  # each token's sequence: decode tokens come first (token i = sequence i), checked
            # with two independent loads; a block with any other token runs a vectorized binary search
            # over query_start_loc (`varlen.find_seq` does the same per program)
            guess = tl.minimum(o_t, num_seqs - 1)
            hit = (tl.load(qsl_ptr + guess) <= o_t) & (tl.load(qsl_ptr + guess + 1) > o_t)
            lo = tl.where(hit, guess, 0)
            hi = tl.where(hit, guess, num_seqs - 1)
            all_hit = tl.min((hit | (o_t >= num_tokens)).to(tl.int32), axis=0)
            for _ in range(search_steps * (1 - all_hit)):
                mid = (lo + hi + 1) // 2
                ok = tl.load(qsl_ptr + mid) <= o_t
                lo = tl.where(ok, mid, lo)
                hi = tl.where(ok, hi, mid - 1)
            q_start = tl.load(qsl_ptr + lo)
            q_len = tl.load(qsl_ptr + lo + 1) - q_start
            pos = tl.load(seq_lens_ptr + lo) - q_len + (o_t - q_start)
            pos = tl.where(m_t, pos, 0)
            cos_rows = cos_sin_ptr + pos.to(tl.int64) * stride_cs
        x_rows = k_ptr + o_t64 * stride_kn + i_h * stride_kh
        cb = kcb_ptr + i_h * GK * 256 * CK
        inv_norm = None  # keys coded as directions (KEY_NORM): 1/|x| of each token's key
        if KEY_NORM:
            inv_norm = _key_norm(x_rows, m_t, dst, norm_offset, i_g == 0, 2 * HALF, D_P2)
        # Two calls rather than one loop of 1 or GK iterations: as a loop, even of one iteration, the measured
        # default form compiled to 230 registers instead of 172 (cq1, sm_90). The group loop is not
        # software-pipelined: its buffers would cost the registers the loop needs.
        if GROUP_LOOP:
            for g in tl.range(0, GK, num_stages=1):
                _encode_group(
                    x_rows, m_t, cb, g, dst, cos_rows, CK, max(16, CK), HALF, HAS_ROPE, IS_NEOX, BLOCK_T, PRECISION,
                    MATMUL_C, PACKED, inv_norm,
                )  # fmt: skip
        else:
            _encode_group(
                x_rows, m_t, cb, i_g, dst, cos_rows, CK, max(16, CK), HALF, HAS_ROPE, IS_NEOX, BLOCK_T, PRECISION,
                MATMUL_C, PACKED, inv_norm,
            )  # fmt: skip
    else:
        x_rows = v_ptr + o_t64 * stride_vn + i_h * stride_vh
        cb = vcb_ptr + i_h * GV * 256 * CV
        if GROUP_LOOP:
            for g in tl.range(0, GV, num_stages=1):
                _encode_group(
                    x_rows, m_t, cb, g, dst + v_offset, x_rows, CV, max(16, CV), HALF, False, IS_NEOX, BLOCK_T,
                    PRECISION, MATMUL_C, PACKED,
                )  # fmt: skip
        else:
            _encode_group(
                x_rows, m_t, cb, i_g - GK, dst + v_offset, x_rows, CV, max(16, CV), HALF, False, IS_NEOX, BLOCK_T,
                PRECISION, MATMUL_C, PACKED,
            )  # fmt: skip


def launch_settings(n: int, ck: int, cv: int) -> tuple[int, int, str, int, bool]:
    """(tokens per program, warps, x.c precision, least channels of a matmul group, one program per K / V
    looping over its groups) for a step of n tokens with ck / cv channels per key / value centroid:
    prefill-sized steps take the LARGE_* settings, with LARGE_BLOCK_T only where every group is a matmul
    (per-channel distances spill above 16 tokens)."""
    if n < LARGE_STEP:
        return BLOCK_T, SMALL_NUM_WARPS, SMALL_PRECISION, SMALL_MATMUL_MIN_C, False
    block_t = LARGE_BLOCK_T if min(ck, cv) >= MATMUL_MIN_C else BLOCK_T
    return block_t, 4 if block_t <= 16 else LARGE_NUM_WARPS, DOT_PRECISION, MATMUL_MIN_C, LARGE_GROUP_LOOP


def write_kv_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_codebook: torch.Tensor,
    v_codebook: torch.Tensor,
    key_bytes: int,
    query_start_loc: torch.Tensor | None = None,
    seq_lens: torch.Tensor | None = None,
    cos_sin_cache: torch.Tensor | None = None,
    is_neox: bool = True,
    key_norm_offset: int = -1,
) -> None:
    """Store codes of key/value [N, H, D] (codebooks float32 [H*D/c, 256, c]) at slot_mapping[n]
    (-1 = skip). With `cos_sin_cache`, keys are post-RoPE and token n sits at position
    seq_lens[s] - q_len[s] + (n - query_start_loc[s]) of its sequence s. `key_norm_offset` >= 0: keys
    are coded as direction (x/|x|) and |x| is stored as float16 at that byte of the slot (cq2n)."""
    n, h, d = key.shape
    gk_total, kk, ck = k_codebook.shape
    gv_total, kv, cv = v_codebook.shape
    assert kk == 256 and kv == 256, "the Triton write kernel stores 8-bit codes"
    assert gk_total == h * (d // ck) and gv_total == h * (d // cv)
    has_rope = cos_sin_cache is not None
    if has_rope:
        assert query_start_loc is not None and seq_lens is not None, "un-rotating keys needs their positions"
        assert cos_sin_cache.shape[1] == d and cos_sin_cache.stride(1) == 1
    if n == 0:
        return
    key = key if key.stride(-1) == 1 else key.contiguous()
    value = value if value.stride(-1) == 1 else value.contiguous()
    block_t, num_warps, precision, matmul_c, group_loop = launch_settings(n, ck, cv)
    num_seqs = seq_lens.shape[0] if has_rope else 1
    _write_kv_kernel[(triton.cdiv(n, block_t), h, 2 if group_loop else d // ck + d // cv)](
        key,
        value,
        k_codebook.contiguous(),
        v_codebook.contiguous(),
        kv_cache,
        slot_mapping,
        query_start_loc if has_rope else slot_mapping,
        seq_lens if has_rope else slot_mapping,
        cos_sin_cache if has_rope else k_codebook,
        n,
        num_seqs,
        max(1, num_seqs - 1).bit_length(),
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        kv_cache.stride(0),
        kv_cache.stride(1),
        kv_cache.stride(2),
        cos_sin_cache.stride(0) if has_rope else 0,
        kv_cache.shape[2],
        key_bytes,
        max(key_norm_offset, 0),
        GK=d // ck,
        CK=ck,
        GV=d // cv,
        CV=cv,
        HALF=d // 2,
        HAS_ROPE=has_rope,
        IS_NEOX=is_neox,
        BLOCK_T=block_t,
        KEY_NORM=key_norm_offset >= 0,
        D_P2=triton.next_power_of_2(d),
        PRECISION=precision,
        MATMUL_C=matmul_c,
        GROUP_LOOP=group_loop,
        PACKED=PACKED_ARGMIN,
        num_warps=num_warps,
    )
