"""KVTQ reference math (ternary digits, packing, paged attention) and its Triton kernels. The kernels
run compiled on a GPU and under TRITON_INTERPRET=1 in a child pytest on CPU (see test_cq_triton)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import rel_err
from tests.kernels.test_cq_naive import CASES, dense_attention, make_paged, slots_of
from tests.kernels.test_cq_triton import random_batch
from vllm_cq.formats import TernarySpec, get_format
from vllm_cq.kernels.kvtq import naive

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
runs_kernels = pytest.mark.skipif(DEVICE == "cpu" and not INTERPRETED, reason="runs in the interpreter child")
reference_only = pytest.mark.skipif(INTERPRETED, reason="reference tests run in the parent")


@reference_only
def test_error_drops_with_each_level():
    x = torch.randn(64, 4, 128) * torch.linspace(0.1, 3.0, 128)  # uneven channel magnitudes
    errs = []
    for levels in range(1, 6):
        spec = TernarySpec(levels)
        y = naive.dequantize(naive.quantize(x, spec), spec, 128)
        errs.append(float((y - x).pow(2).sum() / x.pow(2).sum()))
    assert all(b < a / 4 for a, b in zip(errs, errs[1:], strict=False)), errs  # ~9x per level (3x in amplitude)
    assert errs[0] < 0.35, errs


@reference_only
def test_max_error_bound_per_group():
    """Balanced-ternary spacing: after L levels every element is within max|x_group| / 3^L (plus
    float16 rounding of the scales)."""
    spec = TernarySpec(3, group=16)
    x = torch.randn(10, 2, 64)
    y = naive.dequantize(naive.quantize(x, spec), spec, 64)
    bound = x.view(10, 2, 4, 16).abs().amax(-1, keepdim=True) / 27 * 1.01 + 1e-3
    assert bool(((y - x).view(10, 2, 4, 16).abs() <= bound).all())


@reference_only
@settings(max_examples=30, deadline=None)
@given(d=st.integers(1, 70), lead=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_pack_unpack_roundtrip(d, lead, seed):
    g = torch.Generator().manual_seed(seed)
    digits = torch.randint(-1, 2, (lead, d), generator=g).to(torch.int8)
    packed = naive.pack_digits(digits)
    assert packed.shape[-1] == -(-d // 5) and int(packed.max()) < 243
    assert torch.equal(naive.unpack_digits(packed, d), digits)


@reference_only
def test_zero_group_and_layout():
    spec = TernarySpec(2, group=32)
    x = torch.zeros(1, 1, 64)
    x[0, 0, 40] = 3.0
    b = naive.quantize(x, spec)
    assert b.shape[-1] == spec.bytes_per_token_head(64) == 2 * 2 * 2 + 2 * 13
    scales = b[0, 0, :8].view(torch.float16).view(2, 2)
    assert scales[0, 0] == 0 and abs(float(scales[0, 1]) - 2.0) < 1e-3  # 2/3 of the group's max
    y = naive.dequantize(b, spec, 64)
    want = x.clone()
    want[0, 0, 40] = 2.0 + 2.0 / 3.0  # 3 -> digit 1 x 2, residual 1 -> digit 1 x 2/3
    assert torch.allclose(y, want, atol=1e-3), y[0, 0, 40]


def fill(fmt, seqs, hkv, d, bs, device="cpu"):
    nblk, table, seq_lens, qsl = make_paged(seqs, bs)
    cache = torch.randint(0, 256, (nblk, hkv, bs, fmt.slot_bytes(d)), dtype=torch.uint8)
    for s, (L, _) in enumerate(seqs):
        naive.write_kv_cache(
            torch.randn(L, hkv, d), torch.randn(L, hkv, d), cache, slots_of(table, s, torch.arange(L), bs), fmt
        )
    return cache, table, seq_lens, qsl


@reference_only
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("fmt_name", ["kvtq", "kvtq1"])
def test_paged_reference_equals_dense_attention(case, fmt_name):
    fmt, d, hkv, ratio, bs = get_format(fmt_name), 64, 2, 4, 16
    seqs = CASES[case]
    cache, table, seq_lens, qsl = fill(fmt, seqs, hkv, d, bs)
    q = torch.randn(int(qsl[-1]), hkv * ratio, d)
    got = naive.paged_attention(q, cache, fmt, table, seq_lens, qsl, d**-0.5)
    kb = fmt.key_bytes(d)
    for s, (L, _) in enumerate(seqs):
        slots = slots_of(table, s, torch.arange(L), bs)
        flat = cache[slots // bs, :, slots % bs]
        k = naive.dequantize(flat[..., :kb], fmt.key, d)
        v = naive.dequantize(flat[..., kb:], fmt.value, d)
        want = dense_attention(q[qsl[s] : qsl[s + 1]], k, v, d**-0.5)
        assert rel_err(got[qsl[s] : qsl[s + 1]], want) < 1e-5


@pytest.mark.skipif(DEVICE == "cuda" or INTERPRETED, reason="kernels run directly here")
def test_kernels_in_triton_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1500)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]
    last = out.stdout.strip().splitlines()[-1]
    assert " passed" in last and "failed" not in last and "error" not in last, last


@runs_kernels
@pytest.mark.parametrize("fmt_name, heads, d", [("kvtq", 2, 64), ("kvtq1", 3, 32), ("kvtq", 1, 128)])
def test_write_kernel_matches_reference(fmt_name, heads, d):
    from vllm_cq.kernels.kvtq import triton_ops

    fmt, bs, n = get_format(fmt_name), 16, 29
    nblk = 4
    poison = torch.randint(0, 256, (nblk, heads, bs, fmt.slot_bytes(d)), dtype=torch.uint8)
    k, v = torch.randn(n, heads, d) * 2, torch.randn(n, heads, d)
    slots = torch.randperm(nblk * bs)[:n]
    slots[::6] = -1
    want = poison.clone()
    naive.write_kv_cache(k, v, want, slots, fmt)
    got = poison.clone().to(DEVICE)
    triton_ops.write_kv_cache(k.to(DEVICE), v.to(DEVICE), got, slots.to(DEVICE), fmt)
    got = got.cpu()
    kb = fmt.key_bytes(d)
    used = torch.zeros(fmt.slot_bytes(d), dtype=torch.bool)  # the even-padding byte is not written
    used[: fmt.key.scale_bytes(d) + fmt.key.levels * fmt.key.digit_bytes(d)] = True
    used[kb : kb + fmt.value.scale_bytes(d) + fmt.value.levels * fmt.value.digit_bytes(d)] = True
    sl = slots[slots >= 0]
    # digits may differ only at exact rounding ties (round-half-even vs half-up)
    mism = (got[sl // bs, :, sl % bs][..., used] != want[sl // bs, :, sl % bs][..., used]).float().mean().item()
    assert mism < 5e-3, mism
    untouched = torch.ones(nblk * bs, dtype=torch.bool)
    untouched[sl] = False
    by_slot = lambda c: c.permute(0, 2, 1, 3).reshape(nblk * bs, heads, -1)  # noqa: E731
    assert torch.equal(by_slot(got)[untouched], by_slot(poison)[untouched])
    gk = naive.dequantize(got[sl // bs, :, sl % bs, :kb], fmt.key, d)
    wk = naive.dequantize(want[sl // bs, :, sl % bs, :kb], fmt.key, d)
    assert rel_err(gk, wk) < 1e-3


def check_kernel(fmt_name, seqs, hkv, ratio, d, dtype=torch.float32, tol=1e-4, **kw):
    """Triton attention vs the reference on a cache the reference wrote (free slots poisoned)."""
    from vllm_cq.kernels.kvtq import triton_ops

    fmt, bs = get_format(fmt_name), 16
    cache, table, seq_lens, qsl = fill(fmt, seqs, hkv, d, bs)
    q = torch.randn(int(qsl[-1]), hkv * ratio, d)
    want = naive.paged_attention(q, cache, fmt, table, seq_lens, qsl, d**-0.5)
    args = [t.to(DEVICE) for t in (q.to(dtype), cache)] + [fmt] + [t.to(DEVICE) for t in (table, seq_lens, qsl)]
    got = triton_ops.paged_attention(*args, d**-0.5, max(ql for _, ql in seqs), **kw)
    assert got.dtype == dtype
    err = rel_err(got.float().cpu(), want)
    assert err < tol, (err, seqs)


@runs_kernels
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("decode, segments", [(True, 1), (True, 4), (False, None)])
@pytest.mark.parametrize(
    "fmt_name, hkv, ratio, d", [("kvtq", 2, 4, 32), ("kvtq1", 1, 3, 32), ("kvtq", 1, 8, 128), ("kvtq1", 2, 2, 64)]
)
@pytest.mark.parametrize("levelwise", ["none", "kv"])
def test_attention_kernel_matches_reference(seed, decode, segments, fmt_name, hkv, ratio, d, levelwise):
    """Tile-rebuilding and level-wise kernels; head_dim 64 and 128 give 2 and 4 groups per head, so
    the level-wise batched dots run over several groups."""
    seqs = random_batch(seed + (0 if decode else 50), decode_only=decode)
    check_kernel(fmt_name, seqs, hkv, ratio, d, num_segments=segments, block_n=16, levelwise=levelwise)


@runs_kernels
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("levelwise", ["k", "v"])
def test_one_side_levelwise_matches_reference(case, levelwise):
    """Each side's switch alone (the other side rebuilding its tile), over the reference cases."""
    check_kernel("kvtq", CASES[case], 2, 4, 64, block_n=16, levelwise=levelwise)


# Triton 3.9's interpreter returns garbage from a bf16 tl.dot (numpy has no bf16): GPU only there.
BF16 = pytest.param(
    torch.bfloat16, id="bf16", marks=pytest.mark.skipif(INTERPRETED, reason="interpreter bf16 dot is wrong")
)


@runs_kernels
@pytest.mark.parametrize("levelwise", ["none", "kv"])
@pytest.mark.parametrize("dtype", [BF16, pytest.param(torch.float16, id="fp16")])
def test_attention_kernel_half_precision(levelwise, dtype):
    """Model-dtype queries take the tensor-core (non-IEEE) dots; digits are exact in both dtypes, so
    the tolerance is half precision's (as in test_cq_triton)."""
    seqs = random_batch(7, decode_only=False)
    check_kernel("kvtq", seqs, 2, 4, 128, dtype=dtype, tol=2e-2, levelwise=levelwise)


@reference_only
def test_levelwise_mode_is_checked():
    from vllm_cq.kernels.kvtq.triton_ops import levelwise_sides

    fmt = get_format("kvtq")
    assert levelwise_sides("none", fmt.key, fmt.value, 128) == (False, False)
    assert levelwise_sides("kv", fmt.key, fmt.value, 128) == (True, True)
    with pytest.raises(ValueError):
        levelwise_sides("levelwise", fmt.key, fmt.value, 128)
    g8, g32 = TernarySpec(2, group=8), TernarySpec(2, group=32)  # 8 channels: below a tensor-core tile
    assert levelwise_sides("v", g8, g32, 64) == (False, True)
    with pytest.raises(ValueError):
        levelwise_sides("k", g8, g32, 64)


@runs_kernels
@pytest.mark.parametrize(
    "fmt_name, W, mode, gqa",
    [("kvtq1", 7, "chunked", (2, 3)), ("kvtq", 16, "decode", (1, 4)), ("kvtq", 10**6, "chunked", (2, 1))],
)
def test_window_kernel_matches_reference(fmt_name, W, mode, gqa):
    """Recent window on the KVTQ Triton path (trits for j <= i - W, the exact window merged in one softmax)
    against the reference, NaN wherever vLLM keeps no window entry."""
    import random

    from tests.kernels.test_window import Batch, random_seqs
    from vllm_cq.kernels.kvtq import triton_ops

    seqs = random_seqs(random.Random(W), mode, 64, 16)
    b = Batch(fmt_name, seqs, gqa[0], gqa[1], 64, 16, W)
    want, g = b.attend(b.window), b.on(DEVICE)
    got = triton_ops.paged_attention(
        g.q, g.cache, b.fmt, g.table, g.seq_lens, g.qsl, b.scale, max(q for _, q in seqs), block_n=16, window=g.window
    ).cpu()
    assert not got.isnan().any()
    assert rel_err(got, want) < 1e-4, (rel_err(got, want), seqs)
