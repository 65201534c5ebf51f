"""Entry points the attention backend calls: write codes into the paged cache, attend over codes.

CUDA tensors with 8-bit codes attend through the CUDA kernels with shared-memory codebooks where they
cover the shape (`decode_cuda.py`, `prefill_cuda.py`), else through the Triton kernel (`attention.py`),
and always write through the Triton write kernel (`write.py`). Everything else (CPU, other bit widths,
partial rotary) takes the plain-torch reference (`naive.py`), which the kernels are tested against.
`VLLM_CQ_KERNELS=reference` forces the reference everywhere (debugging).
"""

from __future__ import annotations

import dataclasses

import torch

from vllm_cq.formats import KVFormat
from vllm_cq.kernels.cq import naive
from vllm_cq.kernels.dispatch import into_out, max_query_len_of, triton_enabled
from vllm_cq.kernels.window import WindowCache


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
    """8-bit codes; a stored norm is supported on keys only (the value kernels have no norm)."""
    if not triton_enabled(device):
        return False
    eight_bit = getattr(fmt.key, "bits", 0) == 8 and getattr(fmt.value, "bits", 0) == 8
    return eight_bit and not getattr(fmt.value, "norm", False)


def key_norm_offset(fmt: KVFormat, head_dim: int) -> int:
    """Where the kernels find a key's float16 norm in its slot (keys come first), -1 without one."""
    return fmt.key.norm_offset(head_dim)


def write_kv_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_codebook: torch.Tensor,
    v_codebook: torch.Tensor,
    fmt: KVFormat,
    query_start_loc: torch.Tensor | None = None,
    seq_lens: torch.Tensor | None = None,
    cos_sin_cache: torch.Tensor | None = None,
    is_neox: bool = True,
) -> None:
    """Encode key/value [N, H, D] into slot_mapping's slots (-1 = skip). With `cos_sin_cache` the keys
    are post-RoPE; each token's position comes from the varlen batch (query_start_loc, seq_lens):
    a sequence's new tokens are its last ones. Codebooks are float32 (encoding is an exact argmin)."""
    d = key.shape[-1]
    if _triton_ok(key.device, fmt) and (cos_sin_cache is None or cos_sin_cache.shape[1] == d):
        from vllm_cq.kernels.cq.write import write_kv_cache as triton_write

        triton_write(
            key, value, kv_cache, slot_mapping, k_codebook, v_codebook, fmt.key_bytes(d),
            query_start_loc, seq_lens, cos_sin_cache, is_neox, key_norm_offset(fmt, d),
        )  # fmt: skip
        return
    positions = None
    if cos_sin_cache is not None:
        assert query_start_loc is not None and seq_lens is not None, "un-rotating keys needs their positions"
        positions = token_seq_and_positions(query_start_loc, seq_lens, key.shape[0])[1]
    naive.write_kv_cache(
        key, value, kv_cache, slot_mapping, k_codebook, v_codebook, fmt, positions, cos_sin_cache, is_neox
    )


def window_rows(window: WindowCache | None, start: int, stop: int | None) -> WindowCache | None:
    """The recent window of sequences start:stop of a step (its block table's rows)."""
    return None if window is None else dataclasses.replace(window, block_table=window.block_table[start:stop])


def refuse_triton_decode_capture(query: torch.Tensor, max_query_len: int) -> None:
    """A decode step that reaches the Triton kernel while a CUDA graph is being captured: an error, not a
    capture. The backend asks for full decode graphs only where the CUDA decode kernel covers the model
    (`decode_cuda.covers`); the Triton kernel failed its full-graph test (H100, 2026-11-23)."""
    if max_query_len <= 1 and query.is_cuda and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            "vllm-cq: a decode step is being captured in a full CUDA graph but the CUDA decode kernel does not "
            "take it (the Triton kernel is not verified in full graphs); set VLLM_CQ_FULL_CUDA_GRAPHS=0"
        )


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
    max_query_len: int | None = None,
    out: torch.Tensor | None = None,
    k_codebook_attn: torch.Tensor | None = None,
    v_codebook_attn: torch.Tensor | None = None,
    window: WindowCache | None = None,
    decode_kernel: str | None = None,
    prefill_kernel: str | None = None,
    num_decodes: int = 0,
) -> torch.Tensor:
    """Same contract as `naive.paged_attention` (causal), written into `out` when given (else a new
    tensor in query's dtype). `max_query_len` (vLLM's, host-side) picks the decode or prefill tiling;
    `*_codebook_attn` are the codebooks in the model dtype for the tensor-core path (default: as given).
    A recent `window` (keys i - W < j <= i exact) runs in both (Triton path verified on the H200).
    Decode-only steps take the CUDA kernel (`decode_cuda.py`) where it covers the shape;
    `decode_kernel` "cuda" or "triton" overrides that choice (default: VLLM_CQ_DECODE_KERNEL, then
    whether the CUDA kernel is verified); `prefill_kernel` likewise for prefill steps (default
    VLLM_CQ_PREFILL_KERNEL, then the CUDA prefill kernel where it covers the shape: its wgmma variant on
    sm_90, "mma" for its mma.sync form there). In a mixed step the first `num_decodes` sequences (one new
    token each; vLLM puts them first, see the backend's `reorder_batch_threshold`) take the decode
    kernel and the rest the prefill kernel: a decode row in the prefill kernel would walk its whole
    context for one token.
    """
    d = query.shape[-1]
    triton_ok = _triton_ok(query.device, fmt) and d & (d - 1) == 0 and d >= 32
    if not triton_ok or (cos_sin_cache is not None and cos_sin_cache.shape[1] != d):
        res = naive.paged_attention(
            query, kv_cache, k_codebook, v_codebook, fmt, block_table, seq_lens, query_start_loc, scale,
            cos_sin_cache, is_neox, window=window,
        )  # fmt: skip
        return into_out(res, out, query.dtype)
    from vllm_cq.kernels.cq import decode_cuda, prefill_cuda
    from vllm_cq.kernels.cq.attention import paged_attention as triton_paged_attention

    if max_query_len is None:
        max_query_len = max_query_len_of(query_start_loc)
    kcb = k_codebook if k_codebook_attn is None else k_codebook_attn
    vcb = v_codebook if v_codebook_attn is None else v_codebook_attn
    key_bytes, norm_offset = fmt.key_bytes(d), key_norm_offset(fmt, d)
    if decode_cuda.supports(
        query, kv_cache, kcb, vcb, cos_sin_cache, is_neox, key_bytes, norm_offset, decode_kernel, block_table
    ):
        if max_query_len <= 1:
            return decode_cuda.paged_attention(
                query, kv_cache, kcb, vcb, key_bytes, block_table, seq_lens, query_start_loc, scale,
                cos_sin_cache, out=out, window=window,
            )  # fmt: skip
        decode_cuda.prepare(query, kv_cache, kcb, vcb, cos_sin_cache)  # before vLLM captures decode graphs
        if 0 < num_decodes < seq_lens.shape[0]:  # mixed step: its leading decodes first, then the rest
            nd = num_decodes
            if out is None:
                out = torch.empty_like(query)
            decode_cuda.paged_attention(
                query[:nd], kv_cache, kcb, vcb, key_bytes, block_table[:nd], seq_lens[:nd], query_start_loc[: nd + 1],
                scale, cos_sin_cache, out=out[:nd], window=window_rows(window, 0, nd),
            )  # fmt: skip
            rest = out[nd:]
            paged_attention(
                query[nd:], kv_cache, k_codebook, v_codebook, fmt, block_table[nd:], seq_lens[nd:],
                query_start_loc[nd:] - nd, scale, cos_sin_cache, is_neox, max_query_len, out=rest,
                k_codebook_attn=k_codebook_attn, v_codebook_attn=v_codebook_attn,
                window=window_rows(window, nd, None), decode_kernel=decode_kernel, prefill_kernel=prefill_kernel,
            )  # fmt: skip
            return out
    refuse_triton_decode_capture(query, max_query_len)
    if max_query_len > 1 and prefill_cuda.supports(
        query, kv_cache, kcb, vcb, cos_sin_cache, is_neox, key_bytes, norm_offset, prefill_kernel, block_table
    ):
        return prefill_cuda.paged_attention(
            query, kv_cache, kcb, vcb, key_bytes, block_table, seq_lens, query_start_loc, scale, cos_sin_cache,
            out=out, window=window, choice=prefill_kernel,
        )  # fmt: skip
    return triton_paged_attention(
        query,
        kv_cache,
        kcb,
        vcb,
        key_bytes,
        block_table,
        seq_lens,
        query_start_loc,
        scale,
        cos_sin_cache,
        is_neox,
        max_query_len,
        out=out,
        window=window,
        key_norm_offset=norm_offset,
    )
