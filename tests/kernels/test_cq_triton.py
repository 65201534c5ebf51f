"""Triton CQ kernels against the plain-torch reference. On a machine without a GPU they run under
TRITON_INTERPRET=1 on small shapes (CI); on a GPU the same tests run compiled, plus larger shapes."""

from __future__ import annotations

import os
import random
import subprocess
import sys

import pytest
import torch

from tests.conftest import rel_err
from tests.kernels.test_cq_naive import CASES, make_paged, random_codebooks, slots_of
from vllm_cq.formats import get_format
from vllm_cq.kernels.cq import naive, ops
from vllm_cq.kernels.rope import apply_rope, build_cos_sin_cache

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytest.importorskip("triton")
# Triton's interpreter must be chosen before triton is first imported, and the vLLM engines other
# tests start must not inherit it: without a GPU this module re-runs itself in a child pytest with
# TRITON_INTERPRET=1 (test_kernels_in_triton_interpreter) and skips its kernel tests here.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
runs_kernels = pytest.mark.skipif(DEVICE == "cpu" and not INTERPRETED, reason="runs in the interpreter child")
gpu_only = pytest.mark.skipif(DEVICE != "cuda", reason="full-size shapes need a GPU")


@pytest.mark.skipif(DEVICE == "cuda" or INTERPRETED, reason="kernels run directly here")
def test_kernels_in_triton_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1500)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]
    last = out.stdout.strip().splitlines()[-1]
    assert " passed" in last and "failed" not in last and "error" not in last, last


if DEVICE == "cuda" or INTERPRETED:
    from vllm_cq.kernels.cq import attention as attn_mod
    from vllm_cq.kernels.cq import write as write_mod


def to_dev(*ts):
    return [None if t is None else t.to(DEVICE) for t in ts]


def random_batch(seed: int, decode_only: bool, max_len: int = 90) -> list[tuple[int, int]]:
    """(seq_len, q_len) per sequence: odd lengths, page boundaries, decode and chunked prefill; odd seeds
    put one-token sequences first, as vLLM orders a step (the kernels' sequence lookup guesses those)."""
    rng = random.Random(seed)
    seqs = []
    for _ in range(rng.randint(1, 5)):
        L = rng.choice([rng.randint(1, max_len), 16 * rng.randint(1, max_len // 16), 16 * rng.randint(1, 4) + 1])
        seqs.append((L, 1 if decode_only else rng.choice([1, rng.randint(1, L)])))
    if seed % 2:
        seqs.sort(key=lambda s: s[1] != 1)
    return seqs


def filled_cache(fmt, seqs, hkv, d, bs):
    """Paged cache with poisoned free slots and each sequence's codes written by the reference."""
    nblk, table, seq_lens, qsl = make_paged(seqs, bs)
    kcb, vcb = random_codebooks(fmt, hkv, d)
    cache = torch.randint(0, 256, (nblk, hkv, bs, fmt.slot_bytes(d)), dtype=torch.uint8)
    for s, (L, _) in enumerate(seqs):
        pos = torch.arange(L)
        naive.write_kv_cache(
            torch.randn(L, hkv, d), torch.randn(L, hkv, d), cache, slots_of(table, s, pos, bs), kcb, vcb, fmt
        )
    return cache, table, seq_lens, qsl, kcb, vcb


def check_attention(fmt_name, seqs, hkv, ratio, d, is_neox, pre_rope, dtype=torch.float32, tol=1e-4, **kw):
    fmt, bs = get_format(fmt_name), 16
    cache, table, seq_lens, qsl, kcb, vcb = filled_cache(fmt, seqs, hkv, d, bs)
    rope = build_cos_sin_cache(d, max(L for L, _ in seqs) + 1) if pre_rope else None
    q = torch.randn(int(qsl[-1]), hkv * ratio, d)
    scale = d**-0.5
    want = naive.paged_attention(q, cache, kcb, vcb, fmt, table, seq_lens, qsl, scale, rope, is_neox)
    q_d, cache_d, kcb_d, vcb_d, table_d, seq_lens_d, qsl_d, rope_d = to_dev(
        q.to(dtype), cache, kcb.to(dtype), vcb.to(dtype), table, seq_lens, qsl, rope
    )
    max_q = max(q for _, q in seqs)
    got = attn_mod.paged_attention(
        q_d, cache_d, kcb_d, vcb_d, fmt.key_bytes(d), table_d, seq_lens_d, qsl_d, scale, rope_d, is_neox, max_q,
        key_norm_offset=fmt.key.norm_offset(d), **kw,
    )  # fmt: skip
    assert got.dtype == dtype
    err = rel_err(got.float().cpu(), want)
    assert err < tol, (err, seqs)


FMT_GQA = pytest.mark.parametrize(
    "fmt_name, hkv, ratio, is_neox, pre_rope",
    [
        ("cq1", 2, 1, True, True),
        ("cq4", 1, 4, True, True),
        ("cq_k4v1", 2, 8, False, True),
        ("cq2", 2, 2, True, False),
        ("cq_k4v2", 1, 3, True, True),
        ("cq2n", 2, 4, True, True),
        ("cq_k4v05", 2, 2, True, True),
    ],
    ids=[
        "cq1-gqa1-neox", "cq4-gqa4-neox", "cq_k4v1-gqa8-gptj", "cq2-gqa2-norope", "cq_k4v2-gqa3-neox",
        "cq2n-gqa4-neox", "cq_k4v05-gqa2-neox",
    ],
)  # fmt: skip


@runs_kernels
@pytest.mark.parametrize("case", list(CASES))
@FMT_GQA
def test_attention_kernel_matches_reference(case, fmt_name, hkv, ratio, is_neox, pre_rope):
    check_attention(fmt_name, CASES[case], hkv, ratio, 32, is_neox, pre_rope)


@runs_kernels
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("segments", [1, 4])
@FMT_GQA
def test_decode_split_kv_matches_reference(seed, segments, fmt_name, hkv, ratio, is_neox, pre_rope):
    """Decode-only batches, whole-sequence and split-KV (flash-decoding) tilings; segments outnumber
    the tiles of short sequences, so empty segments are merged too."""
    seqs = random_batch(seed, decode_only=True)
    check_attention(fmt_name, seqs, hkv, ratio, 32, is_neox, pre_rope, num_segments=segments, block_n=16)


@runs_kernels
@pytest.mark.parametrize("seed", range(4))
@FMT_GQA
def test_mixed_prefill_batches_match_reference(seed, fmt_name, hkv, ratio, is_neox, pre_rope):
    check_attention(fmt_name, random_batch(100 + seed, decode_only=False), hkv, ratio, 32, is_neox, pre_rope)


@runs_kernels
@pytest.mark.parametrize(
    "fmt_name, ratio, is_neox, decode_only",
    [("cq1", 2, True, True), ("cq_k4v1", 4, False, False)],
    ids=["cq1-neox-decode", "cq_k4v1-gptj-mixed"],
)
def test_rope_split_matches_reference(fmt_name, ratio, is_neox, decode_only):
    """The R(P) R(n) rotation (a tuning option, not the default) gives the reference's scores too."""
    seqs = random_batch(200, decode_only=decode_only)
    check_attention(fmt_name, seqs, 2, ratio, 32, is_neox, True, block_n=16, rope_split=True)


@runs_kernels
@pytest.mark.parametrize("k_parts", [2, 4])
@pytest.mark.parametrize(
    "fmt_name, ratio, is_neox, rope_split",
    [("cq1", 2, True, False), ("cq4", 4, True, False), ("cq_k4v1", 4, False, False), ("cq2", 2, True, True)],
    ids=["cq1-neox", "cq4-neox", "cq_k4v1-gptj", "cq2-neox-split"],
)
def test_key_parts_match_reference(k_parts, fmt_name, ratio, is_neox, rope_split):
    """Key tiles in 2 or 4 parts of RoPE pairs (head_dim 64 and 128: a part needs >= 16 pairs), decode
    and mixed batches."""
    for d, decode_only in ((64, True), (128, False)):
        seqs = random_batch(300 + k_parts, decode_only=decode_only, max_len=40)
        check_attention(fmt_name, seqs, 2, ratio, d, is_neox, True, k_parts=k_parts, rope_split=rope_split)


@runs_kernels
def test_attention_padded_batch_leaves_real_rows_exact():
    """CUDA-graph padding: extra sequences with no new tokens or no keys, and padded query rows past
    query_start_loc[-1], must not disturb the real rows (and must not be written)."""
    fmt, d, hkv, ratio, bs = get_format("cq1"), 32, 2, 2, 16
    seqs = [(20, 1), (33, 1)]
    cache, table, seq_lens, qsl, kcb, vcb = filled_cache(fmt, seqs, hkv, d, bs)
    rope = build_cos_sin_cache(d, 64)
    q = torch.randn(4, hkv * ratio, d)
    want = naive.paged_attention(q[:2], cache, kcb, vcb, fmt, table, seq_lens, qsl, d**-0.5, rope)
    table_p = torch.cat([table, torch.zeros(2, table.shape[1], dtype=table.dtype)])
    seq_lens_p = torch.cat([seq_lens, torch.tensor([0, 0], dtype=seq_lens.dtype)])
    qsl_p = torch.cat([qsl, qsl[-1:], qsl[-1:]])
    out = torch.full((4, hkv * ratio, d), 7.0)
    args = to_dev(q, cache, kcb, vcb, table_p, seq_lens_p, qsl_p, rope, out)
    q_d, cache_d, kcb_d, vcb_d, table_d, seq_lens_d, qsl_d, rope_d, out_d = args
    for segments in (1, 4):
        attn_mod.paged_attention(
            q_d, cache_d, kcb_d, vcb_d, fmt.key_bytes(d), table_d, seq_lens_d, qsl_d, d**-0.5, rope_d, True, 1,
            out=out_d, num_segments=segments,
        )  # fmt: skip
        assert rel_err(out_d[:2].cpu(), want) < 1e-4
        assert bool((out_d[2:].cpu() == 7.0).all()), "padded rows were written"


MIXED = [(37, 37), (50, 1), (21, 5)]
DECODES_FIRST = [(9 + 3 * i, 1) for i in range(18)] + [(21, 5), (37, 37)]  # vLLM's order: decodes first


@runs_kernels
@pytest.mark.parametrize(
    "fmt_name, heads, head_dim, is_neox, rope",
    [
        ("cq1", 2, 64, True, True),
        ("cq1", 1, 32, False, True),
        ("cq4", 1, 32, True, True),
        ("cq_k4v1", 3, 64, False, True),
        ("cq2", 2, 32, True, False),
        ("cq2n", 2, 64, True, True),
        ("cq2n", 1, 32, False, False),
        ("cq_k4v05", 1, 32, True, True),  # 16-channel value groups: a matmul with no padding channel
    ],
)
@pytest.mark.parametrize("seqs", [MIXED, DECODES_FIRST], ids=["mixed", "decodes-first"])
@pytest.mark.parametrize("packed", [False, True], ids=["argmin", "packed"])
def test_write_kernel_matches_reference(fmt_name, heads, head_dim, is_neox, rope, seqs, packed, monkeypatch):
    """One launch writes K and V codes; post-RoPE keys are un-rotated at positions the kernel derives
    from the varlen batch (decode tokens and prefill chunks of several sequences). Both group forms:
    8-channel groups as a matmul (cq1, cq_k4v1's values), smaller ones per channel. cq1, cq4 and cq2n
    (key norms) at head_dim 32 as a prefill-sized step runs them (`write.LARGE_*`): 64 tokens per
    program, products on tensor cores (`write.DOT_PRECISION`), groups of 2+ channels as a matmul
    (`write.MATMUL_MIN_C`); with the decodes-first batch as one program per K / V looping over the groups
    (`write.LARGE_GROUP_LOOP`). Decode tokens first (vLLM's order) take the kernel's guessed sequence, the
    rest its binary search: with 18 decodes first, the first 16-token block is all guesses. Both argmins:
    tl.argmin and the packed integer min (`write.PACKED_ARGMIN`: the distance from the matmul's two spare
    channels where there are some, else one add)."""
    monkeypatch.setattr(write_mod, "PACKED_ARGMIN", packed)
    if fmt_name in ("cq1", "cq4", "cq2n") and head_dim == 32:
        monkeypatch.setattr(write_mod, "LARGE_STEP", 1)
        monkeypatch.setattr(write_mod, "LARGE_BLOCK_T", 64)
        monkeypatch.setattr(write_mod, "DOT_PRECISION", "tf32x3")
        monkeypatch.setattr(write_mod, "MATMUL_MIN_C", 2)
        monkeypatch.setattr(write_mod, "LARGE_GROUP_LOOP", seqs is DECODES_FIRST)  # both program forms
    else:  # the decode-sized form, whatever LARGE_STEP is
        monkeypatch.setattr(write_mod, "LARGE_STEP", 1 << 30)
    fmt, bs = get_format(fmt_name), 16
    nblk, table, seq_lens, qsl = make_paged(seqs, bs)
    kcb, vcb = random_codebooks(fmt, heads, head_dim)
    n = int(qsl[-1])
    seq, pos = ops.token_seq_and_positions(qsl.long(), seq_lens.long(), n)
    slots = torch.cat([slots_of(table, s, pos[seq == s], bs) for s in range(len(seqs))])
    slots[::7] = -1  # padding tokens are skipped
    cos_sin = build_cos_sin_cache(head_dim, 64) if rope else None
    k_pre, v = torch.randn(n, heads, head_dim), torch.randn(n, heads, head_dim)
    k = apply_rope(k_pre, pos, cos_sin, is_neox) if rope else k_pre
    poison = torch.randint(0, 256, (nblk, heads, bs, fmt.slot_bytes(head_dim)), dtype=torch.uint8)
    want = poison.clone()
    naive.write_kv_cache(k_pre, v, want, slots, kcb, vcb, fmt)
    got = poison.clone().to(DEVICE)
    k_d, v_d, slots_d, kcb_d, vcb_d, qsl_d, seq_lens_d, cs_d = to_dev(k, v, slots, kcb, vcb, qsl, seq_lens, cos_sin)
    write_mod.write_kv_cache(
        k_d, v_d, got, slots_d, kcb_d, vcb_d, fmt.key_bytes(head_dim), qsl_d, seq_lens_d, cs_d, is_neox,
        fmt.key.norm_offset(head_dim),
    )  # fmt: skip
    got = got.cpu()
    kept = slots[slots >= 0]
    blk, off = kept // bs, kept % bs
    # over the written slots only (a whole-cache mean diluted a missing group below the tolerance)
    mismatch = (got[blk, :, off] != want[blk, :, off]).float().mean().item()
    assert mismatch < 2e-3, mismatch  # only near-ties after un-rotation rounding may resolve differently
    untouched = torch.ones(nblk, bs, dtype=torch.bool)
    untouched[blk, off] = False
    assert torch.equal(got.transpose(1, 2)[untouched], poison.transpose(1, 2)[untouched])  # nothing else written


@gpu_only
@pytest.mark.parametrize("fmt_name", ["cq1", "cq2", "cq4", "cq_k4v1", "cq2n", "cq_k4v05"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("decode", [True, False])
def test_full_size_half_precision(fmt_name, dtype, decode):
    """Llama-3.1-8B head shape (head_dim 128, 32 q / 8 kv heads), long contexts, half-precision
    queries and codebooks as vLLM runs them; tolerance is half precision's, not the format's."""
    rng = random.Random(7)
    seqs = [(rng.randint(300, 3000), 1 if decode else rng.randint(1, 300)) for _ in range(6)]
    check_attention(fmt_name, seqs, 8, 4, 128, True, True, dtype=dtype, tol=2e-2)


def test_ops_dispatch_round_trip_post_rope_keys():
    """ops.write_kv_cache + ops.paged_attention (what the backend calls) on post-RoPE keys equal the
    reference on the same inputs; on CPU both dispatch to the reference, on CUDA to Triton."""
    fmt, d, hkv, bs = get_format("cq1"), 64, 2, 16
    seqs = [(40, 40), (23, 1)]
    nblk, table, seq_lens, qsl = make_paged(seqs, bs)
    kcb, vcb = random_codebooks(fmt, hkv, d)
    rope = build_cos_sin_cache(d, 512)
    seq, pos = ops.token_seq_and_positions(qsl.long(), seq_lens.long(), int(qsl[-1]))
    slots = torch.cat([slots_of(table, s, pos[seq == s], bs) for s in range(len(seqs))])
    k_pre, v = torch.randn(len(pos), hkv, d), torch.randn(len(pos), hkv, d)
    k_post = apply_rope(k_pre, pos, rope)
    q = torch.randn(len(pos), hkv * 4, d)
    ref_cache = torch.zeros(nblk, hkv, bs, fmt.slot_bytes(d), dtype=torch.uint8)
    naive.write_kv_cache(k_pre, v, ref_cache, slots, kcb, vcb, fmt)
    # only the final token of the decode sequence attends: its 22 earlier keys are written above too
    want = naive.paged_attention(q, ref_cache, kcb, vcb, fmt, table, seq_lens, qsl, d**-0.5, rope)
    k_post, v, slots, kcb, vcb, rope, q, table, seq_lens, qsl = to_dev(
        k_post, v, slots, kcb, vcb, rope, q, table, seq_lens, qsl
    )
    cache = torch.zeros(nblk, hkv, bs, fmt.slot_bytes(d), dtype=torch.uint8, device=DEVICE)
    ops.write_kv_cache(k_post, v, cache, slots, kcb, vcb, fmt, qsl, seq_lens, rope)
    got = ops.paged_attention(q, cache, kcb, vcb, fmt, table, seq_lens, qsl, d**-0.5, rope)
    assert (cache.cpu() == ref_cache).float().mean() > 0.999
    assert rel_err(got.cpu(), want) < 1e-3


WINDOW_CASES = [
    # (format, (code block, window block), W, mode, (kv heads, query heads per kv head))
    ("cq1", (64, 16), 1, "decode", (2, 1)),
    ("cq1", (64, 16), 15, "chunked", (1, 4)),
    ("cq1", (32, 16), 16, "decode", (2, 3)),
    ("cq_k4v1", (64, 16), 35, "chunked", (2, 3)),
    ("cq_k4v1", (32, 16), 10**6, "chunked", (1, 4)),
    ("cq1", (64, 16), 10**6, "decode", (2, 1)),
]


# the window merge's own tiles (`window_triton`'s module settings): larger prefill query blocks, other
# decode tiles
WINDOW_SETTINGS = [
    ("cq1", (64, 16), 35, "chunked", (2, 3), {"PREFILL_BLOCK_Q": 32, "PREFILL_BLOCK_N": 64}),
    ("cq_k4v1", (32, 16), 20, "chunked", (1, 4), {"PREFILL_BLOCK_Q": 8, "PREFILL_NUM_WARPS": 8}),
    ("cq1", (64, 16), 40, "decode", (2, 3), {"DECODE_BLOCK_N": 64, "DECODE_NUM_WARPS": 8}),
]


@runs_kernels
@pytest.mark.parametrize(
    "fmt_name, blocks, W, mode, gqa, block_n, settings",
    [(*c, 16, {}) for c in WINDOW_CASES]
    + [("cq1", (64, 16), 35, "chunked", (2, 3), None, {})]  # + the default tiles
    + [(*c[:5], None, c[5]) for c in WINDOW_SETTINGS],
    ids=[str(c) for c in WINDOW_CASES] + ["default-tiles"] + [str(c[5]) for c in WINDOW_SETTINGS],
)
def test_window_kernel_matches_reference(fmt_name, blocks, W, mode, gqa, block_n, settings, monkeypatch):
    """Recent window on the Triton path (codes bounded by j <= i - W, the exact window from its own pages,
    one softmax over both) against the reference, on batches whose window cache holds NaN wherever
    vLLM would not keep entries: page boundaries of both block sizes, odd lengths, decode and chunked
    prefill, GQA, W from 1 to past every sequence; and with the merge's own tile settings."""
    from tests.kernels.test_window import Batch, random_seqs
    from vllm_cq.kernels import window_triton

    for name, value in settings.items():
        monkeypatch.setattr(window_triton, name, value)

    seqs = random_seqs(random.Random(W + len(mode)), mode, *blocks)
    if settings and mode == "chunked":  # chunks past a query block of every tiling: 70 and 33 new tokens
        seqs = [(100, 70), (50, 1), (90, 33), (17, 17)]
    b = Batch(fmt_name, seqs, gqa[0], gqa[1], blocks[0], blocks[1], W)
    want = b.attend(b.window)
    max_q, g = max(q for _, q in seqs), b.on(DEVICE)
    got = attn_mod.paged_attention(
        g.q, g.cache, g.kcb, g.vcb, b.fmt.key_bytes(32), g.table, g.seq_lens, g.qsl, b.scale, g.rope, True,
        max_q, window=g.window, block_n=block_n,
    ).cpu()  # fmt: skip
    assert not got.isnan().any()
    assert rel_err(got, want) < 1e-4, (rel_err(got, want), seqs)


@runs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_window_write_kernel_matches_reference(dtype):
    """The Triton window copy stores exactly what the torch reference stores, skips slot -1 and leaves
    every other entry (the NaN null block 0 included) untouched; keys and values may be strided views."""
    from vllm_cq.kernels.window import write_window_reference
    from vllm_cq.kernels.window_triton import write_window as triton_write_window

    n, hkv, d, bs = 11, 2, 32, 16
    qkv = torch.randn(n, 3 * hkv, d)  # views of a fused tensor, as vLLM passes them
    k, v = qkv[:, hkv : 2 * hkv], qkv[:, 2 * hkv :]
    slots = torch.tensor([17, -1, 18, 19, 40, -1, 41, 63, 64, 1 * bs + 5, 2 * bs], dtype=torch.int64)
    want = torch.full((6, hkv, bs, 2 * d), float("nan"), dtype=dtype)
    got, qkv_dev, slots_dev = want.to(DEVICE), qkv.to(DEVICE), slots.to(DEVICE)
    write_window_reference(want, k, v, slots)
    triton_write_window(got, qkv_dev[:, hkv : 2 * hkv], qkv_dev[:, 2 * hkv :], slots_dev)
    got = got.cpu()
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.nan_to_num(), want.nan_to_num())
    assert got[0].isnan().all()
