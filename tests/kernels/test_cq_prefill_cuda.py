"""The CUDA prefill kernel with shared-memory codebooks (`kernels/cq/prefill_cuda.cu`).

On a CPU machine: every instance compiles with NVRTC for sm_90 without register spills, and so do the
wgmma form (`prefill_wgmma.cu`) and the warp-specialized ws and wso forms (`prefill_ws.cu`, a few producer spills
allowed) for sm_90a. On a GPU (the wgmma variant on sm_90 only): the
kernel against the torch reference on randomized prefill and chunked-prefill batches (page
boundaries, odd lengths, GQA ratios, several sequences, keys with and without RoPE, the recent window,
half precision), and vLLM's mixed steps through `ops.paged_attention` (leading decodes to the decode
kernel, the rest here). Passed on an H200 on 2026-12-03."""

from __future__ import annotations

import random

import pytest
import torch

from tests.kernels.test_cq_decode_cuda import FORMATS, centroid_dims, checked_error, make_case, window_case
from vllm_cq.formats import get_format
from vllm_cq.kernels.cq import cuda_build, decode_cuda, ops, prefill_cuda

pytest.importorskip("cuda.bindings")
GPU = torch.cuda.is_available()
gpu_only = pytest.mark.skipif(not GPU, reason="runs the kernel: needs a GPU")


def instances() -> list[prefill_cuda.Instance]:
    out = []
    for name in FORMATS:
        ck, cv = centroid_dims(name)
        for d in (64, 128):
            for g in (1, 4, 8, 16):
                if prefill_cuda.shape_ok(g, d, ck, cv):
                    out.append(prefill_cuda.Instance(g, d, ck, cv, True, True, False))
    ck, cv = centroid_dims("cq1")
    out += [prefill_cuda.Instance(3, 128, ck, cv, bf16, rope, win) for bf16 in (True, False) for rope in (True, False)
            for win in (True, False)]  # fmt: skip
    # the page layout as constants (the VLLM_CQ_LAYOUT_CONSTANTS build): Llama's pages of 16, wider ones
    out += [prefill_cuda.Instance(4, 128, *centroid_dims(n), True, True, False, get_format(n).slot_bytes(128), ps)
            for n in ("cq1", "cq4", "cq_k4v1") for ps in (16, 64)]  # fmt: skip
    return list(dict.fromkeys(out))


SM90 = GPU and torch.cuda.get_device_capability(0) == (9, 0)
# the mma.sync kernel everywhere; its wgmma form (sm_90a) and the warp-specialized forms (ws, what "cuda"
# runs there, and the opt-in wso) on H100/H200 only
SM90_ONLY = pytest.mark.skipif(not SM90, reason="needs an sm_90 GPU")
KERNELS = ["mma", *(pytest.param(f, marks=SM90_ONLY) for f in ("wgmma", "ws", "wso", "wsp"))]


@pytest.mark.parametrize("form", ["mma", "wgmma", "ws", "wso", "wsp"])
@pytest.mark.parametrize("inst", instances(), ids=str)
def test_compiles_for_sm90_without_spills(inst, form):
    if form in prefill_cuda.WS_FORMS and inst.ck > 8:
        pytest.skip("the ws form stages key centroids of at most 8 channels (form_chosen)")
    hopper = form != "mma"  # wgmma and setmaxnreg: sm_90a
    cubin, log = prefill_cuda.compile_cubin(inst, "sm_90a" if hopper else "sm_90", verbose=True, form=form)
    assert cubin[:4] == b"\x7fELF"
    rep = cuda_build.ptxas_report(log)
    if rep["registers"] < 0 and GPU and (SM90 or not hopper):  # NVRTC 13.0 prints no ptxas report: ask the driver
        rep = cuda_build.resource_usage(prefill_cuda.load(inst, 0, form)[1])
    if rep["registers"] < 0 and GPU and hopper and not SM90:
        pytest.skip("no ptxas report and no sm_90 device to load a Hopper form on")
    # the ws form's producer (72 registers) spills a few values at head_dim 128 (cq1 8 bytes, cq4 92, at
    # most 132; its consumers none, read in the SASS on 2026-12-03); every other form none
    spill_limit = 160 if form in prefill_cuda.WS_FORMS else 0
    assert 0 < rep["registers"] <= 255 and rep["spill_bytes"] <= spill_limit, (inst, rep, log)
    assert "serialized" not in log, log  # ptxas serializes wgmma it cannot overlap safely
    assert "ignored" not in log, log  # e.g. setmaxnreg ignored (C7508): the ws form's register split lost


def test_shape_coverage():
    """Every 8-bit format at Llama-3.1-8B's shape; head_dim 64 too; GQA groups up to 16 rows per token."""
    assert all(prefill_cuda.shape_ok(4, 128, *centroid_dims(name)) for name in FORMATS)
    assert all(prefill_cuda.shape_ok(g, 64, 8, 8) for g in range(1, 17))
    assert not prefill_cuda.shape_ok(4, 256, 8, 8), "head_dim 256: codebooks and tiles exceed shared memory"
    assert not prefill_cuda.shape_ok(17, 128, 8, 8)


def random_prefill_batch(seed: int, max_len: int = 300) -> list[tuple[int, int]]:
    """(seq_len, q_len): whole prefills and chunks after earlier context, page edges, odd lengths."""
    rng = random.Random(seed)
    seqs = [(1, 1), (16, 16), (17, 5), (rng.randint(2, max_len) | 1, 0), (16 * rng.randint(2, max_len // 16), 0)]
    seqs = [(L, q or rng.randint(1, L)) for L, q in seqs]
    rng.shuffle(seqs)
    return seqs[: rng.randint(2, len(seqs))]


@gpu_only
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("specialize", [True, False])
@pytest.mark.parametrize("fmt_name, bs, slot_pad", [("cq1", 32, 8), ("cq4", 64, 0), ("cq_k4v1", 16, 16)])
def test_page_layouts(fmt_name, bs, slot_pad, specialize, kernel, monkeypatch):
    """Pages of 16-64 tokens and token strides wider than a slot, with the layout compiled in as constants
    (cuda_build.SPECIALIZE_LAYOUT, the default) or read from the arguments."""
    monkeypatch.setattr(cuda_build, "SPECIALIZE_LAYOUT", specialize)
    seqs = random_prefill_batch(5)
    args, want = make_case(fmt_name, seqs, 2, 4, 128, torch.bfloat16, True, bs, slot_pad)
    assert checked_error(prefill_cuda.paged_attention(*args, choice=kernel), want) < 2e-2, seqs


@gpu_only
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize(
    "fmt_name, hkv, ratio, d, rope",
    [("cq1", 2, 4, 128, True), ("cq1", 3, 1, 64, True), ("cq2", 1, 8, 128, True), ("cq_k4v1", 2, 3, 128, True),
     ("cq_k4v2", 2, 2, 64, False), ("cq_k4v05", 2, 4, 128, True), ("cq4", 1, 16, 128, True)],
)  # fmt: skip
def test_prefill_matches_reference(seed, fmt_name, hkv, ratio, d, rope, kernel):
    seqs = random_prefill_batch(seed)
    args, want = make_case(fmt_name, seqs, hkv, ratio, d, torch.bfloat16, rope)
    assert checked_error(prefill_cuda.paged_attention(*args, choice=kernel), want) < 2e-2, seqs


@gpu_only
@pytest.mark.parametrize("kernel", KERNELS)
def test_full_size_half_precision(kernel):
    """Llama-3.1-8B's head shape, thousands of tokens: whole prompts and long chunks, bf16 and fp16."""
    rng = random.Random(7)
    seqs = [(rng.randint(300, 3000), rng.randint(1, 300)) for _ in range(4)] + [(2048, 2048)]
    for dtype in (torch.bfloat16, torch.float16):
        args, want = make_case("cq1", seqs, 8, 4, 128, dtype, True)
        assert checked_error(prefill_cuda.paged_attention(*args, choice=kernel), want) < 2e-2, dtype


@gpu_only
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("W", [1, 16, 35, 10**6])
def test_window_merge_matches_reference(monkeypatch, W, kernel):
    """Chunked prefill with the recent window: partials of the codes merged with the exact window."""
    args, kw, want = window_case(monkeypatch, W, "chunked")
    assert checked_error(prefill_cuda.paged_attention(*args, **kw, choice=kernel), want) < 2e-2


def test_kernel_choice(monkeypatch):
    """Which form runs: on sm_90 WS_DEFAULT by default and for "cuda" (None: wgmma), each form when asked
    (key centroids of at most 8 channels, else wgmma), mma.sync for "mma" and on every other GPU;
    "triton" none of them; an unknown name is refused."""
    monkeypatch.delenv(prefill_cuda.ENV, raising=False)
    assert prefill_cuda.WS_DEFAULT in prefill_cuda.WS_FORMS
    for ws_default in (None, "ws", "wsp"):
        monkeypatch.setattr(prefill_cuda, "WS_DEFAULT", ws_default)
        for cap in ((9, 0), (8, 0), (10, 0)):
            monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i, cap=cap: cap)
            ws, wgmma = ("ws", "wgmma") if cap == (9, 0) else ("mma", "mma")
            default = (ws_default or "wgmma") if cap == (9, 0) else "mma"
            wso, wsp = ("wso", "wsp") if cap == (9, 0) else ("mma", "mma")
            choices = (None, "cuda", "wgmma", "mma", "ws", "wso", "wsp")
            forms = {c: prefill_cuda.form_chosen(c, 0, 8) for c in choices}
            want = {None: default, "cuda": default, "wgmma": wgmma, "mma": "mma", "ws": ws, "wso": wso, "wsp": wsp}
            assert forms == want
            wide = {c: prefill_cuda.form_chosen(c, 0, 16) for c in (None, "cuda", "wgmma", "ws", "wso", "wsp")}
            assert wide == dict.fromkeys((None, "cuda", "wgmma", "ws", "wso", "wsp"), wgmma)
    monkeypatch.setattr(prefill_cuda, "WS_DEFAULT", None)
    monkeypatch.setenv(prefill_cuda.ENV, "mma")
    assert prefill_cuda.enabled() and prefill_cuda.form_chosen(None, 0, 8) == "mma"
    assert not prefill_cuda.enabled("triton") and prefill_cuda.enabled("wgmma") and prefill_cuda.enabled("ws")
    with pytest.raises(ValueError, match="VLLM_CQ_PREFILL_KERNEL='hopper'"):
        prefill_cuda.enabled("hopper")


def spy(monkeypatch, module, name) -> list:
    """Record the calls of `module.name` (still calling it)."""
    calls, real = [], getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def mixed_ops_call(monkeypatch, args, num_decodes, kernel="cuda", **kw) -> tuple[torch.Tensor, list, list]:
    """ops.paged_attention on the CUDA kernels' positional arguments, counting each kernel's calls."""
    q, cache, kcb, vcb, _, table, seq_lens, qsl, scale, cs = args
    dec = spy(monkeypatch, decode_cuda, "paged_attention")
    pre = spy(monkeypatch, prefill_cuda, "paged_attention")
    max_q = int((qsl[1:] - qsl[:-1]).max())
    out = ops.paged_attention(
        q, cache, kcb, vcb, get_format("cq1"), table, seq_lens, qsl, scale, cs, True, max_q,
        decode_kernel="cuda", prefill_kernel=kernel, num_decodes=num_decodes, **kw,
    )  # fmt: skip
    return out, dec, pre


@gpu_only
@pytest.mark.parametrize("kernel", KERNELS)
def test_mixed_step_takes_both_kernels(monkeypatch, kernel):
    """A vLLM mixed step (sequences with one new token first, then prefill chunks): the decodes through
    the decode kernel, the rest through this one, one answer matching the reference."""
    rng = random.Random(5)
    seqs = [(rng.randint(1, 400), 1) for _ in range(5)] + [(300, 300), (777, 129), (64, 3), (1, 1)]
    args, want = make_case("cq1", seqs, 2, 4, 128, torch.bfloat16, True)
    out, dec, pre = mixed_ops_call(monkeypatch, args, 5, kernel)
    assert dec and pre, "both kernels"
    assert checked_error(out, want) < 2e-2


@gpu_only
@pytest.mark.parametrize("W", [1, 16, 35])
def test_mixed_step_with_the_window(monkeypatch, W):
    """The same split with the recent window: each part merges the window of its own sequences."""
    args, kw, want = window_case(monkeypatch, W, "mixed")
    out, dec, pre = mixed_ops_call(monkeypatch, args, 4, **kw)
    assert dec and pre, "both kernels"
    assert checked_error(out, want) < 2e-2
