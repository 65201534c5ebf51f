"""Entry points the attention backend calls: write codes into the paged cache, attend over codes.

CUDA tensors with 8-bit codes take the Triton kernels (`write.py`, `attention.py`); everything else
(CPU, other bit widths, partial rotary) takes the plain-torch reference (`naive.py`), which the
kernels are tested against. `VLLM_CQ_KERNELS=reference` forces the reference everywhere (debugging).
"""

from __future__ import annotations

import os

import torch

from vllm_cq.formats import KVFormat
from vllm_cq.kernels.cq import naive
from vllm_cq.kernels.rope import apply_rope


def token_seq_and_positions(
    query_start_loc: torch.Tensor, seq_lens: torch.Tensor, num_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence index and position of each new token of a vLLM varlen batch: a sequence's new tokens
    are its last ones, so token j of sequence s sits at seq_lens[s] - q_len[s] + j."""
    q_lens = query_start_loc[1:] - query_start_loc[:-1]
    seq = torch.repeat_interleave(torch.arange(q_lens.numel(), device=q_lens.device), q_lens, output_size=num_tokens)
    pos = (seq_lens - q_lens)[seq] + torch.arange(num_tokens, device=q_lens.device) - query_start_loc[:-1][seq]
    return seq, pos


def _triton_ok(device: torch.device, fmt: KVFormat) -> bool:
    if device.type != "cuda" or os.environ.get("VLLM_CQ_KERNELS", "") == "reference":
        return False
    return getattr(fmt.key, "bits", 0) == 8 and getattr(fmt.value, "bits", 0) == 8


def write_kv_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_codebook: torch.Tensor,
    v_codebook: torch.Tensor,
    fmt: KVFormat,
    positions: torch.Tensor | None = None,
    cos_sin_cache: torch.Tensor | None = None,
    is_neox: bool = True,
) -> None:
    """Same contract as `naive.write_kv_cache`."""
    if not _triton_ok(key.device, fmt):
        naive.write_kv_cache(
            key, value, kv_cache, slot_mapping, k_codebook, v_codebook, fmt, positions, cos_sin_cache, is_neox
        )
        return
    from vllm_cq.kernels.cq.write import encode_store

    if cos_sin_cache is not None:
        key = apply_rope(key, positions, cos_sin_cache, is_neox, inverse=True)
    encode_store(key, k_codebook, kv_cache, slot_mapping, 0)
    encode_store(value, v_codebook, kv_cache, slot_mapping, fmt.key_bytes(key.shape[-1]))


def paged_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    k_codebook: torch.Tensor,
    v_codebook: torch.Tensor,
    fmt: KVFormat,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    cos_sin_cache: torch.Tensor | None = None,
    is_neox: bool = True,
    token_seq: torch.Tensor | None = None,
    positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same contract as `naive.paged_attention` (causal). `token_seq` / `positions` are
    `token_seq_and_positions(...)` when the caller already has them (the backend computes them once
    per step instead of once per layer)."""
    d = query.shape[-1]
    triton_ok = _triton_ok(query.device, fmt) and d & (d - 1) == 0
    if not triton_ok or (cos_sin_cache is not None and cos_sin_cache.shape[1] != d):
        return naive.paged_attention(
            query,
            kv_cache,
            k_codebook,
            v_codebook,
            fmt,
            block_table,
            seq_lens,
            query_start_loc,
            scale,
            cos_sin_cache,
            is_neox,
        )
    from vllm_cq.kernels.cq.attention import paged_attention as triton_paged_attention

    if token_seq is None or positions is None:
        token_seq, positions = token_seq_and_positions(query_start_loc, seq_lens, query.shape[0])
    return triton_paged_attention(
        query,
        kv_cache,
        k_codebook,
        v_codebook,
        fmt.key_bytes(d),
        block_table,
        token_seq,
        positions,
        scale,
        cos_sin_cache,
        is_neox,
    )
