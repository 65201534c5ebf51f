"""Entry points the attention backend calls for KVTQ formats: CUDA tensors take the Triton kernels
(`triton_ops.py`), everything else the plain-torch reference (`naive.py`); `VLLM_CQ_KERNELS=reference`
forces the reference (debugging)."""

from __future__ import annotations

import torch

from vllm_cq.formats import KVFormat
from vllm_cq.kernels.dispatch import into_out, max_query_len_of, triton_enabled
from vllm_cq.kernels.kvtq import naive
from vllm_cq.kernels.window import WindowCache


def write_kv_cache(
    key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor, fmt: KVFormat
) -> None:
    """Quantize key/value [N, H, D] (as vLLM hands them over, post-RoPE) into slot_mapping's slots."""
    if triton_enabled(key.device):
        from vllm_cq.kernels.kvtq.triton_ops import write_kv_cache as triton_write

        triton_write(key, value, kv_cache, slot_mapping, fmt)
    else:
        naive.write_kv_cache(key, value, kv_cache, slot_mapping, fmt)


def paged_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    fmt: KVFormat,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    max_query_len: int | None = None,
    out: torch.Tensor | None = None,
    levelwise: str = "none",
    window: WindowCache | None = None,
) -> torch.Tensor:
    """Causal attention over the KVTQ paged cache, into `out` when given (else query's dtype).
    `levelwise` selects the Triton kernel's level-wise sides ("none", "k", "v", "kv"; see
    `triton_ops`) for benchmarks; the vLLM backend keeps the default, and the reference path computes
    the same attention either way. A recent `window` (keys i - W < j <= i exact) runs in both."""
    d = query.shape[-1]
    if not (triton_enabled(query.device) and d & (d - 1) == 0 and d >= 16):
        res = naive.paged_attention(query, kv_cache, fmt, block_table, seq_lens, query_start_loc, scale, window)
        return into_out(res, out, query.dtype)
    from vllm_cq.kernels.kvtq.triton_ops import paged_attention as triton_attention

    if max_query_len is None:
        max_query_len = max_query_len_of(query_start_loc)
    return triton_attention(
        query, kv_cache, fmt, block_table, seq_lens, query_start_loc, scale, max_query_len, out=out,
        levelwise=levelwise, window=window,
    )  # fmt: skip
