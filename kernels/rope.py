"""Rotary position embedding in plain torch, in vLLM's `cos_sin_cache` convention.

CQ stores keys *before* RoPE (codebooks then need not model position). vLLM hands the attention
backend post-RoPE keys, so the cache write un-rotates them (`inverse=True`), and attention rotates the
looked-up centroids by each key's position. A rotation is orthogonal, so un-rotating is exact up to
rounding.

`cos_sin_cache` is [max_position, rotary_dim]: cos in the first rotary_dim/2 columns, sin in the rest
(what vLLM's `RotaryEmbedding.cos_sin_cache` holds). `is_neox` pairs channel i with i + rotary_dim/2
(Llama, HF "rotate_half"); otherwise pairs are interleaved (2i, 2i+1, GPT-J).
"""

from __future__ import annotations

import torch


def build_cos_sin_cache(
    rotary_dim: int, max_position: int, base: float = 10000.0, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Plain (unscaled) RoPE table, [max_position, rotary_dim]."""
    inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim))
    t = torch.arange(max_position, dtype=torch.float64)
    freqs = torch.outer(t, inv_freq)
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(dtype)


def apply_rope(
    x: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    is_neox: bool = True,
    inverse: bool = False,
) -> torch.Tensor:
    """Rotate x [T, H, D] (or [T, D]) by positions [T]; channels past rotary_dim pass through.

    `inverse=True` rotates by -position (undoes RoPE). Computes in float32, returns x's dtype.
    """
    rotary_dim = cos_sin_cache.shape[-1]
    cs = cos_sin_cache.index_select(0, positions.long()).float()
    cos, sin = cs.chunk(2, dim=-1)  # [T, rotary_dim/2]
    if inverse:
        sin = -sin
    if x.dim() == 3:
        cos, sin = cos[:, None, :], sin[:, None, :]
    xf = x.float()
    rot, rest = xf[..., :rotary_dim], xf[..., rotary_dim:]
    if is_neox:
        x1, x2 = rot.chunk(2, dim=-1)
        out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    else:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        out = torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)
    return torch.cat([out, rest], dim=-1).to(x.dtype)
