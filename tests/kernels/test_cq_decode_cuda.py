"""The CUDA decode kernel with shared-memory codebooks (`kernels/cq/decode_cuda.cu`).

On a CPU machine: every instance the dispatch can pick compiles with NVRTC for sm_90 without register
spills. On a GPU: the kernel against the torch reference on randomized batches (page boundaries, odd
lengths, GQA ratios, several sequences, split-KV segments, a recent window, half precision)."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from tests.conftest import rel_err
from tests.kernels.test_cq_naive import make_paged, random_codebooks, slots_of
from vllm_cq.formats import get_format
from vllm_cq.kernels.cq import cuda_build, decode_cuda, naive, prefill_cuda
from vllm_cq.kernels.rope import build_cos_sin_cache

pytest.importorskip("cuda.bindings")
GPU = torch.cuda.is_available()
gpu_only = pytest.mark.skipif(not GPU, reason="runs the kernel: needs a GPU")

# formats the kernel covers (8-bit codes, no stored norm) and their centroid widths
FORMATS = ["cq1", "cq2", "cq4", "cq_k4v1", "cq_k4v2", "cq_k4v05"]


def centroid_dims(fmt_name: str) -> tuple[int, int]:
    fmt = get_format(fmt_name)
    return fmt.key.codebook_shape(1, 128)[2], fmt.value.codebook_shape(1, 128)[2]


def instances() -> list[decode_cuda.Instance]:
    out = []
    for name in FORMATS:
        ck, cv = centroid_dims(name)
        for d in (64, 128):
            for g in (1, 4, 8):
                if decode_cuda.shape_ok(g, d, ck, cv):
                    out.append(decode_cuda.Instance(g, d, ck, cv, True, decode_cuda.DEFAULT_ROPE_MODE))
    ck, cv = centroid_dims("cq1")
    out += [decode_cuda.Instance(4, 128, ck, cv, bf16, mode, unroll=u) for bf16 in (True, False)
            for mode in (0, 1, 2, 3) for u in (1, decode_cuda.DEFAULT_UNROLL)]  # fmt: skip
    out += [decode_cuda.Instance(g, 64, ck, cv, True, 3) for g in (1, 8)]
    out += [decode_cuda.Instance(4, 128, *centroid_dims(n), True, 3) for n in FORMATS]  # RoPE mode 3 per format
    out += [decode_cuda.Instance(4, 128, *centroid_dims(n), True, 3, persistent=True) for n in ("cq1", "cq4")]
    # the page layout as constants (the VLLM_CQ_LAYOUT_CONSTANTS build): Llama's pages of 16, wider ones
    out += [decode_cuda.Instance(4, 128, *centroid_dims(n), True, 3, slot_bytes=get_format(n).slot_bytes(128),
                                 page_size=ps) for n in FORMATS for ps in (16, 64)]  # fmt: skip
    return list(dict.fromkeys(out))


def compiled_report(inst: decode_cuda.Instance) -> dict[str, int]:
    cubin, log = decode_cuda.compile_cubin(inst, "sm_90", verbose=True)
    assert cubin[:4] == b"\x7fELF"
    rep = cuda_build.ptxas_report(log)
    if rep["registers"] < 0 and GPU:  # NVRTC 13.0 (the GPU image's) prints no ptxas report: ask the driver
        rep = decode_cuda.resource_usage(inst)
    assert 0 < rep["registers"] <= 255, (rep, log)
    return rep


@pytest.mark.parametrize("inst", instances(), ids=str)
def test_compiles_for_sm90_without_spills(inst):
    """What the dispatch launches does not spill: the instance itself, or its fallback where it would."""
    rep = compiled_report(inst)
    if rep["spill_bytes"] and inst.fallback() is not None:
        rep = compiled_report(inst.fallback())
    assert rep["spill_bytes"] == 0, (inst, rep)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_packed_rope_holds_the_words_mode_1_packs(dtype):
    """ROPE_MODE 3's table (CPU): row n, quad member t, word k of the cos (then sin) half holds the model-dtype
    values of pair columns t * D / 8 + 2k (low 16 bits) and + 1 (high), rounded to nearest as
    `pack_rope` rounds the float32 row; one table per cache and dtype."""
    rows, d = 37, 32
    cs = torch.randn(rows, d)
    table = decode_cuda.packed_rope(cs, dtype)
    assert table.dtype == torch.int32 and table.shape == (rows, d // 2) and table.is_contiguous()
    bits = cs.to(dtype).view(torch.int16).to(torch.int32) & 0xFFFF  # [rows, d]: cos columns, then sin
    half, ppt, ksteps = d // 2, d // 8, d // 16
    for t in range(4):
        for part in (0, 1):  # cos, sin
            for k in range(ksteps):
                col = part * half + t * ppt + 2 * k
                want = bits[:, col] | (bits[:, col + 1] << 16)
                got = table[:, (t * 2 + part) * ksteps + k]
                assert torch.equal(got, want), (t, part, k)  # int32 wraps: the same 32 bits
    assert decode_cuda.packed_rope(cs, dtype) is table


def test_packed_rope_is_never_served_stale():
    """The table cache is keyed by the cos/sin cache's address: a cache changed in place, or a new one at
    a freed one's address (another model's RoPE), must get its own words, not the old table's."""
    cs = torch.randn(16, 32)
    first = decode_cuda.packed_rope(cs, torch.bfloat16)
    cs.mul_(-1)  # in place: same address, new values
    flipped = decode_cuda.packed_rope(cs, torch.bfloat16)
    assert flipped is not first and not torch.equal(flipped, first)
    key = next(k for k in decode_cuda._PACKED_ROPE if k[0] == cs.data_ptr())
    ptr, rows_cols = cs.data_ptr(), tuple(cs.shape)
    del cs  # freed: its entry must not answer for a cache at the same address
    assert decode_cuda._PACKED_ROPE[key][0]() is None
    other = torch.randn(16, 32)
    other_table = decode_cuda.packed_rope(other, torch.bfloat16)
    want = other.to(torch.bfloat16).view(torch.int16).to(torch.int32) & 0xFFFF
    assert torch.equal(other_table[:, 0], want[:, 0] | (want[:, 1] << 16))
    if other.data_ptr() == ptr and tuple(other.shape) == rows_cols:  # the allocator reused the address
        assert other_table is not flipped
    with torch.inference_mode():  # vLLM's forward: tensors without a version counter
        inf = torch.randn(16, 32)
        assert decode_cuda.packed_rope(inf, torch.bfloat16) is decode_cuda.packed_rope(inf, torch.bfloat16)


def test_rope_mode_from_the_environment(monkeypatch):
    """VLLM_CQ_DECODE_ROPE_MODE picks the decode kernel's RoPE mode for an A/B; mode 3 (the default) needs
    head_dim % 32 == 0, else mode 2; anything else is refused."""
    monkeypatch.delenv(decode_cuda.ROPE_ENV, raising=False)
    assert decode_cuda.default_rope_mode(128) == decode_cuda.DEFAULT_ROPE_MODE
    for mode in ("1", "2", "3"):
        monkeypatch.setenv(decode_cuda.ROPE_ENV, mode)
        assert decode_cuda.default_rope_mode(128) == int(mode)
    assert decode_cuda.default_rope_mode(80) == decode_cuda.ROPE_RECURRENCE  # 5 k-steps: mode 3's vectors split
    monkeypatch.delenv(decode_cuda.ROPE_ENV)
    assert decode_cuda.default_rope_mode(128) == decode_cuda.ROPE_PACKED
    assert decode_cuda.default_rope_mode(80) == decode_cuda.ROPE_RECURRENCE
    monkeypatch.setenv(decode_cuda.ROPE_ENV, "packed")
    with pytest.raises(ValueError, match="VLLM_CQ_DECODE_ROPE_MODE='packed'"):
        decode_cuda.default_rope_mode(128)


def test_shape_coverage_matches_the_formats():
    """Llama-3.1-8B's shape (head_dim 128, GQA 4) is covered for every 8-bit format without a stored norm;
    wider GQA groups and key centroids wider than a quad member's RoPE pairs are not."""
    assert all(decode_cuda.shape_ok(4, 128, *centroid_dims(name)) for name in FORMATS)
    assert all(decode_cuda.shape_ok(g, 64, 8, 8) for g in range(1, 9))
    assert not decode_cuda.shape_ok(9, 128, 8, 8), "GQA groups above 8 rows take the Triton kernel"
    assert not decode_cuda.shape_ok(4, 128, 32, 8), "key centroids must fit a quad member's RoPE pairs"
    assert not decode_cuda.shape_ok(4, 32, 8, 8), "head_dim 32: 4 RoPE pairs per quad member < 8 channels"


def random_decode_batch(seed: int, max_len: int) -> list[tuple[int, int]]:
    """(seq_len, 1) per sequence: page edges, odd lengths, one-token sequences, a long one."""
    rng = random.Random(seed)
    lens = [1, 15, 16, 17, 33, rng.randint(2, max_len) | 1, 16 * rng.randint(1, max_len // 16), max_len]
    rng.shuffle(lens)
    return [(L, 1) for L in lens[: rng.randint(3, len(lens))]]


def make_case(fmt_name, seqs, hkv, ratio, d, dtype, rope, bs=16, slot_pad=0) -> tuple[tuple, torch.Tensor]:
    """A paged batch written by the reference: the CUDA kernels' positional arguments on the GPU (query,
    cache, codebooks in `dtype`, key bytes, table, seq_lens, query_start_loc, scale, cos/sin), and the
    reference output (float32, CPU) over the same centroids. `slot_pad` > 0: the GPU cache is a view
    whose token stride is that many bytes wider than a slot."""
    fmt = get_format(fmt_name)
    nblk, table, seq_lens, qsl = make_paged(seqs, bs)
    kcb, vcb = random_codebooks(fmt, hkv, d)
    kcb, vcb = kcb.to(dtype).float(), vcb.to(dtype).float()  # the kernel's centroids, exactly
    cache = torch.randint(0, 256, (nblk, hkv, bs, fmt.slot_bytes(d)), dtype=torch.uint8)
    for s, (L, _) in enumerate(seqs):
        k, v = torch.randn(L, hkv, d), torch.randn(L, hkv, d)
        naive.write_kv_cache(k, v, cache, slots_of(table, s, torch.arange(L), bs), kcb, vcb, fmt)
    cs = build_cos_sin_cache(d, max(64, max(L for L, _ in seqs) + 17)) if rope else None
    q = torch.randn(int(qsl[-1]), hkv * ratio, d).to(dtype)
    scale = d**-0.5
    want = naive.paged_attention(q.float(), cache, kcb, vcb, fmt, table, seq_lens, qsl, scale, cs, True)
    dev = "cuda"
    gpu_cache = torch.zeros(*cache.shape[:3], cache.shape[3] + slot_pad, dtype=torch.uint8, device=dev)
    gpu_cache[..., : cache.shape[3]] = cache.to(dev)
    gpu_cache = gpu_cache[..., : cache.shape[3]]
    args = (
        q.to(dev), gpu_cache, kcb.to(dtype).to(dev), vcb.to(dtype).to(dev), fmt.key_bytes(d), table.to(dev),
        seq_lens.to(dev), qsl.to(dev), scale, None if cs is None else cs.to(dev),
    )  # fmt: skip
    return args, want


def checked_error(out: torch.Tensor, want: torch.Tensor) -> float:
    torch.cuda.synchronize()
    got = out.float().cpu()
    assert not got.isnan().any()
    return rel_err(got, want)


def run_case(
    fmt_name, seqs, hkv, ratio, d, dtype, rope, num_segments=None, rope_mode=None, bs=16, slot_pad=0, **launch
):
    args, want = make_case(fmt_name, seqs, hkv, ratio, d, dtype, rope, bs, slot_pad)
    out = decode_cuda.paged_attention(*args, num_segments=num_segments, rope_mode=rope_mode, **launch)
    return checked_error(out, want)


@gpu_only
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize(
    "fmt_name, hkv, ratio, d",
    [("cq1", 2, 4, 128), ("cq1", 3, 1, 64), ("cq2", 1, 8, 128), ("cq_k4v1", 2, 3, 128), ("cq_k4v2", 2, 2, 64),
     ("cq_k4v05", 2, 4, 128), ("cq1", 1, 5, 128)],
)  # fmt: skip
@pytest.mark.parametrize("rope_mode", [1, 2, 3])
def test_decode_matches_reference(seed, fmt_name, hkv, ratio, d, rope_mode):
    seqs = random_decode_batch(seed, 300)
    segments = [1, 4, 16][seed]
    err = run_case(fmt_name, seqs, hkv, ratio, d, torch.bfloat16, True, num_segments=segments, rope_mode=rope_mode)
    assert err < 2e-2, (err, seqs)


@gpu_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rope", [True, False])
def test_decode_dtypes_and_keys_without_rope(dtype, rope):
    err = run_case("cq1", random_decode_batch(5, 200), 2, 4, 128, dtype, rope)
    assert err < 2e-2, err


@gpu_only
@pytest.mark.parametrize("specialize", [True, False])
@pytest.mark.parametrize(
    "fmt_name, bs, slot_pad", [("cq1", 16, 0), ("cq1", 32, 8), ("cq4", 64, 0), ("cq_k4v1", 16, 16)]
)
def test_page_layouts(fmt_name, bs, slot_pad, specialize):
    """Pages of 16-64 tokens and token strides wider than a slot, with the layout compiled in as constants
    (`Instance.slot_bytes`, `page_size`: the default) or read from the arguments."""
    seqs = random_decode_batch(4, 300)
    err = run_case(fmt_name, seqs, 2, 4, 128, torch.bfloat16, True, bs=bs, slot_pad=slot_pad, specialize=specialize)
    assert err < 2e-2, (err, seqs)


def test_layout_constants_follow_the_cache(monkeypatch):
    """With SPECIALIZE_LAYOUT on, the instance a launch compiles takes the cache's own token stride and page
    size (so a padded view gets its real stride); none with it off. One CTA per item: the persistent
    choice asks the device for room, which the GPU tests cover."""
    monkeypatch.setattr(cuda_build, "SPECIALIZE_LAYOUT", True)
    monkeypatch.setattr(decode_cuda, "PERSISTENT", False)
    fmt, d = get_format("cq1"), 128
    q = torch.zeros(2, 8, d, dtype=torch.bfloat16)
    kcb, vcb = (torch.zeros(2 * d // 8, 256, 8, dtype=torch.bfloat16) for _ in range(2))
    wide = torch.zeros(5, 2, 32, fmt.slot_bytes(d) + 8, dtype=torch.uint8)[..., : fmt.slot_bytes(d)]
    inst = decode_cuda._instance(q, wide, kcb, vcb, None)
    assert (inst.slot_bytes, inst.page_size) == (fmt.slot_bytes(d) + 8, 32)
    assert "-DSLOT_BYTES=40" in inst.defines() and "-DPAGE_SHIFT=5" in inst.defines()
    assert (decode_cuda._instance(q, wide, kcb, vcb, None, specialize=False).slot_bytes, fmt.slot_bytes(d)) == (0, 32)
    monkeypatch.setattr(cuda_build, "SPECIALIZE_LAYOUT", False)
    assert (
        decode_cuda._instance(q, wide, kcb, vcb, None).defines()
        == dataclasses.replace(inst, slot_bytes=0, page_size=0).defines()
    )


@gpu_only
@pytest.mark.parametrize("fmt_name", ["cq1", "cq2", "cq_k4v1", "cq_k4v05"])
def test_full_size_long_context(fmt_name):
    """Llama-3.1-8B's head shape at contexts in the thousands, where the warps each walk many steps (and
    the recurrence re-reads its rows)."""
    rng = random.Random(11)
    seqs = [(rng.randint(1000, 5000), 1) for _ in range(4)]
    for mode, unroll, warps in [(1, 3, 8), (2, 3, 8), (2, 1, 8), (3, 3, 8), (3, 1, 12)]:
        err = run_case(fmt_name, seqs, 8, 4, 128, torch.bfloat16, True, rope_mode=mode, unroll=unroll, num_warps=warps)
        assert err < 2e-2, (mode, unroll, warps, err)


def window_case(monkeypatch, W: int, mode: str) -> tuple[tuple, dict, torch.Tensor]:
    """test_window's batch at head_dim 64 in bf16 (codes for keys older than the window, the exact window
    in its own pages): the CUDA kernels' positional arguments, the window keyword, the reference."""
    from tests.kernels import test_window

    monkeypatch.setattr(test_window, "D", 64)
    if mode == "mixed":  # a vLLM mixed step: four decodes first, then prefill chunks
        rng = random.Random(W)
        seqs = test_window.random_seqs(rng, "decode", 64, 16)[:4] + test_window.random_seqs(rng, "chunked", 64, 16)
    else:
        seqs = test_window.random_seqs(random.Random(W), mode, 64, 16)
    b = test_window.Batch("cq1", seqs, 2, 4, 64, 16, W, win_dtype=torch.bfloat16)
    b.kcb, b.vcb = b.kcb.bfloat16().float(), b.vcb.bfloat16().float()
    b.q = b.q.bfloat16().float()
    want = b.attend(b.window)
    g = b.on("cuda")
    args = (
        g.q.bfloat16(), g.cache, g.kcb.bfloat16(), g.vcb.bfloat16(), b.fmt.key_bytes(64), g.table, g.seq_lens,
        g.qsl, b.scale, g.rope,
    )  # fmt: skip
    return args, {"window": g.window}, want


@gpu_only
@pytest.mark.parametrize("segments", [1, None])
@pytest.mark.parametrize("W", [1, 16, 35, 10**6])
def test_window_merge_matches_reference(monkeypatch, W, segments):
    """Codes for keys older than the window, the exact window merged by window_triton: same answer as the
    reference's window attention."""
    args, kw, want = window_case(monkeypatch, W, "decode")
    assert checked_error(decode_cuda.paged_attention(*args, **kw, num_segments=segments), want) < 2e-2


@gpu_only
def test_ops_dispatch_takes_the_cuda_kernel_for_decode(monkeypatch):
    """ops.paged_attention routes decode steps here when enabled and gives the Triton kernel's answer."""
    from vllm_cq.kernels.cq import ops

    fmt, d, bs = get_format("cq1"), 128, 16
    seqs = random_decode_batch(3, 120)
    nblk, table, seq_lens, qsl = make_paged(seqs, bs)
    kcb, vcb = random_codebooks(fmt, 2, d)
    cache = torch.randint(0, 256, (nblk, 2, bs, fmt.slot_bytes(d)), dtype=torch.uint8, device="cuda")
    cs = build_cos_sin_cache(d, 200).cuda()
    q = torch.randn(len(seqs), 8, d, dtype=torch.bfloat16, device="cuda")
    args = (q, cache, kcb.cuda(), vcb.cuda(), fmt, table.cuda(), seq_lens.cuda(), qsl.cuda(), d**-0.5, cs, True, 1)
    kw = dict(k_codebook_attn=kcb.bfloat16().cuda(), v_codebook_attn=vcb.bfloat16().cuda())
    calls = []
    real = decode_cuda.paged_attention_decode
    monkeypatch.setattr(decode_cuda, "paged_attention_decode", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setenv("VLLM_CQ_DECODE_KERNEL", "triton")
    want = ops.paged_attention(*args, **kw).float()
    assert not calls
    monkeypatch.setenv("VLLM_CQ_DECODE_KERNEL", "cuda")
    got = ops.paged_attention(*args, **kw).float()
    assert calls
    assert rel_err(got.cpu(), want.cpu()) < 2e-2


@gpu_only
@pytest.mark.parametrize("persistent", [False, True])
def test_decode_replays_in_a_cuda_graph(persistent, monkeypatch):
    """Captured once (after one eager step, as vLLM warms up), replayed with new queries and longer
    sequences: the launch reads everything from device tensors, so each replay matches the reference.
    Also with persistent CTAs (their grid is the batch shape's too)."""
    monkeypatch.setattr(decode_cuda, "PERSISTENT", persistent)
    fmt, d, bs, hkv, ratio = get_format("cq1"), 128, 16, 2, 4
    seqs = [(300, 1), (17, 1), (129, 1)]
    nblk, table, seq_lens, qsl = make_paged(seqs, bs)
    kcb, vcb = random_codebooks(fmt, hkv, d)
    kcb, vcb = kcb.bfloat16().float(), vcb.bfloat16().float()
    cache = torch.randint(0, 256, (nblk, hkv, bs, fmt.slot_bytes(d)), dtype=torch.uint8)
    cs = build_cos_sin_cache(d, 400)
    dev = [t.cuda() for t in (cache, table, seq_lens, qsl, cs)]
    q = torch.randn(len(seqs), hkv * ratio, d, dtype=torch.bfloat16, device="cuda")
    out = torch.empty_like(q)
    args = (q, dev[0], kcb.bfloat16().cuda(), vcb.bfloat16().cuda(), fmt.key_bytes(d), dev[1], dev[2], dev[3], d**-0.5)
    decode_cuda.paged_attention(*args, dev[4], out=out)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        decode_cuda.paged_attention(*args, dev[4], out=out)
    for step in range(2):
        q.copy_(torch.randn_like(q))
        dev[2].copy_(seq_lens - step)  # what a later step changes in place: lengths and queries
        graph.replay()
        torch.cuda.synchronize()
        want = naive.paged_attention(q.float().cpu(), cache, kcb, vcb, fmt, table, seq_lens - step, qsl, d**-0.5, cs)
        assert rel_err(out.float().cpu(), want) < 2e-2, step


@gpu_only
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize(
    "fmt_name, hkv, ratio, d", [("cq1", 2, 4, 128), ("cq4", 1, 8, 128), ("cq_k4v1", 3, 1, 64), ("cq2", 8, 4, 128)]
)
def test_persistent_ctas_match_reference(seed, fmt_name, hkv, ratio, d):
    """One CTA per SM and KV head looping over its head's items (PERSISTENT): more items than CTAs, a
    padded entry (no new token), 1/4/16 segments, both page-layout builds."""
    seqs = random_decode_batch(seed, 300) * 8 + [(40, 0)]
    kw = dict(num_segments=[1, 4, 16][seed], persistent=True, specialize=seed % 2 == 0)
    err = run_case(fmt_name, seqs, hkv, ratio, d, torch.bfloat16, True, **kw)
    assert err < 2e-2, (err, seqs)


@gpu_only
@pytest.mark.parametrize("W", [16, 35])
def test_persistent_ctas_with_a_window(monkeypatch, W):
    args, kw, want = window_case(monkeypatch, W, "decode")
    assert checked_error(decode_cuda.paged_attention(*args, **kw, persistent=True), want) < 2e-2


def test_persistent_split_gives_every_cta_an_item():
    """Persistent CTAs run one wave (132 SMs, 8 KV heads: 16 CTAs per head), so segments only fill them:
    one sequence 16, 16 sequences none; one CTA per item keeps its two waves."""
    split = decode_cuda.num_segments_for
    assert decode_cuda.persistent_ctas(8, 132) == 16 and decode_cuda.persistent_ctas(64, 32) == 1
    assert [split(n, 8, 132, persistent=True) for n in (1, 3, 16, 64, 128)] == [16, 8, 1, 1, 1]
    assert [split(n, 8, 132) for n in (1, 3, 16, 64, 128)] == [16, 16, 4, 1, 1]


def test_persistent_instance_has_room_for_its_merge():
    """A persistent instance keeps the codebooks staged, so its warps' merge takes [NW][8][D] floats more
    shared memory (160 KB at head_dim 128), and it compiles without spills."""
    inst = decode_cuda.Instance(4, 128, 8, 8, True, 3, persistent=True)
    assert inst.smem_bytes() == decode_cuda.smem_bytes_for(128) + 8 * 8 * 128 * 4 == 160 * 1024
    assert (
        "-DPERSISTENT=1" in inst.defines()
        and "-DPERSISTENT=1" not in decode_cuda.Instance(4, 128, 8, 8, True, 3).defines()
    )


@gpu_only
def test_prepare_loads_the_decode_instance():
    """`ops.paged_attention` calls `prepare` on prefill steps, so decode graphs never compile or load."""
    q = torch.randn(3, 8, 128, dtype=torch.bfloat16, device="cuda")
    cache = torch.zeros(4, 2, 16, 32, dtype=torch.uint8, device="cuda")
    kcb = torch.zeros(32, 256, 8, dtype=torch.bfloat16, device="cuda")
    cs = build_cos_sin_cache(128, 64).cuda()
    decode_cuda._function.cache_clear()
    decode_cuda.prepare(q, cache, kcb, kcb, cs)
    assert decode_cuda._function.cache_info().currsize == 1


def test_missing_toolchain_warns_once_and_falls_back(monkeypatch, caplog):
    """Without cuda-bindings the dispatch says so once and takes the Triton kernel."""
    import sys

    cuda_build.toolchain_available.cache_clear()
    monkeypatch.setitem(sys.modules, "cuda.bindings", None)  # import fails as if not installed
    try:
        with caplog.at_level("WARNING", logger="vllm_cq"):
            assert not cuda_build.toolchain_available()
            assert not cuda_build.toolchain_available()
        assert sum("Triton kernel" in r.getMessage() for r in caplog.records) == 1
    finally:
        cuda_build.toolchain_available.cache_clear()


def test_kernels_run_only_where_the_device_fits_them(monkeypatch):
    """sm_80+ and the kernel's shared memory within the device's opt-in limit, else the Triton kernels
    (without this an A10 or L40S, 99 KB per CTA, failed at the first launch of the 128 KB decode kernel)."""
    # H100/H200, A100, L40S (sm_89), T4 (sm_75): compute capability and opt-in bytes per CTA
    devices = {0: ((9, 0), 232448), 1: ((8, 0), 166912), 2: ((8, 9), 101376), 3: ((7, 5), 65536)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: devices[i][0])
    monkeypatch.setattr(cuda_build, "max_smem_optin", lambda i: devices[i][1])

    def fits(smem: int) -> list[bool]:
        return [cuda_build.device_fits(i, smem) for i in devices]

    assert decode_cuda.smem_bytes_for(128) == 128 * 1024 and decode_cuda.smem_bytes_for(64) == 64 * 1024
    assert fits(decode_cuda.smem_bytes_for(128)) == [True, True, False, False]
    assert fits(decode_cuda.smem_bytes_for(64)) == [True, True, True, False]
    assert prefill_cuda.smem_bytes_for(128, True) == 230400  # 225 KB: Hopper only
    assert fits(prefill_cuda.smem_bytes_for(128, True)) == [True, False, False, False]
    assert fits(prefill_cuda.smem_bytes_for(64, True)) == [True, True, False, False]
    assert fits(prefill_cuda.smem_bytes_for(64, False)) == [True, True, True, False]


@pytest.mark.parametrize("fmt_name", ["cq1", "cq4"])
def test_compiles_for_sm80(fmt_name):
    """The A100 (sm_80) fits the decode kernel (`test_kernels_run_only_where_the_device_fits_them`) and
    the mma.sync prefill kernel at head_dim 64: both build for it without spills (not yet run on one)."""
    ck, cv = centroid_dims(fmt_name)
    builds = [
        decode_cuda.compile_cubin(
            decode_cuda.Instance(4, 128, ck, cv, True, decode_cuda.DEFAULT_ROPE_MODE), "sm_80", True
        ),
        prefill_cuda.compile_cubin(prefill_cuda.Instance(4, 64, ck, cv, True, True, False), "sm_80", True),
    ]
    for cubin, log in builds:
        assert cubin[:4] == b"\x7fELF"
        rep = cuda_build.ptxas_report(log)
        if rep["registers"] < 0:
            pytest.skip("this NVRTC prints no ptxas report")
        assert rep["spill_bytes"] == 0, log


def test_covers_decides_from_the_configuration_alone(monkeypatch):
    """`covers` (the backend's choice of full CUDA graphs) agrees with what `supports` takes: 8-bit CQ
    codes without key norms, bf16/fp16, GQA <= 8, RoPE over the whole head, a device that fits, the
    kernel not turned off; everything else runs the Triton kernel, which stays out of full graphs."""
    monkeypatch.delenv("VLLM_CQ_DECODE_KERNEL", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(cuda_build, "toolchain_available", lambda: True)
    fits = {"ok": True}
    monkeypatch.setattr(cuda_build, "device_fits", lambda i, smem: fits["ok"] and smem <= 128 * 1024)

    def covers(name: str, group: int = 4, d: int = 128, dtype=torch.bfloat16, whole: bool = True, bs: int = 16):
        return decode_cuda.covers(get_format(name), group, d, dtype, whole, bs)

    assert all(covers(n) for n in ("cq1", "cq2", "cq4", "cq_k4v1", "cq_k4v2", "cq_k4v05"))
    assert covers("cq1", group=8) and covers("cq1", dtype=torch.float16) and covers("cq2", d=64)
    assert not covers("cq2n")  # key norms: Triton
    assert not any(covers(n) for n in ("kvtq", "kvtq1"))
    assert not covers("cq1", group=16) and not covers("cq1", dtype=torch.float32)
    assert not covers("cq1", whole=False)  # partial rotary
    assert not covers("cq1", d=256)  # 256 KB of codebooks: no device fits them
    assert covers("cq1", bs=256) and not covers("cq1", bs=24) and not covers("cq1", bs=8)  # page sizes
    monkeypatch.setenv("VLLM_CQ_DECODE_KERNEL", "triton")
    assert not covers("cq1")
    monkeypatch.delenv("VLLM_CQ_DECODE_KERNEL")
    fits["ok"] = False
    assert not covers("cq1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    fits["ok"] = True
    assert not covers("cq1")


def test_a_triton_decode_step_is_never_captured(monkeypatch):
    """Inside a CUDA graph capture, a decode step that the CUDA kernel does not take is an error (the
    Triton decode kernel is not verified in full graphs); prefill-shaped steps and steps outside a
    capture pass through."""
    from types import SimpleNamespace

    from vllm_cq.kernels.cq import ops

    capturing = {"on": True}
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing["on"])
    q = SimpleNamespace(is_cuda=True)
    with pytest.raises(RuntimeError, match="VLLM_CQ_FULL_CUDA_GRAPHS=0"):
        ops.refuse_triton_decode_capture(q, 1)
    ops.refuse_triton_decode_capture(q, 7)  # prefill / mixed steps run between piecewise graphs
    ops.refuse_triton_decode_capture(SimpleNamespace(is_cuda=False), 1)
    capturing["on"] = False
    ops.refuse_triton_decode_capture(q, 1)
