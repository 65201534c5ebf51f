"""The CQ reference math: packing, encoding, RoPE, cache writes and paged attention over codes."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import rel_err
from vllm_cq.calibration.kmeans import weighted_kmeans
from vllm_cq.formats import get_format
from vllm_cq.kernels.cq import naive
from vllm_cq.kernels.rope import apply_rope, build_cos_sin_cache


def correlated(n: int, h: int, d: int) -> torch.Tensor:
    """Data with correlated channels and uneven channel scales, like real keys."""
    mix = torch.randn(d, d) / d**0.5 + torch.eye(d)
    scale = torch.linspace(0.2, 3.0, d)
    return (torch.randn(n, h, d) @ mix) * scale


def random_codebooks(fmt, heads: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian centroids; a spec with a stored norm codes unit vectors, so its centroids are scaled to them."""
    k = torch.randn(fmt.key.codebook_shape(heads, head_dim))
    v = torch.randn(fmt.value.codebook_shape(heads, head_dim))
    return k / head_dim**0.5 if fmt.key.norm else k, v


@settings(max_examples=40, deadline=None)
@given(bits=st.integers(1, 16), groups=st.integers(1, 19), lead=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_pack_unpack_roundtrip(bits, groups, lead, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (lead, groups), generator=g)
    packed = naive.pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape[-1] == (groups * bits + 7) // 8
    assert torch.equal(naive.unpack_codes(packed, bits, groups), codes)


def test_encode_is_nearest_centroid_and_chunking_invariant():
    x = torch.randn(300, 3, 16)
    cb = torch.randn(3 * 4, 64, 4)  # 3 heads x 4 groups of 4 channels
    codes = naive.encode(x, cb)
    brute = torch.cdist(x.reshape(300, 12, 4).transpose(0, 1), cb).argmin(-1).transpose(0, 1)
    assert torch.equal(codes, brute)
    assert torch.equal(naive.encode(x, cb, chunk_elems=12 * 64 * 7), codes)  # 7 rows per chunk
    # decode(encode(x)) is the nearest centroid: no other centroid is closer
    err = (naive.decode(codes, cb).view(300, 12, 4) - x.reshape(300, 12, 4)).pow(2).sum(-1)
    assert torch.all(err <= torch.cdist(x.reshape(300, 12, 4).transpose(0, 1), cb).pow(2).min(-1).values.T + 1e-4)


def test_roundtrip_error_decreases_with_bits():
    """cq4 < cq2 < cq1 reconstruction error, with k-means codebooks on correlated data."""
    x = correlated(2048, 2, 32)
    errs = {}
    for name in ("cq4", "cq2", "cq1"):
        spec = get_format(name).key
        g = spec.groups(32)
        xg = x.reshape(-1, 2 * g, spec.channels).transpose(0, 1)
        cb = weighted_kmeans(xg, None, spec.num_centroids, iters=10)
        packed = naive.quantize(x, cb, spec)
        assert packed.shape == (2048, 2, spec.bytes_per_token_head(32))
        errs[name] = rel_err(naive.dequantize(packed, cb, spec, 32), x)
    assert errs["cq4"] < errs["cq2"] < errs["cq1"] < 1.0, errs
    assert errs["cq4"] < 0.1, errs


def fit_norm_codebook(x: torch.Tensor, spec) -> torch.Tensor:
    """k-means on each token-head's unit direction, weighted by |x|^2 (what calibration does for a norm spec)."""
    n, h, d = x.shape
    norm = x.norm(dim=-1, keepdim=True)
    g = spec.groups(d)
    xg = (x / norm).reshape(n, h * g, spec.channels).transpose(0, 1)
    w = (norm**2).expand(n, h, g).reshape(n, h * g).T
    return weighted_kmeans(xg, w, spec.num_centroids, iters=10)


def test_norm_spec_round_trip_beats_plain_codes_on_keys_with_spread_norms():
    """Keys whose token norms vary a lot (as real keys do): coding the direction and keeping |k| loses
    less than coding k, with the same codebook size (cq2n vs cq2), and the stored norm is |k| in float16."""
    x = correlated(2048, 2, 32) * torch.exp(torch.randn(2048, 1, 1))
    plain, normed = get_format("cq2").key, get_format("cq2n").key
    g = plain.groups(32)
    cb = weighted_kmeans(x.reshape(-1, 2 * g, 4).transpose(0, 1), None, 256, iters=10)
    err_plain = rel_err(naive.dequantize(naive.quantize(x, cb, plain), cb, plain, 32), x)
    cbn = fit_norm_codebook(x, normed)
    packed = naive.quantize(x, cbn, normed)
    assert packed.shape == (2048, 2, normed.bytes_per_token_head(32))
    assert torch.equal(naive.stored_norm(packed, normed, 32), x.norm(dim=-1, keepdim=True).half().float())
    err_norm = rel_err(naive.dequantize(packed, cbn, normed, 32), x)
    assert err_norm < 0.9 * err_plain, (err_norm, err_plain)


def test_norm_spec_codes_a_scaled_centroid_exactly():
    """x = s * (centroids whose concatenation is a unit vector): codes are those centroids, decode is
    s (as float16) times them; a zero key decodes to zero."""
    spec, d = get_format("cq2n").key, 32
    g = spec.groups(d)
    cb = torch.randn(g, 256, 4)
    cb = cb / cb.norm(dim=-1, keepdim=True) / g**0.5  # every centroid has norm 1/sqrt(groups)
    codes = torch.randint(0, 256, (50, g))
    s = torch.rand(50, 1) * 30 + 0.1
    x = (naive.decode(codes, cb) * s).view(50, 1, d)
    x[7] = 0.0
    packed = naive.quantize(x, cb, spec)
    got = naive.unpack_codes(packed[..., : spec.code_bytes(d)], 8, g).view(50, g)
    keep = torch.arange(50) != 7
    assert torch.equal(got[keep], codes[keep])
    want = naive.decode(codes, cb).view(50, 1, d) * s.half().float().view(50, 1, 1)
    want[7] = 0.0
    assert torch.allclose(naive.dequantize(packed, cb, spec, d), want, atol=1e-6)


@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("rotary_dim", [32, 16])
def test_rope_matches_complex_rotation_and_inverts(is_neox, rotary_dim):
    d, n = 32, 50
    cache = build_cos_sin_cache(rotary_dim, 4096, base=500.0)
    x = torch.randn(n, 3, d)
    pos = torch.randint(0, 4096, (n,))
    y = apply_rope(x, pos, cache, is_neox)
    half = rotary_dim // 2
    freqs = pos[:, None].double() / 500.0 ** (torch.arange(0, rotary_dim, 2).double() / rotary_dim)
    rot = torch.polar(torch.ones_like(freqs), freqs)[:, None, :]
    if is_neox:
        z = torch.complex(x[..., :half].double(), x[..., half:rotary_dim].double()) * rot
        want = torch.cat([z.real, z.imag], -1)
    else:
        z = torch.complex(x[..., 0:rotary_dim:2].double(), x[..., 1:rotary_dim:2].double()) * rot
        want = torch.stack([z.real, z.imag], -1).flatten(-2)
    assert rel_err(y[..., :rotary_dim], want) < 1e-5
    assert torch.equal(y[..., rotary_dim:], x[..., rotary_dim:])
    assert rel_err(apply_rope(y, pos, cache, is_neox, inverse=True), x) < 1e-5


def make_paged(seqs: list[tuple[int, int]], block_size: int, extra_blocks: int = 3):
    """Block table with blocks in random order, seq_lens and query_start_loc for (seq_len, q_len)."""
    nblocks = [-(-L // block_size) for L, _ in seqs]
    total = sum(nblocks) + extra_blocks
    perm = torch.randperm(total)
    table = torch.full((len(seqs), max(nblocks)), -1, dtype=torch.int32)
    at = 0
    for s, nb in enumerate(nblocks):
        table[s, :nb] = perm[at : at + nb].int()
        at += nb
    seq_lens = torch.tensor([L for L, _ in seqs], dtype=torch.int32)
    qsl = torch.tensor([0] + [q for _, q in seqs], dtype=torch.int32).cumsum(0).int()
    return total, table, seq_lens, qsl


def slots_of(table: torch.Tensor, s: int, positions: torch.Tensor, block_size: int) -> torch.Tensor:
    return table[s, positions // block_size].long() * block_size + positions % block_size


def dense_attention(q, k, v, scale):
    """SDPA over dense (already dequantized, already rotated) K/V for one sequence; q are its last tokens."""
    L, ql = k.shape[0], q.shape[0]
    ratio = q.shape[1] // k.shape[1]
    mask = torch.arange(L)[None, :] <= (L - ql + torch.arange(ql))[:, None]
    o = torch.nn.functional.scaled_dot_product_attention(
        q.double().transpose(0, 1),
        k.double().repeat_interleave(ratio, 1).transpose(0, 1),
        v.double().repeat_interleave(ratio, 1).transpose(0, 1),
        attn_mask=mask,
        scale=scale,
    )
    return o.transpose(0, 1)


CASES = {
    "one-token": [(1, 1)],
    "prefill-odd": [(17, 17), (5, 5)],
    "page-boundaries": [(16, 16), (32, 1), (48, 16), (15, 1)],
    "mixed-decode-chunked": [(63, 1), (64, 1), (65, 1), (40, 7), (33, 33)],
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("fmt_name", ["cq1", "cq4", "cq_k4v1"])
@pytest.mark.parametrize("hkv, ratio", [(2, 1), (1, 4), (2, 8)], ids=["gqa1", "gqa4", "gqa8"])
@pytest.mark.parametrize("pre_rope", [True, False], ids=["prerope", "norope"])
def test_paged_attention_equals_dense_attention_over_dequantized(case, fmt_name, hkv, ratio, pre_rope):
    fmt, d, bs = get_format(fmt_name), 32, 16
    seqs = CASES[case]
    nblk, table, seq_lens, qsl = make_paged(seqs, bs)
    kcb, vcb = random_codebooks(fmt, hkv, d)
    slot = fmt.slot_bytes(d)
    # Poison: unused slots hold random bytes, so reading a wrong slot changes the answer.
    cache = torch.randint(0, 256, (nblk, hkv, bs, slot), dtype=torch.uint8)
    rope = build_cos_sin_cache(d, 256) if pre_rope else None
    q_all = torch.randn(int(qsl[-1]), hkv * ratio, d)
    scale = d**-0.5
    want = []
    for s, (L, _) in enumerate(seqs):
        k, v = torch.randn(L, hkv, d), torch.randn(L, hkv, d)
        pos = torch.arange(L)
        naive.write_kv_cache(k, v, cache, slots_of(table, s, pos, bs), kcb, vcb, fmt)
        kd = naive.decode(naive.encode(k, kcb), kcb).view(L, hkv, d)
        vd = naive.decode(naive.encode(v, vcb), vcb).view(L, hkv, d)
        if pre_rope:
            kd = apply_rope(kd, pos, rope)
        want.append(dense_attention(q_all[qsl[s] : qsl[s + 1]], kd, vd, scale))
    got = naive.paged_attention(q_all, cache, kcb, vcb, fmt, table, seq_lens, qsl, scale, rope)
    assert rel_err(got, torch.cat(want)) < 1e-5


def test_write_skips_padding_and_touches_only_mapped_slots():
    fmt, d, bs, h = get_format("cq2"), 32, 8, 2
    kcb, vcb = random_codebooks(fmt, h, d)
    cache = torch.randint(0, 256, (4, h, bs, fmt.slot_bytes(d)), dtype=torch.uint8)
    before = cache.clone()
    slots = torch.tensor([3, -1, 17, 30, -1])
    k, v = torch.randn(5, h, d), torch.randn(5, h, d)
    naive.write_kv_cache(k, v, cache, slots, kcb, vcb, fmt)
    flat = cache.transpose(1, 2).reshape(-1, h, fmt.slot_bytes(d))  # [slot, H, bytes]
    fb = before.transpose(1, 2).reshape(-1, h, fmt.slot_bytes(d))
    untouched = torch.ones(flat.shape[0], dtype=torch.bool)
    untouched[[3, 17, 30]] = False
    assert torch.equal(flat[untouched], fb[untouched])
    kb = fmt.key_bytes(d)
    for i, s in [(0, 3), (2, 17), (3, 30)]:
        assert torch.equal(flat[s, :, :kb], naive.quantize(k[i : i + 1], kcb, fmt.key)[0])
        assert torch.equal(flat[s, :, kb:], naive.quantize(v[i : i + 1], vcb, fmt.value)[0])


def test_write_unrotates_post_rope_keys():
    """vLLM hands over post-RoPE keys; the cache must hold the codes of the pre-RoPE keys."""
    fmt, d, h, n = get_format("cq4"), 64, 2, 200
    kcb, vcb = random_codebooks(fmt, h, d)
    rope = build_cos_sin_cache(d, 4096)
    pos = torch.randint(0, 4096, (n,))
    k_pre = torch.randn(n, h, d)
    k_post = apply_rope(k_pre, pos, rope)
    cache = torch.zeros(n, h, 1, fmt.slot_bytes(d), dtype=torch.uint8)
    naive.write_kv_cache(k_post, torch.randn(n, h, d), cache, torch.arange(n), kcb, vcb, fmt, pos, rope)
    stored = cache.view(n, h, -1)[..., : fmt.key_bytes(d)]
    direct = naive.quantize(k_pre, kcb, fmt.key)
    assert (stored == direct).float().mean() > 0.999  # rounding may flip a near-tie, nothing more
    wrong = naive.quantize(k_post, kcb, fmt.key)
    assert (stored == wrong).float().mean() < 0.9
