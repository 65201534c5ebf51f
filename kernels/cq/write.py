"""Triton: encode K or V into CQ codes and store them in vLLM's paged cache (first correct version).

One program per (token, kv head): for each channel group, the squared distance to all 2**b centroids
of that group's codebook, argmin, one byte stored in the token's slot. 8-bit codes only (every
registered format); the reference is `naive.write_kv_cache`. Keys arrive post-RoPE and are
un-rotated in torch first (`ops.write_kv_cache`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _encode_store_kernel(
    x_ptr,  # [N, H, D] float
    cb_ptr,  # [H * G, K, C] float32
    cache_ptr,  # uint8 [num_blocks, H, block_size, slot_bytes] (any strides)
    slot_ptr,  # [N] int, -1 = skip
    stride_xn,
    stride_xh,
    stride_cb,
    stride_ch,
    stride_co,
    byte_offset,
    block_size,
    G: tl.constexpr,
    K: tl.constexpr,
    C: tl.constexpr,
    C_PAD: tl.constexpr,
):
    i_n = tl.program_id(0)
    i_h = tl.program_id(1)
    slot = tl.load(slot_ptr + i_n).to(tl.int64)
    if slot < 0:
        return
    o_k = tl.arange(0, K)
    o_c = tl.arange(0, C_PAD)
    m_c = o_c < C
    p_dst = cache_ptr + (slot // block_size) * stride_cb + i_h * stride_ch + (slot % block_size) * stride_co
    for g in range(G):
        b_x = tl.load(x_ptr + i_n * stride_xn + i_h * stride_xh + g * C + o_c, mask=m_c, other=0.0).to(tl.float32)
        p_cb = cb_ptr + ((i_h * G + g) * K + o_k[:, None]) * C + o_c[None, :]
        b_cb = tl.load(p_cb, mask=m_c[None, :], other=0.0)
        b_d = tl.sum((b_cb - b_x[None, :]) * (b_cb - b_x[None, :]), axis=1)  # [K]
        code = tl.argmin(b_d, axis=0)
        tl.store(p_dst + byte_offset + g, code.to(tl.uint8))


def encode_store(
    x: torch.Tensor, codebook: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor, byte_offset: int
) -> None:
    """Store the codes of x [N, H, D] (codebook [H*D/c, 2**8, c]) at bytes byte_offset.. of each slot."""
    n, h, d = x.shape
    g_total, k, c = codebook.shape
    assert k == 256, "the Triton write kernel stores 8-bit codes"
    assert g_total == h * (d // c)
    if n == 0:
        return
    x = x.contiguous() if x.stride(-1) != 1 else x
    _encode_store_kernel[(n, h)](
        x,
        codebook.contiguous(),
        kv_cache,
        slot_mapping,
        x.stride(0),
        x.stride(1),
        kv_cache.stride(0),
        kv_cache.stride(1),
        kv_cache.stride(2),
        byte_offset,
        kv_cache.shape[2],
        G=d // c,
        K=k,
        C=c,
        C_PAD=max(2, triton.next_power_of_2(c)),
    )
