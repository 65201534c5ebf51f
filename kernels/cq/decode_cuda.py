"""Decode attention over CQ codes with shared-memory codebooks: the CUDA kernel `decode_cuda.cu`,
compiled at first use by NVRTC and launched through the CUDA driver API (`cuda-bindings`) on torch's
current stream, so it is captured by vLLM's CUDA graphs like any other launch.

Why CUDA and not Triton: the kernel needs to index shared memory (one 16-byte centroid load per code
group per key); Triton 3.6, the one vLLM 0.26's torch pins, cannot express that
(`docs/design/smem-codebook-decode.md`). The Triton kernel (`attention.py`) stays the portable path and
the fallback; the torch reference (`naive.py`) is the oracle both are tested against.

Scope: decode-only steps (one new token per sequence), 8-bit codes, bfloat16/float16 models, NeoX RoPE
over the whole head or keys without RoPE, GQA groups of <= 8 query heads. Everything else takes the
Triton kernel (`supports` says which).
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import os
import weakref
from dataclasses import dataclass

import torch

from vllm_cq.formats import CQSpec, KVFormat
from vllm_cq.kernels.cq import cuda_build
from vllm_cq.kernels.varlen import LaunchPlan, merge_segments, plan_launch
from vllm_cq.kernels.window import WindowCache

SOURCE = "decode_cuda.cu"
LOG2E = 1.4426950408889634
NUM_WARPS = 8
# 0: keys without RoPE; 1: cos/sin rows read per step; 2: rows advanced by a 16-position rotation;
# 3: each key's cos/sin words read ready-packed in the model dtype a step ahead (`packed_rope`).
# H200, cq1 64 x 32K (2026-12-02): mode 2 1.45 ms, mode 1 1.54; with UNROLL 3 1.37 and 1.49. Mode 3
# drops mode 2's 64 FMAs, 8 shared loads and 16 conversions per 16-key step for 4 L2-resident 16-byte
# loads (416 vs 499 SASS instructions per step). H200, 2026-12-03 (eleventh session), mode 2 -> 3:
# cq1 64 x 32K 1.299 -> 1.216 ms, 128 x 4K 0.383 -> 0.362; cq4 64 x 32K 1.781 -> 1.708; e2e cq1
# 128 x (4096+512) 2,729 -> 2,828 out tok/s. The default where head_dim % 32 == 0 (each thread's
# words whole 16-byte vectors), else mode 2.
ROPE_TABLE, ROPE_RECURRENCE, ROPE_PACKED = 1, 2, 3
DEFAULT_ROPE_MODE = ROPE_PACKED
ROPE_ENV = "VLLM_CQ_DECODE_ROPE_MODE"  # 1 / 2 / 3 overrides the default for keys with RoPE (an e2e A/B)


def default_rope_mode(head_dim: int) -> int:
    """The RoPE mode of keys with RoPE: DEFAULT_ROPE_MODE, or VLLM_CQ_DECODE_ROPE_MODE; mode 3 only where
    each thread's words are whole 16-byte vectors (head_dim % 32 == 0), else mode 2."""
    choice = os.environ.get(ROPE_ENV, "")
    if choice not in ("", "1", "2", "3"):
        raise ValueError(f"{ROPE_ENV}={choice!r}: expected 1, 2 or 3")
    mode = int(choice) if choice else DEFAULT_ROPE_MODE
    return ROPE_RECURRENCE if mode == ROPE_PACKED and head_dim % 32 else mode


# One CTA per SM and KV head looping over its head's (sequence, segment) items, the codebooks staged once,
# instead of one CTA per item (decode_cuda.cu's PERSISTENT). Why: by the H200 rows of 2026-12-02/03, a
# wave of CTAs costs about 7 us beside its keys (staging 128 KB of codebooks, prologue, merge), 17% of a
# 128 x 4K step, and a 1K-context batch is mostly that. On by default since 2026-12-04 (H200): its kernel tests
# passed, with layout constants decode 128x4K cq1 0.358 -> 0.337 ms (s13a's rows; alone it was 2.5% slower at
# cq4 64x32K), and the tiny-model full-graph vLLM tests passed. VLLM_CQ_DECODE_PERSISTENT=0: one CTA per item.
PERSISTENT_ENV = "VLLM_CQ_DECODE_PERSISTENT"
PERSISTENT = os.environ.get(PERSISTENT_ENV, "1") == "1"

# Main-loop unroll: 3 drops the code pipeline's register copies; an instance that would spill with it
# (cq4 at head_dim 128 and one query head per KV head, 12 bytes) takes 1 (`Instance.fallback`).
DEFAULT_UNROLL = 3


@dataclass(frozen=True)
class Instance:
    """One compiled specialization (the -D macros of decode_cuda.cu)."""

    group: int  # query heads per KV head
    head_dim: int
    ck: int  # channels per key centroid
    cv: int  # channels per value centroid
    bf16: bool
    rope_mode: int
    num_warps: int = NUM_WARPS
    unroll: int = DEFAULT_UNROLL
    slot_bytes: int = 0  # > 0: the cache's bytes per token slot (its stride over tokens), a constant
    page_size: int = 0  # > 0: tokens per page (a power of two), a constant
    persistent: bool = False  # one CTA per SM and KV head over its items (PERSISTENT)

    def fallback(self) -> Instance | None:
        """What to use instead when this instance spills registers: no unrolling."""
        return dataclasses.replace(self, unroll=1) if self.unroll > 1 else None

    def defines(self) -> list[str]:
        return [
            f"-DG={self.group}",
            f"-DHEAD_DIM={self.head_dim}",
            f"-DCK={self.ck}",
            f"-DCV={self.cv}",
            f"-DNW={self.num_warps}",
            f"-DROPE_MODE={self.rope_mode}",
            f"-DIS_BF16={int(self.bf16)}",
            f"-DUNROLL={self.unroll}",
            *cuda_build.layout_defines(self.slot_bytes, self.page_size),
            *(["-DPERSISTENT=1"] if self.persistent else []),
        ]

    def smem_bytes(self) -> int:
        """The codebooks; persistent CTAs keep them, so the warps' merge gets its own [NW][8][D] floats."""
        return smem_bytes_for(self.head_dim) + (self.num_warps * 8 * self.head_dim * 4 if self.persistent else 0)


def smem_bytes_for(head_dim: int) -> int:
    """Dynamic shared memory: both codebooks of one KV head in the model dtype (128 KB at head_dim 128)."""
    return 2 * head_dim * 256 * 2


def shape_ok(group: int, head_dim: int, ck: int, cv: int) -> bool:
    """Shapes the kernel covers (decode_cuda.cu's #error line, and <= 227 KB of shared memory)."""
    half = head_dim // 2
    vdt = head_dim // 8
    vlen = min(vdt, cv)
    return (
        1 <= group <= 8
        and head_dim % 16 == 0
        and (half // 4) % ck == 0
        and ck % 2 == 0
        and cv % 2 == 0
        and head_dim % cv == 0
        and vdt % vlen == 0
        and (vlen in (2, 4) or vlen % 8 == 0)
        and (ck in (2, 4) or ck % 8 == 0)
        and 2 * head_dim * 512 <= 200 * 1024
    )


# The dispatch takes this kernel by default only once its GPU tests have passed (tests/kernels/
# test_cq_decode_cuda.py on the H200); VLLM_CQ_DECODE_KERNEL=cuda|triton overrides either way.
VERIFIED_ON_GPU = True


def enabled(choice: str | None = None) -> bool:
    """`choice` (else VLLM_CQ_DECODE_KERNEL) "cuda" or "triton" picks the decode kernel; neither: this one
    once verified."""
    return cuda_build.kernel_chosen("VLLM_CQ_DECODE_KERNEL", choice, VERIFIED_ON_GPU)


def inputs_ok(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    k_codebook: torch.Tensor,
    v_codebook: torch.Tensor,
    cos_sin_cache: torch.Tensor | None,
    is_neox: bool,
    key_bytes: int,
    key_norm_offset: int,
    block_table: torch.Tensor | None = None,
    min_rope_rows: int = 17,
) -> bool:
    """What the CUDA kernels (decode and prefill) need of their inputs: 8-bit codes without a stored
    norm, codebooks in the query's half-precision dtype, aligned 8-byte code slots in power-of-two pages
    of >= 16 tokens, channel pairs of the query readable as 32-bit words, NeoX RoPE over the whole head
    from a float32 cache of at least `min_rope_rows` rows (or none; the rows each kernel reads for its
    pure rotations: decode rows 8 and 16, prefill rows 0 .. 63). The centroid widths each kernel can take
    are its own `shape_ok`."""
    if kv_cache.dtype != torch.uint8 or (block_table is not None and block_table.dtype != torch.int32):
        return False
    t, hq, d = query.shape
    hkv = kv_cache.shape[1]
    gk, kk, ck = k_codebook.shape
    gv, kv, cv = v_codebook.shape
    if hq % hkv or kk != 256 or kv != 256 or key_norm_offset >= 0:
        return False
    if query.dtype not in (torch.bfloat16, torch.float16) or k_codebook.dtype != query.dtype:
        return False
    if v_codebook.dtype != query.dtype or not (k_codebook.is_contiguous() and v_codebook.is_contiguous()):
        return False
    if gk != hkv * d // ck or gv != hkv * d // cv:
        return False
    if query.stride(2) != 1 or kv_cache.stride(3) != 1 or kv_cache.data_ptr() % 16:
        return False
    if query.stride(0) % 2 or query.stride(1) % 2 or query.data_ptr() % 4:  # queries read as channel pairs
        return False
    bs = kv_cache.shape[2]
    if any(s % 8 for s in kv_cache.stride()[:3]) or key_bytes % 8 or bs % 16 or bs & (bs - 1):
        return False
    if cos_sin_cache is not None:
        if not is_neox or cos_sin_cache.shape[1] != d or cos_sin_cache.dtype != torch.float32:
            return False
        if cos_sin_cache.stride(1) != 1 or cos_sin_cache.stride(0) % 4 or cos_sin_cache.data_ptr() % 16:
            return False
        if cos_sin_cache.shape[0] < min_rope_rows:
            return False
    return True


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
    """Whether `paged_attention` can take this decode call (else: the Triton kernel)."""
    if not (query.is_cuda and enabled(choice) and cuda_build.toolchain_available()):
        return False
    args = (query, kv_cache, k_codebook, v_codebook, cos_sin_cache, is_neox, key_bytes, key_norm_offset)
    if not inputs_ok(*args, block_table):
        return False
    if not shape_ok(query.shape[1] // kv_cache.shape[1], query.shape[2], k_codebook.shape[2], v_codebook.shape[2]):
        return False
    return cuda_build.device_fits(cuda_build.device_index(query), smem_bytes_for(query.shape[2]))


def covers(
    fmt: KVFormat, group: int, head_dim: int, dtype: torch.dtype, rope_whole_head: bool, block_size: int
) -> bool:
    """`supports` from the model's configuration, before any tensor exists: whether every decode step of
    a model of this shape (GQA `group` per rank, NeoX RoPE over the whole head or none, pages of
    `block_size` tokens) takes this kernel on the current CUDA device. The backend asks it to choose full
    CUDA graphs."""
    key, value = fmt.key, fmt.value
    if not (isinstance(key, CQSpec) and isinstance(value, CQSpec)) or key.norm or not rope_whole_head:
        return False
    if block_size < 16 or block_size & (block_size - 1):
        return False
    if key.bits != 8 or value.bits != 8 or dtype not in (torch.bfloat16, torch.float16):
        return False
    if not (torch.cuda.is_available() and enabled() and cuda_build.toolchain_available()):
        return False
    if not shape_ok(group, head_dim, key.channels, value.channels):
        return False
    return cuda_build.device_fits(torch.cuda.current_device(), smem_bytes_for(head_dim))


def compile_cubin(inst: Instance, arch: str, verbose: bool = False) -> tuple[bytes, str]:
    """NVRTC: decode_cuda.cu for `inst` -> (cubin for `arch`, e.g. "sm_90", and the log). No GPU needed."""
    return cuda_build.compile_cubin(SOURCE, inst.defines(), arch, verbose)


def resource_usage(inst: Instance, device_index: int = 0) -> dict[str, int]:
    """Registers per thread and local (spill) bytes of `inst` as loaded on the device."""
    return cuda_build.resource_usage(_load(inst, device_index)[1])


def _load(inst: Instance, device_index: int):
    return cuda_build.load(SOURCE, tuple(inst.defines()), "cq_decode_kernel", inst.smem_bytes(), device_index)


@functools.cache
def _function(inst: Instance, device_index: int):
    """The (module, CUfunction) to launch for `inst`: its own build, or its fallback's where it spills."""
    module, func = _load(inst, device_index)
    if inst.fallback() is not None and cuda_build.resource_usage(func)["spill_bytes"] > 0:
        return _function(inst.fallback(), device_index)
    return module, func


def _instance(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    k_codebook: torch.Tensor,
    v_codebook: torch.Tensor,
    cos_sin_cache: torch.Tensor | None,
    rope_mode: int | None = None,
    num_warps: int = NUM_WARPS,
    unroll: int = DEFAULT_UNROLL,
    specialize: bool | None = None,
    persistent: bool | None = None,
) -> Instance:
    if rope_mode is None:
        rope_mode = default_rope_mode(query.shape[2]) if cos_sin_cache is not None else 0
    g = query.shape[1] // kv_cache.shape[1]
    bf16 = query.dtype == torch.bfloat16
    layout = cuda_build.layout_of(kv_cache, specialize)
    inst = Instance(
        g, query.shape[2], k_codebook.shape[2], v_codebook.shape[2], bf16, rope_mode, num_warps, unroll, *layout
    )
    if PERSISTENT if persistent is None else persistent:  # where its merge space fits beside the codebooks
        wide = dataclasses.replace(inst, persistent=True)
        if cuda_build.device_fits(cuda_build.device_index(query), wide.smem_bytes() + 4096):  # + static arrays
            return wide
    return inst


def prepare(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    k_codebook: torch.Tensor,
    v_codebook: torch.Tensor,
    cos_sin_cache: torch.Tensor | None,
) -> None:
    """Compile and load the instance a decode step of this shape will launch, outside any CUDA graph
    capture: vLLM captures decode graphs after its prefill-shaped profiling run, and loading a module
    while a stream captures is not allowed. `ops.paged_attention` calls this on prefill steps."""
    if not torch.cuda.is_current_stream_capturing():
        inst = _instance(query, kv_cache, k_codebook, v_codebook, cos_sin_cache)
        _function(inst, cuda_build.device_index(query))
        if inst.rope_mode == ROPE_PACKED:
            packed_rope(cos_sin_cache, query.dtype)


_PACKED_ROPE: dict[tuple, tuple[weakref.ref, int, torch.Tensor]] = {}


def packed_rope(cos_sin_cache: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """ROPE_MODE 3's table: int32 [rows, D / 2], row n = for each lane-quad member t: KSTEPS words of
    (cos, cos) pairs of its RoPE pairs [t * D / 8, (t + 1) * D / 8), then KSTEPS of (sin, sin), each
    word two `dtype` values, the lower index in the low half: the words `pack_rope` makes from the
    float32 rows (round to nearest), stored once: half the float32 cache's bytes (32 MB for Llama-3.1's
    131K rows). Built on first use per cache and dtype, never while a stream captures a CUDA graph
    (`prepare` builds it on prefill steps). An entry holds only a weak reference to its cache and the
    cache's version: a freed cache whose address another model's table reuses, or one changed in place
    (outside inference mode, whose tensors keep no version), is rebuilt, not served stale."""
    key = (cos_sin_cache.data_ptr(), tuple(cos_sin_cache.shape), cos_sin_cache.stride(0), dtype, cos_sin_cache.device)
    entry = _PACKED_ROPE.get(key)
    version = -1 if cos_sin_cache.is_inference() else cos_sin_cache._version  # inference tensors have none
    if entry is not None and entry[0]() is not None and entry[1] == version:
        return entry[2]
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        raise RuntimeError("decode_cuda.packed_rope: build the table before CUDA graph capture (prepare)")
    for k in [k for k, e in _PACKED_ROPE.items() if e[0]() is None]:  # caches freed since
        del _PACKED_ROPE[k]
    rows, d = cos_sin_cache.shape
    half = d // 2
    pairs = [cos_sin_cache[:, i * half : (i + 1) * half].to(dtype).reshape(rows, 4, half // 8, 2) for i in (0, 1)]
    table = torch.stack(pairs, dim=2).contiguous().view(torch.int32).reshape(rows, half)
    _PACKED_ROPE[key] = (weakref.ref(cos_sin_cache), version, table)
    return table


def num_segments_for(num_seqs: int, num_kv_heads: int, num_sms: int, persistent: bool = False) -> int:
    """Split-KV segments: at least two waves of one CTA per SM (the codebooks take most of an SM's shared
    memory), at most 16; every CTA stages 128 KB of codebooks, so no more CTAs than that. Persistent CTAs
    (one wave, `persistent_ctas` per KV head) need only an item each. A function of the batch shape only,
    so a CUDA graph captured for a batch size keeps its split."""
    if persistent:
        want = -(-persistent_ctas(num_kv_heads, num_sms) // max(1, num_seqs))
    else:
        want = -(-2 * num_sms // max(1, num_seqs * num_kv_heads))
    return min(16, 1 << max(0, (want - 1).bit_length()))


def persistent_ctas(num_kv_heads: int, num_sms: int) -> int:
    """Persistent CTAs per KV head: one wave of one CTA per SM."""
    return max(1, num_sms // num_kv_heads)


def paged_attention_decode(
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
    win: int = 0,
    num_segments: int | None = None,
    rope_mode: int | None = None,
    num_warps: int = NUM_WARPS,
    unroll: int = DEFAULT_UNROLL,
    specialize: bool | None = None,
    persistent: bool | None = None,
) -> LaunchPlan:
    """Split-KV partials of a decode-only step (every sequence has <= 1 new token) into a `LaunchPlan`,
    partials even for one segment: the caller merges them (`merge_segments`, or with a recent window).
    Codebooks are in the model dtype, [Hkv * D / c, 256, c]; `win` > 0 attends only to keys at least
    `win` older than the query."""
    t = query.shape[0]
    hkv = kv_cache.shape[1]
    num_seqs = seq_lens.shape[0]
    inst = _instance(
        query, kv_cache, k_codebook, v_codebook, cos_sin_cache, rope_mode, num_warps, unroll, specialize, persistent
    )
    dev = query.device
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    if num_segments is None:
        num_segments = num_segments_for(num_seqs, hkv, sms, inst.persistent)
    plan = plan_launch(query, None, hkv, num_seqs, 1, num_segments, partials=True)
    part, ml = plan.target, plan.ml
    if t == 0 or num_seqs == 0:
        return plan
    _, func = _function(inst, cuda_build.device_index(query))
    cuda_build.check_index_dtypes(block_table, seq_lens, query_start_loc)
    assert cos_sin_cache is None or cos_sin_cache.shape[0] > 16, "rows 8 and 16 are the 8-/16-position rotations"
    cs = cos_sin_cache if cos_sin_cache is not None else query
    rp = packed_rope(cos_sin_cache, query.dtype) if inst.rope_mode == ROPE_PACKED else query
    args = [
        *cuda_build.pointers(
            query, part, ml, kv_cache, k_codebook, v_codebook, block_table, seq_lens, query_start_loc, cs
        ),
        ctypes.c_int64(query.stride(0)),
        ctypes.c_int64(query.stride(1)),
        ctypes.c_int64(kv_cache.stride(0)),
        ctypes.c_int64(kv_cache.stride(1)),
        ctypes.c_int64(kv_cache.stride(2)),
        ctypes.c_int64(block_table.stride(0)),
        ctypes.c_int64(cos_sin_cache.stride(0) if cos_sin_cache is not None else 0),
        ctypes.c_int32(cos_sin_cache.shape[0] if cos_sin_cache is not None else 1),
        ctypes.c_float(float(scale) * LOG2E),
        ctypes.c_int32(kv_cache.shape[2]),
        ctypes.c_int32(kv_cache.shape[2].bit_length() - 1),
        ctypes.c_int32(key_bytes),
        ctypes.c_int32(win),
        *cuda_build.pointers(rp),
        ctypes.c_int64(rp.stride(0) if inst.rope_mode == ROPE_PACKED else 0),
    ]
    grid = (num_segments, num_seqs, hkv)
    if inst.persistent:  # (CTAs per head, 1, Hkv), each looping over its head's items
        grid = (min(persistent_ctas(hkv, sms), num_seqs * num_segments), 1, hkv)
        args += [ctypes.c_int32(num_seqs), ctypes.c_int32(num_segments)]
    cuda_build.launch(func, grid, num_warps * 32, inst.smem_bytes(), dev, args)
    return plan


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
    **launch,
) -> torch.Tensor:
    """The decode step's attention into `out` [T, Hq, D] (new in query's dtype when None): the codes'
    partials merged, with a recent `window`'s exact part when given (`window_triton`)."""
    if out is None:
        out = torch.empty_like(query)
    plan = paged_attention_decode(
        query, kv_cache, k_codebook, v_codebook, key_bytes, block_table, seq_lens, query_start_loc, scale,
        cos_sin_cache, window.W if window is not None else 0, **launch,
    )  # fmt: skip
    if query.shape[0] == 0:
        return out
    if window is not None:
        from vllm_cq.kernels.window_triton import attend_window_and_merge

        return attend_window_and_merge(query, out, plan, window, seq_lens, query_start_loc, scale)
    merge_segments(plan.target, plan.ml, out, query_start_loc)  # also for one segment: the kernel writes partials
    return out
