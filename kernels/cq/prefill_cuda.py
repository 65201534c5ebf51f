"""Prefill and chunked-prefill attention over CQ codes with shared-memory codebooks: the CUDA kernel
`prefill_cuda.cu` (FlashAttention-2 shape with a per-tile dequantization stage), built and launched
like the decode kernel (`cuda_build.py`).

Status: verified against the reference on an H200 (2026-12-03, `tests/kernels/test_cq_prefill_cuda.py`)
and the default for prefill steps on CUDA where it covers the shape (`supports`);
`VLLM_CQ_PREFILL_KERNEL=triton` (or `ops.paged_attention(prefill_kernel="triton")`) takes the Triton
kernel (`attention.py`) instead.

Its Hopper forms (compiled for sm_90a, the same staging and softmax from `prefill_common.cuh`, products
by wgmma): `prefill_wgmma.cu` (every warp stages, then computes) and the warp-specialized `prefill_ws.cu`
(two producer warpgroups stage tiles behind mbarriers, two consumer warpgroups compute). Both passed every
prefill kernel test on an H200 (2026-12-03: 376 with the decode kernel's in the ninth session, 458 in the
tenth). ws is the default on sm_90 since the tenth session (where key centroids have at most 8 channels,
else wgmma): 20-24% faster per launch (8K causal cq1 1.90 vs 2.51 ms, cq4 2.41 vs 2.79), and end to end
cq1 128 x (4096+512) 2,711 output tok/s against wgmma's 2,671, back to back in one window after two
profiled engines had compiled the Triton kernels. The ninth session's e2e had ws behind (2,167 vs 2,244),
but there ws ran as the window's first engine (cold compiles), and its full-CUDA-graph test failure was
the test's float32 model, which the CUDA decode kernel does not take (not the prefill form).
`VLLM_CQ_PREFILL_KERNEL=wgmma` keeps the wgmma form, `=mma` the `mma.sync` kernel, which every other CUDA
GPU runs.
`VLLM_CQ_PREFILL_KERNEL=wso` runs the ws form with FlashAttention-3's intra-warpgroup pipelining (the next
tile's scores issued before the current P V, `WS_OVERLAP`): it passes the same tests on the H200 but is
slower than ws (8K causal cq1 2.28 vs 1.90 ms, cq4 2.74 vs 2.41; 2026-12-03, tenth session), so it stays
opt-in for experiments.
`VLLM_CQ_PREFILL_KERNEL=wsp` runs the ws form with pre-packed RoPE (`ROPE_PACKED`): the producers read each
key's cos/sin words in the model dtype from `decode_cuda.packed_rope`'s table and rotate on packed pairs
as the decode kernel does (its default RoPE mode 3), instead of fp32 rotations from the tile start's row
and a per-thread rotation table. The producers' staging bounds this kernel (ncu, eighth session), and the
same change cut the decode kernel's loop by 17%. Written 2026-12-03 (eleventh session) after that
window: it compiles for sm_90a and is CPU-checked, not yet run on a GPU, so it stays opt-in.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch

from vllm_cq.kernels.cq import cuda_build, decode_cuda
from vllm_cq.kernels.varlen import plan_launch
from vllm_cq.kernels.window import WindowCache

SOURCE = "prefill_cuda.cu"
LOG2E = 1.4426950408889634
NUM_WARPS, ROWS, BLOCK_N = 8, 128, 64  # prefill_common.cuh's NW, NW * 16, BN
VERIFIED_ON_GPU = True
# The Hopper forms, verified on an H200 (2026-12-03): the warp-specialized form WS_DEFAULT is the default on
# sm_90 ("cuda" or no choice) where it applies, else wgmma; "wgmma" / "mma" / "ws" ask for those kernels.
# wsp since 2026-12-04 (H200, twelfth session, ms at 8K x 8K causal, ws -> wsp: cq1 1.905 -> 1.667, cq2
# 1.983 -> 1.713, cq4 2.403 -> 1.876; e2e cq1 128 x (4096+512) 2,856 -> 2,875 out tok/s, 96 x (8192+256)
# 850 -> 862); None: wgmma.
WGMMA_VERIFIED_ON_GPU = True
WS_DEFAULT: str | None = "wsp"
ENV = "VLLM_CQ_PREFILL_KERNEL"
VARIANTS = ("wgmma", "mma", "ws", "wso", "wsp")
# form -> (source, kernel, arch suffix, threads per CTA, extra -D macros). "wso": the ws form with the
# next tile's scores issued before the current P V (WS_OVERLAP); verified, slower than ws (module note)
FORMS = {
    "mma": (SOURCE, "cq_prefill_kernel", "", NUM_WARPS * 32, ()),
    "wgmma": ("prefill_wgmma.cu", "cq_prefill_wgmma_kernel", "a", NUM_WARPS * 32, ()),
    "ws": ("prefill_ws.cu", "cq_prefill_ws_kernel", "a", 2 * NUM_WARPS * 32, ()),  # + two producer warpgroups
    "wso": ("prefill_ws.cu", "cq_prefill_ws_kernel", "a", 2 * NUM_WARPS * 32, ("-DWS_OVERLAP=1",)),
    "wsp": ("prefill_ws.cu", "cq_prefill_ws_kernel", "a", 2 * NUM_WARPS * 32, ("-DROPE_PACKED=1",)),
}
WS_FORMS = ("ws", "wso", "wsp")  # warp-specialized: key centroids of at most 8 channels
PACKED_ROPE_FORMS = ("wsp",)  # `cos_sin` is decode_cuda.packed_rope's table


@dataclass(frozen=True)
class Instance:
    """One compiled specialization (the -D macros of prefill_cuda.cu)."""

    group: int
    head_dim: int
    ck: int
    cv: int
    bf16: bool
    has_rope: bool
    window_partials: bool
    slot_bytes: int = 0  # > 0: the cache's bytes per token slot (its stride over tokens), a constant
    page_size: int = 0  # > 0: tokens per page (a power of two), a constant

    def defines(self) -> list[str]:
        return [
            f"-DG={self.group}",
            f"-DHEAD_DIM={self.head_dim}",
            f"-DCK={self.ck}",
            f"-DCV={self.cv}",
            f"-DHAS_ROPE={int(self.has_rope)}",
            f"-DIS_BF16={int(self.bf16)}",
            f"-DWINDOW_PARTIALS={int(self.window_partials)}",
            *cuda_build.layout_defines(self.slot_bytes, self.page_size),
        ]

    @property
    def block_q(self) -> int:
        """Query tokens per CTA."""
        return ROWS // self.group

    def smem_bytes(self) -> int:
        return smem_bytes_for(self.head_dim, self.has_rope)


def smem_bytes_for(head_dim: int, has_rope: bool) -> int:
    """Both codebooks of one KV head and two key and value tiles in the model dtype; with RoPE also each
    thread's pure rotations (fp32) and two tile-start cos/sin rows (227 KB at head_dim 128)."""
    size = 2 * head_dim * 256 * 2 + 4 * BLOCK_N * head_dim * 2
    if has_rope:
        size += (head_dim // 8) * 2 * 4 * NUM_WARPS * 32 + 2 * head_dim * 4
    return size


def shape_ok(group: int, head_dim: int, ck: int, cv: int) -> bool:
    """Shapes prefill_cuda.cu covers (its #error line; head_dim 64 or 128 for the swizzle and smem)."""
    return (
        1 <= group <= 16
        and head_dim in (64, 128)
        and (head_dim // 8) % ck == 0
        and ck % 2 == 0
        and (ck in (2, 4) or ck % 8 == 0)
        and (head_dim // 4) % cv == 0
        and cv % 2 == 0
        and (cv in (2, 4) or cv % 8 == 0)
    )


def enabled(choice: str | None = None) -> bool:
    """`choice` (else VLLM_CQ_PREFILL_KERNEL) "cuda", a form (`VARIANTS`) or "triton"; none: this
    kernel once verified."""
    return cuda_build.kernel_chosen(ENV, choice, VERIFIED_ON_GPU, VARIANTS)


def form_chosen(choice: str | None, device_index: int, ck: int) -> str:
    """Which form of the kernel runs. On sm_90: WS_DEFAULT ("wsp") by default and for "cuda" (none:
    "wgmma"), "ws" / "wso" / "wsp" when asked, each where key centroids have at most 8 channels (their staging's
    limit, else wgmma); "wgmma" and "mma" when asked. Every other GPU: "mma"."""
    choice = cuda_build.kernel_choice(ENV, choice, VARIANTS)
    if torch.cuda.get_device_capability(device_index) != (9, 0) or choice == "mma":
        return "mma"
    if choice in WS_FORMS and ck <= 8:
        return choice
    if choice != "wgmma" and ck <= 8 and WS_DEFAULT:
        return WS_DEFAULT
    return "wgmma" if choice in ("wgmma", *WS_FORMS) or WGMMA_VERIFIED_ON_GPU else "mma"


def supports(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    k_codebook: torch.Tensor,
    v_codebook: torch.Tensor,
    cos_sin_cache: torch.Tensor | None,
    is_neox: bool,
    key_bytes: int,
    key_norm_offset: int,
    choice: str | None = None,
    block_table: torch.Tensor | None = None,
) -> bool:
    """Whether `paged_attention` can take this prefill call (else: the Triton kernel)."""
    if not (query.is_cuda and enabled(choice) and cuda_build.toolchain_available()):
        return False
    args = (query, kv_cache, k_codebook, v_codebook, cos_sin_cache, is_neox, key_bytes, key_norm_offset)
    if not decode_cuda.inputs_ok(*args, block_table, min_rope_rows=BLOCK_N):
        return False
    if not shape_ok(query.shape[1] // kv_cache.shape[1], query.shape[2], k_codebook.shape[2], v_codebook.shape[2]):
        return False
    smem = smem_bytes_for(query.shape[2], cos_sin_cache is not None)
    return cuda_build.device_fits(cuda_build.device_index(query), smem)


def defines(inst: Instance, form: str) -> tuple[str, ...]:
    """`inst`'s -D macros in one form. A packed-RoPE form of keys without RoPE is the ws build itself:
    its macro changes nothing there (the cubins are byte-identical), so one compile and one module."""
    extra = FORMS[form][4] if inst.has_rope or form not in PACKED_ROPE_FORMS else ()
    return (*inst.defines(), *extra)


def compile_cubin(inst: Instance, arch: str, verbose: bool = False, form: str = "mma") -> tuple[bytes, str]:
    """NVRTC: one form's source (`FORMS`; the Hopper forms for sm_90a) for `inst` -> (cubin for `arch`, the
    log). No GPU needed."""
    return cuda_build.compile_cubin(FORMS[form][0], list(defines(inst, form)), arch, verbose)


def load(inst: Instance, device_index: int, form: str = "mma"):
    """The compiled, loaded kernel (module, CUfunction) of one form for `inst` on a device."""
    source, kernel, suffix, _, _ = FORMS[form]
    return cuda_build.load(source, defines(inst, form), kernel, inst.smem_bytes(), device_index, suffix)


def paged_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    k_codebook: torch.Tensor,
    v_codebook: torch.Tensor,
    key_bytes: int,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    cos_sin_cache: torch.Tensor | None,
    out: torch.Tensor | None = None,
    window: WindowCache | None = None,
    choice: str | None = None,
) -> torch.Tensor:
    """Causal attention of a varlen batch (sequence s owns queries query_start_loc[s]:[s+1], its last
    tokens) over its codes, into `out` [T, Hq, D] (new in query's dtype when None); with a recent
    `window`, the codes cover keys j <= i - W and `window_triton` merges the exact window in. `choice`
    "wgmma", "mma", "ws", "wso" or "wsp" picks a form (`form_chosen`)."""
    t, hq, d = query.shape
    hkv = kv_cache.shape[1]
    num_seqs = seq_lens.shape[0]
    if out is None:
        out = torch.empty_like(query)
    if t == 0 or num_seqs == 0:
        return out
    inst = Instance(
        hq // hkv, d, k_codebook.shape[2], v_codebook.shape[2], query.dtype == torch.bfloat16,
        cos_sin_cache is not None, window is not None, *cuda_build.layout_of(kv_cache),
    )  # fmt: skip
    cuda_build.check_index_dtypes(block_table, seq_lens, query_start_loc)
    assert cos_sin_cache is None or cos_sin_cache.shape[0] >= BLOCK_N, "the tile offsets' rotations: rows 0 .. 63"
    assert out.stride(2) == 1 and out.stride(0) % 2 == 0 and out.stride(1) % 2 == 0
    dev = query.device
    if window is not None:  # one segment of partials (any prefill step's tiling for the window merge)
        plan = plan_launch(query, out, hkv, num_seqs, 2, 1, partials=True)
        target, ml = plan.target, plan.ml
    else:
        target, ml = out, out
    dev_index = cuda_build.device_index(query)
    form = form_chosen(choice, dev_index, inst.ck)
    _, func = load(inst, dev_index, form)
    cs = cos_sin_cache if cos_sin_cache is not None else query
    if cos_sin_cache is not None and form in PACKED_ROPE_FORMS:
        cs = decode_cuda.packed_rope(cos_sin_cache, query.dtype)
    args = [
        *cuda_build.pointers(
            query, target, ml, kv_cache, k_codebook, v_codebook, block_table, seq_lens, query_start_loc, cs
        ),
        ctypes.c_int32(num_seqs),
        ctypes.c_int64(query.stride(0)),
        ctypes.c_int64(query.stride(1)),
        ctypes.c_int64(out.stride(0)),
        ctypes.c_int64(out.stride(1)),
        ctypes.c_int64(kv_cache.stride(0)),
        ctypes.c_int64(kv_cache.stride(1)),
        ctypes.c_int64(kv_cache.stride(2)),
        ctypes.c_int64(block_table.stride(0)),
        ctypes.c_int64(cs.stride(0) if cos_sin_cache is not None else 0),
        ctypes.c_float(float(scale) * LOG2E),
        ctypes.c_int32(kv_cache.shape[2]),
        ctypes.c_int32(key_bytes),
        ctypes.c_int32(window.W if window is not None else 0),
    ]
    grid = (t // inst.block_q + num_seqs, hkv, 1)
    cuda_build.launch(func, grid, FORMS[form][3], inst.smem_bytes(), dev, args)
    if window is None:
        return out
    from vllm_cq.kernels.window_triton import attend_window_and_merge

    return attend_window_and_merge(query, out, plan, window, seq_lens, query_start_loc, scale)
