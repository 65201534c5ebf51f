"""Coupled quantization in plain torch: the ground truth every CQ kernel is tested against.

Shapes (N tokens, H kv heads, D head_dim, c channels per group, G = H * D / c groups, K = 2**b):
    x          [N, H, D]      keys (pre-RoPE) or values
    codebook   [G, K, c]      one layer's K or V codebook, head-major (groups of head h are
                              h*D/c .. (h+1)*D/c - 1)
    codes      [N, G]         int64 centroid indices
    kv_cache   [num_blocks, H, block_size, slot_bytes] uint8 (vLLM's block-major, head-major "HND"
               page: one head's tokens of one block are contiguous); slot = key bytes | value bytes
               (see `vllm_cq.formats`). Flat slot id = block * block_size + offset.

Nothing here is fast; everything is float32 and written to be obviously right.
"""

from __future__ import annotations

import math

import torch

from vllm_cq.formats import CQSpec, KVFormat
from vllm_cq.kernels.dense import attend_last_queries
from vllm_cq.kernels.rope import apply_rope
from vllm_cq.kernels.window import WindowCache, attend_with_window, code_and_window_ranges

# Distances computed at once in `encode` (elements). 2**24 floats = 64 MiB, so encoding a
# 32K x 8 x 128 tensor against 256 centroids per group streams instead of needing 4 GiB. On a CPU
# a 1 MiB chunk stays in cache: 4-5x faster (48 groups x 8,192 vectors x 256 centroids: 0.09 s vs
# 0.48 s on 2 cores), which is most of calibration's k-means; a GPU wants the big chunks (launches).
ENCODE_CHUNK_ELEMS = 1 << 24
ENCODE_CHUNK_ELEMS_CPU = 1 << 18


def encode(x: torch.Tensor, codebook: torch.Tensor, chunk_elems: int | None = None) -> torch.Tensor:
    """Nearest-centroid codes [N, G] for x [N, ..., G*c] (any trailing layout that flattens to G*c)."""
    G, K, c = codebook.shape
    if chunk_elems is None:
        chunk_elems = ENCODE_CHUNK_ELEMS_CPU if x.device.type == "cpu" else ENCODE_CHUNK_ELEMS
    n = x.shape[0]
    xg = x.reshape(n, G, c)
    cb = codebook.float()
    cb_sq = (cb * cb).sum(-1)  # [G, K]
    rows = max(1, chunk_elems // (G * K))
    out = torch.empty(n, G, dtype=torch.long, device=x.device)
    for s in range(0, n, rows):
        xs = xg[s : s + rows].float()
        # argmin_k ||x - c_k||^2 = argmin_k (||c_k||^2 - 2 x.c_k)
        d = cb_sq[None] - 2 * torch.einsum("ngc,gkc->ngk", xs, cb)
        out[s : s + rows] = d.argmin(-1)
    return out


def decode(codes: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Centroids for codes [N, G] -> [N, G*c] float32."""
    G = codebook.shape[0]
    g = torch.arange(G, device=codes.device)
    return codebook.float()[g[None, :], codes.long()].flatten(1)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack b-bit codes [..., G] little-endian into uint8 [..., ceil(G*b/8)]."""
    if bits == 8:
        return codes.to(torch.uint8)
    G = codes.shape[-1]
    shifts = torch.arange(bits, device=codes.device)
    bit = (codes.long()[..., None] >> shifts) & 1  # [..., G, b]
    bit = bit.flatten(-2)
    nbytes = math.ceil(G * bits / 8)
    bit = torch.nn.functional.pad(bit, (0, nbytes * 8 - G * bits))
    weights = 1 << torch.arange(8, device=codes.device)
    return (bit.unflatten(-1, (nbytes, 8)) * weights).sum(-1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, groups: int) -> torch.Tensor:
    """Inverse of `pack_codes`: uint8 [..., nbytes] -> int64 codes [..., groups]."""
    if bits == 8:
        return packed[..., :groups].long()
    shifts = torch.arange(8, device=packed.device)
    bit = ((packed.long()[..., None] >> shifts) & 1).flatten(-2)[..., : groups * bits]
    weights = 1 << torch.arange(bits, device=packed.device)
    return (bit.unflatten(-1, (groups, bits)) * weights).sum(-1)


# Norms are stored as float16; one a float16 cannot hold is kept at its largest finite value.
NORM_MAX = 65504.0
# A zero key has no direction: it is coded as the direction of x / NORM_EPS (its stored norm is 0).
NORM_EPS = 1e-6


def quantize(x: torch.Tensor, codebook: torch.Tensor, spec: CQSpec) -> torch.Tensor:
    """x [N, H, D] -> packed codes uint8 [N, H, spec.bytes_per_token_head(D)]. With `spec.norm` the
    codes are those of x/|x| and |x| follows them as float16 (see `vllm_cq.formats`)."""
    n, h, d = x.shape
    if not spec.norm:
        return pack_codes(encode(x, codebook).view(n, h, spec.groups(d)), spec.bits)
    x = x.float()
    norm = x.norm(dim=-1, keepdim=True)
    codes = encode(x / norm.clamp_min(NORM_EPS), codebook).view(n, h, spec.groups(d))
    out = torch.zeros(n, h, spec.bytes_per_token_head(d), dtype=torch.uint8, device=x.device)
    out[..., : spec.code_bytes(d)] = pack_codes(codes, spec.bits)
    f16 = norm.clamp_max(NORM_MAX).to(torch.float16)
    out[..., spec.norm_offset(d) :] = f16.view(torch.uint8).view(n, h, 2)
    return out


def stored_norm(packed: torch.Tensor, spec: CQSpec, head_dim: int) -> torch.Tensor:
    """The float16 norms of packed [N, H, nbytes] as float32 [N, H, 1]."""
    o = spec.norm_offset(head_dim)
    return packed[..., o : o + 2].contiguous().view(torch.float16).float()


def dequantize(packed: torch.Tensor, codebook: torch.Tensor, spec: CQSpec, head_dim: int) -> torch.Tensor:
    """packed codes uint8 [N, H, nbytes] -> float32 [N, H, head_dim]."""
    n, h, _ = packed.shape
    codes = unpack_codes(packed[..., : spec.code_bytes(head_dim)], spec.bits, spec.groups(head_dim))
    x = decode(codes.reshape(n, -1), codebook).view(n, h, head_dim)
    return x * stored_norm(packed, spec, head_dim) if spec.norm else x


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
    """Encode key/value [N, H, D] and store each token's slot at slot_mapping[n] (-1 = skip).

    When `cos_sin_cache` is given, `key` is post-RoPE (as vLLM hands it over) and is first
    un-rotated by `positions`, so the cache holds pre-RoPE key codes.
    """
    d = key.shape[-1]
    if cos_sin_cache is not None:
        assert positions is not None, "un-rotating post-RoPE keys needs their positions"
        key = apply_rope(key, positions, cos_sin_cache, is_neox, inverse=True)
    valid = slot_mapping >= 0
    slots = slot_mapping[valid].long()
    k = quantize(key[valid], k_codebook, fmt.key)
    v = quantize(value[valid], v_codebook, fmt.value)
    block_size = kv_cache.shape[2]
    blocks, offsets = slots // block_size, slots % block_size
    kb = fmt.key_bytes(d)
    kv_cache[blocks, :, offsets, :kb] = k
    kv_cache[blocks, :, offsets, kb:] = v


def gather_kv(
    kv_cache: torch.Tensor,
    slots: torch.Tensor,
    k_codebook: torch.Tensor,
    v_codebook: torch.Tensor,
    fmt: KVFormat,
    head_dim: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dequantized keys (pre-RoPE) and values [len(slots), H, head_dim] for flat slot ids."""
    block_size = kv_cache.shape[2]
    slots = slots.long()
    flat = kv_cache[slots // block_size, :, slots % block_size]  # [n, H, slot_bytes]
    kb = fmt.key_bytes(head_dim)
    keys = dequantize(flat[..., :kb], k_codebook, fmt.key, head_dim)
    values = dequantize(flat[..., kb:], v_codebook, fmt.value, head_dim)
    return keys, values


def _sequence_kv(
    kv_cache: torch.Tensor,
    block_row: torch.Tensor,
    n: int,
    k_codebook: torch.Tensor,
    v_codebook: torch.Tensor,
    fmt: KVFormat,
    head_dim: int,
    cos_sin_cache: torch.Tensor | None,
    is_neox: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dequantized keys (rotated by position when `cos_sin_cache` is given) and values [n, H, D] of
    one sequence's positions 0..n-1, found through its block table row."""
    if n == 0:  # a recent window covering every key: nothing over codes (dequantize can't reshape 0 rows)
        empty = torch.empty(0, kv_cache.shape[1], head_dim, dtype=torch.float32, device=kv_cache.device)
        return empty, empty
    block_size = kv_cache.shape[2]
    pos = torch.arange(n, device=kv_cache.device)
    slots = block_row[pos // block_size].long() * block_size + pos % block_size
    k, v = gather_kv(kv_cache, slots, k_codebook, v_codebook, fmt, head_dim)
    if cos_sin_cache is not None:
        k = apply_rope(k, pos, cos_sin_cache, is_neox)
    return k, v


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
    causal: bool = True,
    window: WindowCache | None = None,
) -> torch.Tensor:
    """Attention of query [T, Hq, D] over the CQ-coded paged cache, vLLM-style varlen batch.

    Sequence s owns queries query_start_loc[s]:query_start_loc[s+1], which are its *last* tokens
    (positions seq_lens[s] - q_len ...); its keys are positions 0..seq_lens[s]-1, found through
    block_table[s]. Query head h reads kv head h // (Hq / Hkv) (GQA). With `cos_sin_cache`, keys
    are stored pre-RoPE and each is rotated by its position after lookup. With a recent `window`
    (causal only), query i reads keys i - W < j <= i exactly from the window cache and only older
    keys from the codes, one softmax (`vllm_cq.kernels.window`). Returns float32 [T, Hq, D].
    """
    T, Hq, D = query.shape
    Hkv = kv_cache.shape[1]
    assert Hq % Hkv == 0, "query heads must be a multiple of kv heads"
    assert window is None or causal, "a recent window is defined for causal attention only"
    out = torch.zeros(T, Hq, D, dtype=torch.float32, device=query.device)
    for s in range(seq_lens.shape[0]):
        L = int(seq_lens[s])
        q0, q1 = int(query_start_loc[s]), int(query_start_loc[s + 1])
        if q1 == q0:
            continue
        if window is not None:
            n_old, _ = code_and_window_ranges(L, q1 - q0, window.W)
            k, v = _sequence_kv(kv_cache, block_table[s], n_old, k_codebook, v_codebook, fmt, D, cos_sin_cache, is_neox)
            out[q0:q1] = attend_with_window(query[q0:q1], k, v, window, s, L, scale)
            continue
        k, v = _sequence_kv(kv_cache, block_table[s], L, k_codebook, v_codebook, fmt, D, cos_sin_cache, is_neox)
        k = k.repeat_interleave(Hq // Hkv, dim=1)  # [L, Hq, D]
        v = v.repeat_interleave(Hq // Hkv, dim=1)
        out[q0:q1] = attend_last_queries(query[q0:q1], k, v, scale, causal)
    return out
