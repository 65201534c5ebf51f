"""Plain-torch reference for KVTQ (the oracle the Triton kernels are tested against).

A token-head's D channels split into groups of `spec.group`; each group is written as `spec.levels`
stacked ternary digits: level l takes the residual r_l, scale s_l = 2/3 max|r_l| (float16), digits
t_l = clip(round(r_l / s_l), -1, 1), and r_{l+1} = r_l - s_l t_l (with the stored, rounded scale),
so the maximum error shrinks 3x per level. Byte layout per token-head (`TernarySpec`):

    | scales float16 [levels, groups] | digits of level 0 | ... | digits of level L-1 | pad |

with a level's D digits stored as (t + 1) in base 3, five per byte, channel 5j + i in digit i of
byte j. Keys are stored as vLLM hands them over (post-RoPE): no codebook, so nothing to un-rotate.
"""

from __future__ import annotations

import torch

from vllm_cq.formats import KVFormat, TernarySpec
from vllm_cq.kernels.dense import attend_last_queries
from vllm_cq.kernels.window import WindowCache, attend_with_window, code_and_window_ranges

POW3 = (1, 3, 9, 27, 81)


def quantize_digits(x: torch.Tensor, spec: TernarySpec) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> (scales float16 [..., levels, groups], digits int8 [..., levels, D] in {-1,0,1})."""
    d = x.shape[-1]
    g = spec.groups(d)
    r = x.float().reshape(*x.shape[:-1], g, spec.group)
    scales, digits = [], []
    for _ in range(spec.levels):
        s = (r.abs().amax(-1) * (2.0 / 3.0)).clamp(max=65504.0).to(torch.float16)  # [..., g]
        sf = s.float()[..., None]
        t = torch.where(sf > 0, torch.round(r / sf.clamp_min(1e-30)), torch.zeros_like(r)).clamp(-1, 1)
        r = r - sf * t
        scales.append(s)
        digits.append(t.to(torch.int8).reshape(*x.shape[:-1], d))
    return torch.stack(scales, -2), torch.stack(digits, -2)


def dequantize_digits(scales: torch.Tensor, digits: torch.Tensor, spec: TernarySpec) -> torch.Tensor:
    """Inverse of `quantize_digits`: float32 [..., D]."""
    d = digits.shape[-1]
    t = digits.float().reshape(*digits.shape[:-1], d // spec.group, spec.group)  # [..., L, g, group]
    x = (t * scales.float()[..., None]).sum(-3)
    return x.reshape(*digits.shape[:-2], d)


def pack_digits(digits: torch.Tensor) -> torch.Tensor:
    """int8 {-1,0,1} [..., D] -> uint8 [..., ceil(D/5)], five base-3 digits per byte."""
    d = digits.shape[-1]
    nb = -(-d // 5)
    t = torch.nn.functional.pad(digits.to(torch.int32) + 1, (0, 5 * nb - d), value=1)  # pad digits = 0
    t = t.reshape(*digits.shape[:-1], nb, 5)
    return (t * torch.tensor(POW3, dtype=torch.int32, device=t.device)).sum(-1).to(torch.uint8)


def unpack_digits(packed: torch.Tensor, d: int) -> torch.Tensor:
    """uint8 [..., ceil(D/5)] -> int8 {-1,0,1} [..., D]."""
    p = packed.to(torch.int32)[..., None]
    t = (p // torch.tensor(POW3, dtype=torch.int32, device=p.device)) % 3 - 1
    return t.reshape(*packed.shape[:-1], -1)[..., :d].to(torch.int8)


def quantize(x: torch.Tensor, spec: TernarySpec) -> torch.Tensor:
    """x [..., D] -> uint8 [..., spec.bytes_per_token_head(D)] in the layout above."""
    d = x.shape[-1]
    scales, digits = quantize_digits(x, spec)
    sb = scales.reshape(*x.shape[:-1], -1).view(torch.uint8)  # little-endian float16 bytes
    db = pack_digits(digits).reshape(*x.shape[:-1], -1)
    out = torch.zeros(*x.shape[:-1], spec.bytes_per_token_head(d), dtype=torch.uint8, device=x.device)
    out[..., : sb.shape[-1]] = sb
    out[..., sb.shape[-1] : sb.shape[-1] + db.shape[-1]] = db
    return out


def dequantize(packed: torch.Tensor, spec: TernarySpec, d: int) -> torch.Tensor:
    """uint8 [..., bytes] -> float32 [..., D]."""
    ns = spec.scale_bytes(d)
    nd = spec.digit_bytes(d)
    scales = packed[..., :ns].contiguous().view(torch.float16).reshape(*packed.shape[:-1], spec.levels, -1)
    db = packed[..., ns : ns + spec.levels * nd].reshape(*packed.shape[:-1], spec.levels, nd)
    return dequantize_digits(scales, unpack_digits(db, d), spec)


def write_kv_cache(
    key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor, fmt: KVFormat
) -> None:
    """Quantize key/value [N, H, D] and store each token's slot at slot_mapping[n] (-1 = skip)."""
    d = key.shape[-1]
    valid = slot_mapping >= 0
    slots = slot_mapping[valid].long()
    kb = fmt.key_bytes(d)
    block_size = kv_cache.shape[2]
    blocks, offsets = slots // block_size, slots % block_size
    kv_cache[blocks, :, offsets, :kb] = quantize(key[valid], fmt.key)
    kv_cache[blocks, :, offsets, kb:] = quantize(value[valid], fmt.value)


def _sequence_kv(
    kv_cache: torch.Tensor, block_row: torch.Tensor, n: int, fmt: KVFormat, d: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dequantized keys and values [n, Hkv, D] of one sequence's positions 0..n-1 (block table row)."""
    if n == 0:  # a recent window covering every key: nothing over digits (dequantize can't reshape 0 rows)
        empty = torch.empty(0, kv_cache.shape[1], d, dtype=torch.float32, device=kv_cache.device)
        return empty, empty
    block_size = kv_cache.shape[2]
    kb = fmt.key_bytes(d)
    pos = torch.arange(n, device=kv_cache.device)
    slots = block_row[pos // block_size].long() * block_size + pos % block_size
    flat = kv_cache[slots // block_size, :, slots % block_size]  # [n, Hkv, slot]
    return dequantize(flat[..., :kb], fmt.key, d), dequantize(flat[..., kb:], fmt.value, d)


def paged_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    fmt: KVFormat,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    window: WindowCache | None = None,
) -> torch.Tensor:
    """Causal attention of query [T, Hq, D] over the KVTQ paged cache (vLLM varlen batch: sequence s
    owns queries query_start_loc[s]:[s+1], its last tokens). With a recent `window`, query i reads
    keys i - W < j <= i exactly from the window cache and only older keys from the digits, one
    softmax (`vllm_cq.kernels.window`). Returns float32 [T, Hq, D]."""
    t_all, hq, d = query.shape
    hkv = kv_cache.shape[1]
    out = torch.zeros(t_all, hq, d, dtype=torch.float32, device=query.device)
    for s in range(seq_lens.shape[0]):
        n = int(seq_lens[s])
        q0, q1 = int(query_start_loc[s]), int(query_start_loc[s + 1])
        if q1 == q0:
            continue
        if window is not None:
            n_old, _ = code_and_window_ranges(n, q1 - q0, window.W)
            k, v = _sequence_kv(kv_cache, block_table[s], n_old, fmt, d)
            out[q0:q1] = attend_with_window(query[q0:q1], k, v, window, s, n, scale)
            continue
        k, v = _sequence_kv(kv_cache, block_table[s], n, fmt, d)
        k = k.repeat_interleave(hq // hkv, dim=1)
        v = v.repeat_interleave(hq // hkv, dim=1)
        out[q0:q1] = attend_last_queries(query[q0:q1], k, v, scale)
    return out
