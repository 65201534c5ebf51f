"""Attention kernel microbenchmarks on the Llama-3.1-8B attention shape (issue 5, item 4a).

One layer's attention: 32 query heads, 8 KV heads, head_dim 128, bf16 query, vLLM pages of 16 tokens,
random KV contents, shuffled block tables. Backends, each called the way vLLM 0.26 calls it:

  fa3     vllm.vllm_flash_attn.flash_attn_varlen_func(fa_version=3), paged KV via block_table,
          FA3's own split heuristic (num_splits=0) and the AOT scheduler metadata, as vLLM's
          FLASH_ATTN backend runs outside full CUDA graphs; kv bf16 and fp8 (fp8 query + descales)
  fa3-cg  the same with num_splits <= 32 (vLLM's setting under full CUDA graphs; decode only)
  triton  vllm.v1.attention.ops.triton_unified_attention.unified_attention (TRITON_ATTN backend):
          2D kernel for prefill and batch > 16, 3D split-softmax kernel for batch <= 16; bf16 and fp8
  cq      vllm_cq.kernels.cq.ops.paged_attention / write_kv_cache per format (cq4, cq2, cq1, cq_k4v1):
          the dispatch's choice (the CUDA decode / prefill kernel where it covers the shape, else Triton)
  cq-triton / cq-cuda  the same call with decode_kernel and prefill_kernel "triton" / "cuda" (the CUDA
          prefill kernel: its ws form on sm_90 where it applies, else wgmma there, else mma.sync)
  cq-wgmma / cq-mma / cq-ws / cq-wso / cq-wsp  prefill rows with that prefill_kernel (a form of the CUDA
          prefill kernel; wgmma and the warp-specialized ws / wso (ws with the next tile's scores during
          P V) / wsp (ws with pre-packed RoPE) on sm_90 only; opt-in: "prefill-variants")
  cq-cuda-rec, cq-cuda-r{1,2,3}w{8,10,12}u{1,2,3}  opt-in variants of the CUDA decode kernel called
          directly (RoPE rows read per step (1), advanced by rotation (2) or read pre-packed a step
          ahead (3), warps, unroll)
  cq-cuda-const  the CUDA kernels with the page layout compiled into them as constants and the decode
          kernel's pipeline loads unguarded (cuda_build.SPECIALIZE_LAYOUT), one CTA per decode item;
          cq-cuda-plain with neither (the builds before 2026-12-04; opt-in: "layout")
  cq-cuda-persist, cq-cuda-const-persist  decode rows of the CUDA decode kernel as persistent CTAs (one per
          SM and KV head over its items, decode_cuda.PERSISTENT), without / with layout constants (opt-in:
          "persistent"). Each of these four pins both switches; cq-cuda takes the defaults, which since
          2026-12-04 are cq-cuda-const-persist's
  tq      vllm_cq.kernels.kvtq.ops.paged_attention / write_kv_cache (kvtq, kvtq1), as the vLLM backend
  tq-lw   the same KVTQ attention with levelwise="kv" (digits straight into the dots, scales once per
          level and group; `kernels/kvtq/triton_ops.py`), tq-lw-k / tq-lw-v one side only; opt-in:
          picked by name (kvtq:levelwise, kvtq1:levelwise-k, ...), backend, `levelwise` or `all`,
          never by the kv dtype alone; no write rows (same write kernel as tq)

Rows: decode (one new token per sequence) at --contexts x --batches; prefill (one sequence, causal,
whole prompt new, or only its last --prefill-chunk tokens new); write (store one decode step's new K/V
for --write-batch sequences, and one --write-prefill-tokens chunk: cq encoding vs vLLM's
reshape_and_cache_flash). Timers, per row:

  ms_graph_cold  CUDA graph of N x (256 MiB L2 flush + call) minus a graph of N x flush, / N:
                 no launch overhead, nothing left in L2 (a 32-layer model never finds its KV in L2)
  ms_bench       triton.testing.do_bench median (eager launches, L2 flushed)
  ms_graph       triton.testing.do_bench_cudagraph median (no flush: small caches stay in L2)

`ms` is the first of ms_graph_cold, ms_bench that was measured (prefill: ms_bench; prefill is eager
in vLLM too). `speedup_vs_fa3_bf16` compares the same timer at the same (kind, batch, context).

    python benchmarks/attention_bench.py                # full grid, H100: about 5 min
    python benchmarks/attention_bench.py --quick        # smoke run, about 1 min
    python benchmarks/attention_bench.py --backends fa3,cq1 --contexts 32768 --batches 64
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import json
import math
import os
import platform
import re
import shutil
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from e2e_throughput import kernel_env  # benchmarks/ is on sys.path: this file runs as a script

HQ, HKV, HEAD_DIM, PAGE = 32, 8, 128, 16  # Llama-3.1-8B attention, vLLM's default block size
SCALE = HEAD_DIM**-0.5
MODEL_DTYPE = torch.bfloat16  # query, new K/V, output and the bf16 KV cache
ROPE_BASE = 500000.0
FLUSH_BYTES = 256 << 20  # > H100 L2 (50 MiB); what triton's do_bench flushes too

# name -> (backend, kv_dtype); --backends picks entries by name, backend or kv dtype
# the forms of the CUDA prefill kernel (`prefill_cuda.VARIANTS`), each a prefill-only backend cq-<form>
PREFILL_FORMS = ("wgmma", "mma", "ws", "wso", "wsp")
BACKENDS: dict[str, tuple[str, str]] = {
    "fa3:bf16": ("fa3", "bf16"),
    "fa3:fp8": ("fa3", "fp8"),
    "fa3-cg:bf16": ("fa3-cg", "bf16"),
    "fa3-cg:fp8": ("fa3-cg", "fp8"),
    "triton:bf16": ("triton", "bf16"),
    "triton:fp8": ("triton", "fp8"),
    "cq:cq4": ("cq", "cq4"),
    "cq:cq2": ("cq", "cq2"),
    "cq:cq1": ("cq", "cq1"),
    "cq:cq_k4v1": ("cq", "cq_k4v1"),
    "cq:cq_k4v2": ("cq", "cq_k4v2"),
    "cq:cq2n": ("cq", "cq2n"),
    "cq:cq_k4v05": ("cq", "cq_k4v05"),
    # decode through one kernel or the other (the "cq" rows take what the dispatch picks)
    "cq-triton:cq4": ("cq-triton", "cq4"),
    "cq-triton:cq2": ("cq-triton", "cq2"),
    "cq-triton:cq1": ("cq-triton", "cq1"),
    "cq-triton:cq_k4v1": ("cq-triton", "cq_k4v1"),
    "cq-triton:cq_k4v05": ("cq-triton", "cq_k4v05"),
    "cq-cuda:cq4": ("cq-cuda", "cq4"),
    "cq-cuda:cq2": ("cq-cuda", "cq2"),
    "cq-cuda:cq1": ("cq-cuda", "cq1"),
    "cq-cuda:cq_k4v1": ("cq-cuda", "cq_k4v1"),
    "cq-cuda:cq_k4v05": ("cq-cuda", "cq_k4v05"),
    # the two forms of the CUDA prefill kernel (prefill rows only; opt-in, "prefill-variants")
    **{f"cq-{v}:{f}": (f"cq-{v}", f) for v in PREFILL_FORMS for f in ("cq4", "cq2", "cq1", "cq_k4v1")},
    # the CUDA decode kernel with its RoPE rows advanced by rotation instead of read per key (opt-in)
    "cq-cuda-rec:cq1": ("cq-cuda-rec", "cq1"),
    "cq-cuda-rec:cq_k4v1": ("cq-cuda-rec", "cq_k4v1"),
    # launch variants of the CUDA decode kernel (opt-in, "cuda-variants"): rope mode r, warps w, unroll u
    "cq-cuda-r1w8u3:cq1": ("cq-cuda-r1w8u3", "cq1"),
    "cq-cuda-r2w8u3:cq1": ("cq-cuda-r2w8u3", "cq1"),
    "cq-cuda-r2w10u1:cq1": ("cq-cuda-r2w10u1", "cq1"),
    "cq-cuda-r1w10u1:cq1": ("cq-cuda-r1w10u1", "cq1"),
    "cq-cuda-r3w8u3:cq1": ("cq-cuda-r3w8u3", "cq1"),  # cos/sin words pre-packed (decode_cuda.ROPE_PACKED)
    "cq-cuda-r3w8u3:cq4": ("cq-cuda-r3w8u3", "cq4"),
    "cq-cuda-r2w8u3:cq4": ("cq-cuda-r2w8u3", "cq4"),
    "cq-cuda-r3w8u3:cq_k4v1": ("cq-cuda-r3w8u3", "cq_k4v1"),
    # more warps per SM at fewer registers: 12 warps in 168 registers (cq1 at unroll 1: 8 bytes of spills)
    "cq-cuda-r3w12u1:cq1": ("cq-cuda-r3w12u1", "cq1"),
    "cq-cuda-r3w10u1:cq1": ("cq-cuda-r3w10u1", "cq1"),
    # the CUDA kernels with the page layout compiled in as constants (cuda_build.SPECIALIZE_LAYOUT on), and
    # with neither that nor persistent decode CTAs (the defaults before 2026-12-04)
    "cq-cuda-plain:cq1": ("cq-cuda-plain", "cq1"),
    "cq-cuda-plain:cq4": ("cq-cuda-plain", "cq4"),
    "cq-cuda-const:cq1": ("cq-cuda-const", "cq1"),
    "cq-cuda-const:cq4": ("cq-cuda-const", "cq4"),
    # the CUDA decode kernel as persistent CTAs (decode_cuda.PERSISTENT), with and without layout constants
    "cq-cuda-persist:cq1": ("cq-cuda-persist", "cq1"),
    "cq-cuda-persist:cq4": ("cq-cuda-persist", "cq4"),
    "cq-cuda-const-persist:cq1": ("cq-cuda-const-persist", "cq1"),
    # the default recent window (128 exact tokens beside the codes): window pages, the merge, the window write
    "cq-w128:cq4": ("cq-w128", "cq4"),
    "cq-w128:cq1": ("cq-w128", "cq1"),
    "cq-w128:cq_k4v1": ("cq-w128", "cq_k4v1"),
    "tq:kvtq": ("tq", "kvtq"),
    "tq:kvtq1": ("tq", "kvtq1"),
    "kvtq:levelwise": ("tq-lw", "kvtq"),
    "kvtq1:levelwise": ("tq-lw", "kvtq1"),
    "kvtq:levelwise-k": ("tq-lw-k", "kvtq"),
    "kvtq1:levelwise-k": ("tq-lw-k", "kvtq1"),
    "kvtq:levelwise-v": ("tq-lw-v", "kvtq"),
    "kvtq1:levelwise-v": ("tq-lw-v", "kvtq1"),
}
# KVTQ attention variants (backend -> ops.paged_attention(levelwise=...)); all but "tq" are opt-in
TQ_LEVELWISE = {"tq": "none", "tq-lw": "kv", "tq-lw-k": "k", "tq-lw-v": "v"}
# opt-in variants -> the word that picks them all; not picked by their kv dtype, so `--backends kvtq` or
# `--backends cq1` stays as it was
OPT_IN = {
    "tq-lw": "levelwise",
    "tq-lw-k": "levelwise",
    "tq-lw-v": "levelwise",
    "cq-w128": "window",
    "cq-cuda-rec": "rope-recurrence",
    "cq-cuda-const": "layout",
    "cq-cuda-plain": "layout",
    "cq-cuda-persist": "persistent",
    "cq-cuda-const-persist": "persistent",
    **{f"cq-{v}": "prefill-variants" for v in PREFILL_FORMS},
    **{f"cq-cuda-r{r}w{w}u{u}": "cuda-variants" for r in (1, 2, 3) for w in (8, 10, 12) for u in (1, 2, 3)},
}
DEFAULT_BACKENDS = "fa3,fa3-cg,triton,cq4,cq2,cq1,cq_k4v1,kvtq,kvtq1"
# backends that pin the CUDA kernels' two build switches by their names ("const", "persist"), whatever the
# defaults: an A/B of builds stays the same A/B after a default changes
PINNED_BUILDS = ("cq-cuda-plain", "cq-cuda-const", "cq-cuda-persist", "cq-cuda-const-persist")


# ------------------------------------------------------------------------------------------------
# The one place that knows the cq kernels' entry points (signatures are still moving: issue 5).
# Core arguments are positional in the order below; everything else is passed by keyword only if
# the function accepts it (inspect.signature), so a renamed or added keyword needs an edit here only.
# ------------------------------------------------------------------------------------------------

CQ_FMT_AS_NAME = False  # True if ops.* take the dtype name instead of the KVFormat object


def _accepted(fn: Callable, extras: dict[str, Any]) -> dict[str, Any]:
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return extras
    return {k: v for k, v in extras.items() if k in params}


def cq_paged_attention(ops, q, kv_cache, k_cb, v_cb, fmt, block_table, seq_lens, query_start_loc, **extras):
    """ops.paged_attention(query, kv_cache, k_codebook, v_codebook, fmt, block_table, seq_lens,
    query_start_loc, scale, cos_sin_cache, is_neox, [max_query_len, out, k_codebook_attn,
    v_codebook_attn, max_seq_len, token_seq, positions ...]) -> out [T, Hq, D]."""
    fmt_arg = fmt.name if CQ_FMT_AS_NAME else fmt
    kw = _accepted(ops.paged_attention, extras)
    return ops.paged_attention(q, kv_cache, k_cb, v_cb, fmt_arg, block_table, seq_lens, query_start_loc, **kw)


def cq_write_kv_cache(ops, key, value, kv_cache, slot_mapping, k_cb, v_cb, fmt, **extras):
    """ops.write_kv_cache(key, value, kv_cache, slot_mapping, k_codebook, v_codebook, fmt,
    [positions | query_start_loc + seq_lens, cos_sin_cache, is_neox, ...])."""
    fmt_arg = fmt.name if CQ_FMT_AS_NAME else fmt
    kw = _accepted(ops.write_kv_cache, extras)
    return ops.write_kv_cache(key, value, kv_cache, slot_mapping, k_cb, v_cb, fmt_arg, **kw)


# ------------------------------------------------------------------------------------------------
# Cases and shared inputs
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    kind: str  # decode | prefill | write
    batch: int
    context: int  # tokens per sequence after this step (KV length)
    q_len: int  # new tokens per sequence in this step

    @property
    def key(self) -> tuple:
        return (self.kind, self.batch, self.context, self.q_len)


@dataclass
class Inputs:
    """Metadata for one (batch, context, q_len) step, shared by every backend."""

    case: Case
    device: torch.device
    block_table: torch.Tensor  # [B, pages] int32, shuffled pages
    num_blocks: int
    seq_lens: torch.Tensor  # [B] int32
    query_start_loc: torch.Tensor  # [B+1] int32
    positions: torch.Tensor  # [T] int64, position of each new token
    token_seq: torch.Tensor  # [T] int64, sequence of each new token
    slot_mapping: torch.Tensor  # [T] int64
    query: torch.Tensor  # [T, Hq, D] bf16
    key: torch.Tensor  # [T, Hkv, D] bf16 (new tokens, post-RoPE as vLLM hands them over)
    value: torch.Tensor
    storages: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # per backend call, reset by the driver

    @property
    def num_tokens(self) -> int:
        return self.case.batch * self.case.q_len


def make_inputs(case: Case, device: torch.device, gen: torch.Generator) -> Inputs:
    b, ctx, ql = case.batch, case.context, case.q_len
    pages = math.ceil(ctx / PAGE)
    num_blocks = b * pages
    perm = torch.randperm(num_blocks, generator=gen).to(torch.int32)
    block_table = perm.view(b, pages).to(device)
    seq_lens = torch.full((b,), ctx, dtype=torch.int32, device=device)
    query_start_loc = (torch.arange(b + 1, dtype=torch.int32) * ql).to(device)
    t = b * ql
    token_seq = torch.arange(b, device=device).repeat_interleave(ql)
    positions = (ctx - ql + torch.arange(t, device=device) % ql).long()
    slot_mapping = (block_table.long()[token_seq, positions // PAGE] * PAGE + positions % PAGE).long()
    q = torch.randn(t, HQ, HEAD_DIM, device=device, dtype=MODEL_DTYPE)
    k = torch.randn(t, HKV, HEAD_DIM, device=device, dtype=MODEL_DTYPE)
    v = torch.randn(t, HKV, HEAD_DIM, device=device, dtype=MODEL_DTYPE)
    return Inputs(
        case, device, block_table, num_blocks, seq_lens, query_start_loc, positions, token_seq, slot_mapping, q, k, v
    )


def vllm_kv_cache(inp: Inputs, kv: str) -> torch.Tensor:
    """vLLM 0.26 FLASH_ATTN / TRITON_ATTN page memory, NHD layout (the default): physical
    [num_blocks, block_size, Hkv, 2*D] (K | V in the last dim); the backends' views are
    key_cache = phys[..., :D], value_cache = phys[..., D:] ([blocks, 16, Hkv, D], strided).
    fp8 caches are uint8 tensors (STR_DTYPE_TO_TORCH_DTYPE['fp8']) viewed as float8_e4m3fn."""
    name = f"vllm-{kv}"
    if name not in inp.storages:
        shape = (inp.num_blocks, PAGE, HKV, 2 * HEAD_DIM)
        x = torch.randn(shape, device=inp.device, dtype=MODEL_DTYPE)
        if kv == "fp8":
            x = x.to(torch.float8_e4m3fn).view(torch.uint8)
        inp.storages[name] = x
    return inp.storages[name]


def kv_bytes_per_token_head(kv: str) -> int:
    if kv == "bf16":
        return 4 * HEAD_DIM
    if kv == "fp8":
        return 2 * HEAD_DIM
    from vllm_cq.formats import get_format

    return get_format(kv).slot_bytes(HEAD_DIM)


# ------------------------------------------------------------------------------------------------
# Backends: each returns a zero-argument callable that runs one layer's step on the GPU
# ------------------------------------------------------------------------------------------------


def _fa3_fn(inp: Inputs, kv: str, splits: int, kind: str) -> Callable[[], Any]:
    case = inp.case
    phys = vllm_kv_cache(inp, kv)
    if kind == "write":
        from vllm._custom_ops import reshape_and_cache_flash

        kc, vc = phys[..., :HEAD_DIM], phys[..., HEAD_DIM:]
        one = torch.ones((), dtype=torch.float32, device=inp.device)  # layer._k_scale / _v_scale
        dt = "auto" if kv == "bf16" else "fp8"
        return lambda: reshape_and_cache_flash(inp.key, inp.value, kc, vc, inp.slot_mapping, dt, one, one)

    from vllm.vllm_flash_attn import flash_attn_varlen_func, get_scheduler_metadata

    fp8 = kv == "fp8"
    kc, vc = phys[..., :HEAD_DIM], phys[..., HEAD_DIM:]
    q = inp.query
    if fp8:
        kc, vc = kc.view(torch.float8_e4m3fn), vc.view(torch.float8_e4m3fn)
        q = q.to(torch.float8_e4m3fn)  # vLLM quantizes the query for FA3 on fp8 KV (scale 1 here)
    descale = torch.ones((), dtype=torch.float32, device=inp.device).expand(case.batch, HKV)
    out = torch.empty(inp.num_tokens, HQ, HEAD_DIM, dtype=MODEL_DTYPE, device=inp.device)
    # vLLM's builder computes this once per step (not per layer): outside the timed call.
    sched_kw = dict(
        batch_size=case.batch,
        max_seqlen_q=case.q_len,
        max_seqlen_k=case.context,
        num_heads_q=HQ,
        num_heads_kv=HKV,
        headdim=HEAD_DIM,
        cache_seqlens=inp.seq_lens,
        qkv_dtype=torch.float8_e4m3fn if fp8 else MODEL_DTYPE,
        cu_seqlens_q=inp.query_start_loc,
        page_size=PAGE,
        causal=True,
        window_size=(-1, -1),
        num_splits=splits,
    )
    try:
        sched = get_scheduler_metadata(**sched_kw)
    except Exception as e:  # vLLM would fail here too; time FA3 without AOT scheduling, say so
        sched = None
        inp.notes.append(f"get_scheduler_metadata failed ({type(e).__name__}: {str(e)[:200]}); timed without it")

    def fn():
        return flash_attn_varlen_func(
            q=q,
            k=kc,
            v=vc,
            out=out,
            cu_seqlens_q=inp.query_start_loc,
            max_seqlen_q=case.q_len,
            seqused_k=inp.seq_lens,
            max_seqlen_k=case.context,
            softmax_scale=SCALE,
            causal=True,
            alibi_slopes=None,
            window_size=[-1, -1],
            block_table=inp.block_table,
            softcap=0,
            scheduler_metadata=sched,
            fa_version=3,
            q_descale=descale,
            k_descale=descale,
            v_descale=descale,
            num_splits=splits,
        )

    return fn


_TRITON_SEQ_THRESHOLD_3D = 16  # 128 // num_kv_heads, snapped to the nearest CUDA-graph capture size
_TRITON_SEGMENTS = 16  # NUM_PAR_SOFTMAX_SEGMENTS


def _triton_fn(inp: Inputs, kv: str, kind: str) -> Callable[[], Any]:
    case = inp.case
    phys = vllm_kv_cache(inp, kv)
    if kind == "write":
        from vllm.v1.attention.ops.triton_reshape_and_cache_flash import triton_reshape_and_cache_flash

        kc, vc = phys[..., :HEAD_DIM], phys[..., HEAD_DIM:]
        if kv == "fp8":  # the TRITON_ATTN backend hands its write fp8 views (FLASH_ATTN: uint8)
            kc, vc = kc.view(torch.float8_e4m3fn), vc.view(torch.float8_e4m3fn)
        one = torch.ones((), dtype=torch.float32, device=inp.device)
        dt = "auto" if kv == "bf16" else "fp8"
        return lambda: triton_reshape_and_cache_flash(inp.key, inp.value, kc, vc, inp.slot_mapping, dt, one, one)

    from vllm.v1.attention.ops.triton_unified_attention import unified_attention
    from vllm.v1.kv_cache_interface import KVQuantMode

    fp8 = kv == "fp8"
    kc, vc = phys[..., :HEAD_DIM], phys[..., HEAD_DIM:]
    q = inp.query
    one = torch.ones(1, dtype=torch.float32, device=inp.device)
    q_descale = None
    if fp8:
        kc, vc = kc.view(torch.float8_e4m3fn), vc.view(torch.float8_e4m3fn)
        q = q.to(torch.float8_e4m3fn)  # the layer's query_quant runs for TRITON_ATTN on CUDA too
        q_descale = one
    kdesc = one.expand(case.batch, HKV)
    out = torch.empty(inp.num_tokens, HQ, HEAD_DIM, dtype=MODEL_DTYPE, device=inp.device)
    n3d, seg = _TRITON_SEQ_THRESHOLD_3D, _TRITON_SEGMENTS
    segm_out = torch.empty(n3d, HQ, seg, HEAD_DIM, dtype=torch.float32, device=inp.device)
    segm_max = torch.empty(n3d, HQ, seg, dtype=torch.float32, device=inp.device)
    segm_sum = torch.empty(n3d, HQ, seg, dtype=torch.float32, device=inp.device)
    mode = KVQuantMode.FP8_PER_TENSOR if fp8 else KVQuantMode.NONE

    def fn():
        unified_attention(
            q=q,
            k=kc,
            v=vc,
            out=out,
            cu_seqlens_q=inp.query_start_loc,
            max_seqlen_q=case.q_len,
            seqused_k=inp.seq_lens,
            max_seqlen_k=case.context,
            softmax_scale=SCALE,
            causal=True,
            window_size=(-1, -1),
            block_table=inp.block_table,
            softcap=0,
            q_descale=q_descale,
            k_descale=kdesc,
            v_descale=kdesc,
            seq_threshold_3D=n3d,
            num_par_softmax_segments=seg,
            softmax_segm_output=segm_out,
            softmax_segm_max=segm_max,
            softmax_segm_expsum=segm_sum,
            kv_quant_mode=mode,
        )
        return out

    return fn


_CQ_STATIC: dict[tuple, Any] = {}


def window_inputs(inp: Inputs, W: int, block: int = 16) -> tuple[Any, torch.Tensor]:
    """A recent window of W tokens as vLLM keeps it: each sequence's live window blocks (the last
    ceil((W - 1 + q_len) / block) + 1) from a small pool, older table entries on the null block 0;
    returns (WindowCache, this step's window slot per new token)."""
    from vllm_cq.kernels.window import WindowCache

    case, dev = inp.case, inp.device
    key = f"window-{W}"
    if key not in inp.storages:
        pages = math.ceil(case.context / block)
        live = min(pages, -(-(W - 1 + case.q_len) // block) + 1)
        pool = torch.randn(1 + case.batch * live, HKV, block, 2 * HEAD_DIM, device=dev, dtype=MODEL_DTYPE)
        table = torch.zeros(case.batch, pages + 1, dtype=torch.int32)
        ids = 1 + torch.arange(case.batch * live, dtype=torch.int32).view(case.batch, live)
        table[:, pages - live : pages] = ids
        table = table.to(dev)
        pos = inp.positions
        slots = (table.long()[inp.token_seq, pos // block] * block + pos % block).long()
        inp.storages[key] = (WindowCache(W, pool, table), slots)
    return inp.storages[key]


def _cq_fn(
    inp: Inputs,
    fmt_name: str,
    kind: str,
    window: int = 0,
    decode_kernel: str | None = None,
    rope_mode: int = 0,
    launch: dict | None = None,
) -> Callable[[], Any]:
    from vllm_cq.formats import get_format
    from vllm_cq.kernels import rope
    from vllm_cq.kernels.cq import ops

    case, dev = inp.case, inp.device
    fmt = get_format(fmt_name)
    if dev.type == "cuda" and hasattr(ops, "_triton_ok") and not ops._triton_ok(dev, fmt):
        raise TooSlow(f"ops would take the torch reference path for {fmt_name} (VLLM_CQ_KERNELS?)")
    skey = (fmt_name, str(dev))
    if skey not in _CQ_STATIC:
        g = torch.Generator().manual_seed(1)
        kcb = torch.randn(fmt.key.codebook_shape(HKV, HEAD_DIM), generator=g).to(dev)
        vcb = torch.randn(fmt.value.codebook_shape(HKV, HEAD_DIM), generator=g).to(dev)
        _CQ_STATIC[skey] = (kcb, vcb)
    kcb, vcb = _CQ_STATIC[skey]
    max_pos = max(case.context, 1) + PAGE
    ckey = ("rope", max_pos, str(dev))
    if ckey not in _CQ_STATIC:
        _CQ_STATIC[ckey] = rope.build_cos_sin_cache(HEAD_DIM, max_pos, ROPE_BASE).to(dev)
    cos_sin = _CQ_STATIC[ckey]
    name = f"cq-{fmt_name}"
    if name not in inp.storages:  # [num_blocks, Hkv, block_size, slot_bytes] uint8, random codes
        shape = (inp.num_blocks, HKV, PAGE, fmt.slot_bytes(HEAD_DIM))
        inp.storages[name] = torch.randint(0, 256, shape, dtype=torch.uint8, device=dev)
    cache = inp.storages[name]
    # Once per step in the backend's metadata builder, shared by all layers: outside the timed call.
    if hasattr(ops, "token_seq_and_positions"):
        token_seq, positions = ops.token_seq_and_positions(inp.query_start_loc, inp.seq_lens, inp.num_tokens)
    else:
        token_seq, positions = inp.token_seq, inp.positions
    common = dict(
        cos_sin_cache=cos_sin,
        is_neox=True,
        query_start_loc=inp.query_start_loc,
        seq_lens=inp.seq_lens,
        max_query_len=case.q_len,
        max_seq_len=case.context,
        token_seq=token_seq,
        positions=positions,
    )
    win, win_slots = window_inputs(inp, window) if window else (None, None)
    if kind == "write":
        if win is None:
            return lambda: cq_write_kv_cache(
                ops, inp.key, inp.value, cache, inp.slot_mapping, kcb, vcb, fmt, num_tokens=inp.num_tokens, **common
            )
        from vllm_cq.kernels.window import write_window

        def write_both():  # what the backend does per layer and step with a window: codes, then the window
            cq_write_kv_cache(
                ops, inp.key, inp.value, cache, inp.slot_mapping, kcb, vcb, fmt, num_tokens=inp.num_tokens, **common
            )
            write_window(win.kv_cache, inp.key, inp.value, win_slots)

        return write_both
    if win is not None:
        common["window"] = win
    out = torch.empty(inp.num_tokens, HQ, HEAD_DIM, dtype=MODEL_DTYPE, device=dev)
    # model-dtype copies of the codebooks for the tensor-core path (the backend keeps both per layer)
    kcb_attn, vcb_attn = kcb.to(MODEL_DTYPE), vcb.to(MODEL_DTYPE)
    extras = dict(common, scale=SCALE, out=out, k_codebook_attn=kcb_attn, v_codebook_attn=vcb_attn)
    extras.pop("query_start_loc")
    extras.pop("seq_lens")
    if decode_kernel is not None:  # the kernel choice for this row's kind
        extras["decode_kernel" if kind == "decode" else "prefill_kernel"] = decode_kernel
    if rope_mode:  # a variant of the CUDA decode kernel, called directly
        if kind != "decode":
            raise Unsupported("the CUDA decode kernel's launch variants time decode rows only")
        from vllm_cq.kernels.cq import decode_cuda

        return lambda: decode_cuda.paged_attention(
            inp.query, cache, kcb_attn, vcb_attn, fmt.key_bytes(HEAD_DIM), inp.block_table, inp.seq_lens,
            inp.query_start_loc, SCALE, cos_sin, out=out, window=win, rope_mode=rope_mode, **(launch or {}),
        )  # fmt: skip
    return lambda: cq_paged_attention(
        ops, inp.query, cache, kcb, vcb, fmt, inp.block_table, inp.seq_lens, inp.query_start_loc, **extras
    )


def _tq_fn(inp: Inputs, fmt_name: str, kind: str, levelwise: str = "none") -> Callable[[], Any]:
    """KVTQ (`vllm_cq.kernels.kvtq.ops`): no codebooks, keys stored post-RoPE; random bytes in the
    cache are valid digits only up to 242 per byte, which does not change the work done. `levelwise`
    other than "none" times the level-wise attention kernel (attention rows only)."""
    from vllm_cq.formats import get_format
    from vllm_cq.kernels.kvtq import ops

    if levelwise != "none" and kind == "write":
        raise Unsupported("the level-wise variants change attention only; the write is tq's")
    case, dev = inp.case, inp.device
    fmt = get_format(fmt_name)
    name = f"tq-{fmt_name}"
    if name not in inp.storages:
        shape = (inp.num_blocks, HKV, PAGE, fmt.slot_bytes(HEAD_DIM))
        inp.storages[name] = torch.randint(0, 243, shape, dtype=torch.uint8, device=dev)
    cache = inp.storages[name]
    if kind == "write":
        return lambda: ops.write_kv_cache(inp.key, inp.value, cache, inp.slot_mapping, fmt)
    out = torch.empty(inp.num_tokens, HQ, HEAD_DIM, dtype=MODEL_DTYPE, device=dev)
    lw = {} if levelwise == "none" else {"levelwise": levelwise}  # the default call stays the backend's
    return lambda: ops.paged_attention(
        inp.query, cache, fmt, inp.block_table, inp.seq_lens, inp.query_start_loc, SCALE,
        max_query_len=case.q_len, out=out, **lw,
    )  # fmt: skip


def make_fn(backend: str, kv: str, inp: Inputs) -> Callable[[], Any]:
    kind = inp.case.kind
    if backend == "fa3":
        return _fa3_fn(inp, kv, 0, kind)
    if backend == "fa3-cg":
        if kind != "decode":
            raise Unsupported("fa3-cg is the decode setting under full CUDA graphs")
        return _fa3_fn(inp, kv, 32, kind)  # attention_config.flash_attn_max_num_splits_for_cuda_graph
    if backend == "triton":
        return _triton_fn(inp, kv, kind)
    if backend == "cq":
        return _cq_fn(inp, kv, kind)
    if backend == "cq-w128":
        return _cq_fn(inp, kv, kind, window=128)
    if backend in ("cq-triton", "cq-cuda"):
        return _cq_fn(inp, kv, kind, decode_kernel=backend[3:])
    if backend in (f"cq-{v}" for v in PREFILL_FORMS):
        if kind != "prefill":
            raise Unsupported(f"{backend}: a form of the prefill kernel")
        return _cq_fn(inp, kv, kind, decode_kernel=backend[3:])
    if backend in PINNED_BUILDS:
        from vllm_cq.kernels.cq import cuda_build, decode_cuda

        if "persist" in backend and kind != "decode":
            raise Unsupported(f"{backend}: a form of the decode kernel")
        settings = [
            (cuda_build, "SPECIALIZE_LAYOUT", "const" in backend),
            (decode_cuda, "PERSISTENT", "persist" in backend),
        ]
        return _with_settings(_cq_fn(inp, kv, kind, decode_kernel="cuda"), settings)
    if backend == "cq-cuda-rec":
        return _cq_fn(inp, kv, kind, decode_kernel="cuda", rope_mode=2)
    if m := re.fullmatch(r"cq-cuda-r(\d)w(\d+)u(\d)", backend):
        launch = dict(num_warps=int(m.group(2)), unroll=int(m.group(3)))
        return _cq_fn(inp, kv, kind, decode_kernel="cuda", rope_mode=int(m.group(1)), launch=launch)
    if backend in TQ_LEVELWISE:
        return _tq_fn(inp, kv, kind, TQ_LEVELWISE[backend])
    raise ValueError(backend)


def _with_settings(fn: Callable, settings: list[tuple[Any, str, Any]]) -> Callable:
    """`fn` with module settings (module, name, value) of the CUDA kernels: the instance is picked at each
    launch (and at a CUDA graph's capture), so the settings are set around every call."""

    def call():
        before = [getattr(m, name) for m, name, _ in settings]
        for m, name, value in settings:
            setattr(m, name, value)
        try:
            return fn()
        finally:
            for (m, name, _), value in zip(settings, before, strict=True):
                setattr(m, name, value)

    return call


class Unsupported(Exception):
    """A (backend, kind) pair that is skipped without an error row."""


class TooSlow(Exception):
    pass


# ------------------------------------------------------------------------------------------------
# Timers
# ------------------------------------------------------------------------------------------------


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _probe_ms(fn: Callable, dev: torch.device) -> float:
    _sync(dev)
    t0 = time.perf_counter()
    fn()
    _sync(dev)
    return (time.perf_counter() - t0) * 1e3


def _triton_kw(f: Callable, **kw) -> dict:
    return _accepted(f, kw)


def time_bench(fn: Callable) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, **_triton_kw(do_bench, warmup=25, rep=100, return_mode="median")))


def time_graph(fn: Callable) -> float:
    from triton.testing import do_bench_cudagraph

    return float(do_bench_cudagraph(fn, **_triton_kw(do_bench_cudagraph, rep=50, return_mode="median")))


_FLUSH: dict[str, torch.Tensor] = {}


def time_graph_cold(fn: Callable, est_ms: float, target_ms: float = 40.0, retries: int = 7) -> float:
    """CUDA graph of n x (flush L2, call) minus a graph of n x flush, per call, median of retries."""
    if "buf" not in _FLUSH:
        _FLUSH["buf"] = torch.empty(FLUSH_BYTES, dtype=torch.int8, device="cuda")
    buf = _FLUSH["buf"]
    n = max(1, min(200, int(target_ms / max(est_ms, 1e-3))))
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up on a side stream before capture (allocator, lazy init)
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g_call, g_flush = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
    with torch.cuda.graph(g_call):
        for _ in range(n):
            buf.zero_()
            fn()
    with torch.cuda.graph(g_flush):
        for _ in range(n):
            buf.zero_()
    g_call.replay()
    g_flush.replay()
    torch.cuda.synchronize()

    def once(g) -> float:
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        torch.cuda.synchronize()
        return a.elapsed_time(b)

    t_call = statistics.median(once(g_call) for _ in range(retries))
    t_flush = statistics.median(once(g_flush) for _ in range(retries))
    del g_call, g_flush
    return max(t_call - t_flush, 0.0) / n


def time_cpu(fn: Callable, reps: int = 3) -> float:
    """CPU dry runs (plumbing tests): wall-clock median."""
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def measure(fn: Callable, dev: torch.device, timers: list[str], max_call_s: float) -> dict[str, Any]:
    fn()  # compile / autotune / lazy init
    est = min(_probe_ms(fn, dev), _probe_ms(fn, dev))
    if est > max_call_s * 1e3:
        raise TooSlow(f"one call takes {est / 1e3:.2f} s (> --max-call-s {max_call_s}); reference path?")
    res: dict[str, Any] = {"probe_ms": round(est, 4)}
    if dev.type != "cuda":
        res["ms_cpu"] = time_cpu(fn)
        return res
    for t in timers:
        try:
            if t == "graph_cold":
                res["ms_graph_cold"] = time_graph_cold(fn, est)
            elif t == "bench":
                res["ms_bench"] = time_bench(fn)
            elif t == "graph":
                res["ms_graph"] = time_graph(fn)
        except Exception as e:  # a capture failure must not take the other timers down
            res[f"{t}_error"] = f"{type(e).__name__}: {e}"[:500]
            torch.cuda.synchronize()  # raises if the context is broken: the caller stops the run
    return res


TIMER_KEYS = ("ms_graph_cold", "ms_bench", "ms_graph", "ms_cpu")


def primary(row: dict) -> tuple[str | None, float | None]:
    for k in TIMER_KEYS:
        if row.get(k) is not None:
            return k, row[k]
    return None, None


# ------------------------------------------------------------------------------------------------
# Results
# ------------------------------------------------------------------------------------------------


def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"CPU ({platform.processor() or platform.machine()})"


def slug(s: str) -> str:
    s = re.sub(r"^nvidia\s+", "", s.lower())
    return re.sub(r"[^a-z0-9]+", "-", s).strip("-")[:40] or "device"


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("triton", "vllm"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception as e:
            out[mod] = f"unavailable: {type(e).__name__}"
    out["cuda"] = torch.version.cuda
    return out


def row_key(r: dict) -> tuple:
    return (r["kind"], r["backend"], r["kv_dtype"], r["batch"], r["context"], r.get("q_len"))


def add_derived(rows: list[dict]) -> None:
    """speedup_vs_fa3_bf16 (same timer, same kind/batch/context/q_len; for write rows the reference
    is fa3 bf16's reshape_and_cache_flash) and, for write rows, write time as % of the same backend's
    decode attention at the same batch for each measured context."""
    ref = {}
    for r in rows:
        if r["backend"] == "fa3" and r["kv_dtype"] == "bf16" and r.get("ms") is not None:
            ref[(r["kind"], r["batch"], r["context"], r.get("q_len"))] = r
    for r in rows:
        r["speedup_vs_fa3_bf16"] = None
        f = ref.get((r["kind"], r["batch"], r["context"], r.get("q_len")))
        if f is None or r.get("ms") is None:
            continue
        t = r.get("timer")
        if t and f.get(t) and r.get(t):
            r["speedup_vs_fa3_bf16"] = round(f[t] / r[t], 3)
    attn = {}
    for r in rows:
        if r["kind"] in ("decode", "prefill") and r.get("ms") is not None:
            attn.setdefault((r["kind"], r["backend"], r["kv_dtype"], r["batch"], r.get("q_len")), {})[r["context"]] = r
    for r in rows:
        if r["kind"] != "write" or r.get("ms") is None:
            continue
        if r["q_len"] == 1:  # one decode step: vs decode attention at each measured context
            refs = attn.get(("decode", r["backend"], r["kv_dtype"], r["batch"], 1), {})
            field_name = "pct_of_decode_attention"
        else:  # one prefill chunk: vs prefill attention over the same prompt
            refs = {
                c: d
                for c, d in attn.get(("prefill", r["backend"], r["kv_dtype"], 1, r["q_len"]), {}).items()
                if c == r["q_len"]
            }
            field_name = "pct_of_prefill_attention"
        pct = {}
        for ctx, d in sorted(refs.items()):
            t = r["timer"] if (r.get(r["timer"]) and d.get(r["timer"])) else None
            num, den = (r[t], d[t]) if t else (r["ms"], d["ms"])
            pct[str(ctx)] = round(100.0 * num / den, 2)
        if pct:
            r[field_name] = pct


class Results:
    def __init__(self, path: str, meta: dict[str, Any]):
        self.path = path
        self.data: dict[str, Any] = {}
        if os.path.exists(path):  # a later subset run on the same device and day merges in
            with open(path) as f:
                self.data = json.load(f)
        self.data.update(meta)
        self.data.setdefault("rows", [])

    def add(self, row: dict) -> None:
        rows = [r for r in self.data["rows"] if row_key(r) != row_key(row)]
        rows.append(row)
        add_derived(rows)
        self.data["rows"] = rows
        self.save()

    def save(self) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.data, f, indent=1)
        os.replace(tmp, self.path)


def fmt_ms(x: float | None) -> str:
    return "" if x is None else (f"{x:.4f}" if x < 1 else f"{x:.3f}")


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| kind | backend | kv | batch | context | q_len | ms | timer | GB/s | vs FA3 bf16 | note |",
        "|---|---|---|---:|---:|---:|---:|---|---:|---:|---|",
    ]
    order = {"decode": 0, "prefill": 1, "write": 2}
    for r in sorted(rows, key=lambda r: (order.get(r["kind"], 9), r["batch"], r["context"], r.get("q_len") or 0)):
        sp = r.get("speedup_vs_fa3_bf16")
        note = r.get("error") or ""
        for f, what in (("pct_of_decode_attention", "decode attn"), ("pct_of_prefill_attention", "prefill attn")):
            if r.get(f):
                note = f"% of {what} by ctx: " + ", ".join(f"{k}: {v}" for k, v in r[f].items())
        lines.append(
            f"| {r['kind']} | {r['backend']} | {r['kv_dtype']} | {r['batch']} | {r['context']} | {r.get('q_len')} "
            f"| {fmt_ms(r.get('ms'))} | {(r.get('timer') or '').replace('ms_', '')} "
            f"| {'' if r.get('gbps') is None else round(r['gbps'])} "
            f"| {'' if sp is None else f'{sp:.2f}x'} | {note[:120]} |"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------------


def ints(s: str) -> list[int]:
    out = []
    for x in s.split(","):
        x = x.strip().lower()
        if x:
            out.append(int(float(x[:-1]) * 1024) if x.endswith("k") else int(x))
    return out


def _names(name: str, b: str, kv: str) -> tuple[str, ...]:
    """What a --backends entry may say to pick BACKENDS[name]: opt-in variants not their kv dtype."""
    return (name, b, OPT_IN[b]) if b in OPT_IN else (name, b, kv)


def select_backends(spec: str) -> list[tuple[str, str]]:
    toks = [t.strip() for t in spec.split(",") if t.strip()]
    out = []
    for name, (b, kv) in BACKENDS.items():
        if "all" in toks or any(t in _names(name, b, kv) for t in toks):
            out.append((b, kv))
    unknown = [t for t in toks if t != "all" and not any(t in _names(n, b, kv) for n, (b, kv) in BACKENDS.items())]
    if unknown:
        raise SystemExit(f"unknown --backends entries {unknown}; known: {', '.join(BACKENDS)}")
    return out


def build_cases(args) -> list[Case]:
    cases = []
    if "decode" in args.kinds:
        for ctx in args.contexts:
            for b in args.batches:
                cases.append(Case("decode", b, ctx, 1))
    if "prefill" in args.kinds:
        for ctx in args.prefill_contexts:
            cases.append(Case("prefill", 1, ctx, ctx))
            for ch in args.prefill_chunk:
                if ch < ctx:
                    cases.append(Case("prefill", 1, ctx, ch))
    if "write" in args.kinds:
        if args.write_batch:  # where the token lands does not matter: a 4K context keeps the cache small
            cases.append(Case("write", args.write_batch, 4096, 1))
        if args.write_prefill_tokens:
            cases.append(Case("write", 1, args.write_prefill_tokens, args.write_prefill_tokens))
    # The targets first (decode at the largest context x batch, whole-prompt prefill at the
    # largest length, the writes), so a run that meets --budget-s still has the headline numbers.
    dec = [c for c in cases if c.kind == "decode"]
    pre = [c for c in cases if c.kind == "prefill" and c.q_len == c.context]
    first = [max(dec, key=lambda c: (c.context, c.batch))] if dec else []
    first += [max(pre, key=lambda c: c.context)] if pre else []
    first += [c for c in cases if c.kind == "write"]
    return first + [c for c in cases if c not in first]


WRITE_SETTINGS = (
    "LARGE_STEP", "LARGE_BLOCK_T", "LARGE_NUM_WARPS", "DOT_PRECISION", "MATMUL_MIN_C",
    "LARGE_GROUP_LOOP", "BLOCK_T", "SMALL_NUM_WARPS", "SMALL_PRECISION", "SMALL_MATMUL_MIN_C", "PACKED_ARGMIN",
)  # fmt: skip
WINDOW_SETTINGS = (
    "DECODE_BLOCK_N", "DECODE_NUM_WARPS", "PREFILL_BLOCK_Q", "PREFILL_BLOCK_N", "PREFILL_NUM_WARPS",
)  # fmt: skip
_DEFAULTS: dict[tuple[str, str], Any] = {}  # (module, setting) -> its value at the first run in this process


def apply_settings(module: Any, allowed: tuple[str, ...], spec: str, flag: str) -> None:
    """Module-level kernel settings for one run: back to the module's defaults first (so that runs in one
    process, a sweep calling main, do not inherit the previous run's), then `spec` ("NAME=VALUE,...")."""
    for name in allowed:
        _DEFAULTS.setdefault((module.__name__, name), getattr(module, name))
        setattr(module, name, _DEFAULTS[(module.__name__, name)])
    for item in filter(None, spec.split(",")):
        name, _, value = item.partition("=")
        if name not in allowed:
            raise SystemExit(f"{flag}: {name!r} is not one of {allowed}")
        kind = type(getattr(module, name))
        setattr(module, name, value.lower() in ("1", "true") if kind is bool else kind(value))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    p.add_argument("--contexts", default="1k,4k,16k,32k", help="decode KV lengths (1k = 1024)")
    p.add_argument("--batches", default="1,16,64", help="decode batch sizes")
    p.add_argument("--prefill-contexts", default="2k,8k", help="prefill prompt lengths (one sequence)")
    p.add_argument("--prefill-chunk", default="2k", help="also time the last N tokens as a chunk ('' = off)")
    p.add_argument("--kinds", default="decode,prefill,write")
    p.add_argument("--backends", default=DEFAULT_BACKENDS, help=f"any of: {', '.join(BACKENDS)}, or a part, or all")
    p.add_argument("--write-batch", type=int, default=64, help="write rows: one decode step of this many seqs")
    p.add_argument("--write-prefill-tokens", type=int, default=8192, help="write rows: one prefill chunk")
    p.add_argument("--timers", default="graph_cold,bench", help="decode/write timers: graph_cold, bench, graph")
    p.add_argument("--prefill-timers", default="bench")
    p.add_argument("--max-call-s", type=float, default=2.0, help="skip a backend whose single call is slower")
    p.add_argument("--budget-s", type=float, default=480.0, help="stop starting new rows after this long")
    p.add_argument("--quick", action="store_true", help="smoke run: 1k/32k x 1/64, 2k prefill, bench timer")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu (plumbing only)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--out", default=None, help="results file (default OUT_DIR/attention-<device>-<date>.json)")
    p.add_argument("--seed-dir", default=None, help="if the results file is new, start from DIR/<same name> if there")
    p.add_argument(
        "--write-set",
        default="",
        help="cq write kernel's settings (write.py), e.g. LARGE_BLOCK_T=64,LARGE_NUM_WARPS=4 or SMALL_PRECISION=tf32x3",
    )
    p.add_argument(
        "--window-set",
        default="",
        help=f"the recent window merge's tiles (window_triton.py): {', '.join(WINDOW_SETTINGS)}",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.contexts, args.batches, args.prefill_contexts, args.prefill_chunk = "1k,32k", "1,64", "2k", ""
        args.timers = "graph_cold"
    args.contexts = ints(args.contexts)
    args.batches = ints(args.batches)
    args.prefill_contexts = ints(args.prefill_contexts)
    args.prefill_chunk = ints(args.prefill_chunk)
    args.kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    args.timers = [t.strip() for t in args.timers.split(",") if t.strip()]
    args.prefill_timers = [t.strip() for t in args.prefill_timers.split(",") if t.strip()]
    args.backend_list = select_backends(args.backends)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from vllm_cq.kernels import window_triton
    from vllm_cq.kernels.cq import write

    apply_settings(write, WRITE_SETTINGS, args.write_set, "--write-set")
    apply_settings(window_triton, WINDOW_SETTINGS, args.window_set, "--window-set")
    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    t_start = time.perf_counter()
    dname = device_name(dev)
    today = datetime.date.today().isoformat()
    os.makedirs(args.out_dir, exist_ok=True)
    path = args.out or os.path.join(args.out_dir, f"attention-{slug(dname)}-{today}.json")
    seed = os.path.join(args.seed_dir, os.path.basename(path)) if args.seed_dir else None
    if seed and not os.path.exists(path) and os.path.exists(seed) and os.path.abspath(seed) != os.path.abspath(path):
        shutil.copyfile(seed, path)  # an earlier call's rows (another subset) continue in this file
    meta = {
        "benchmark": "attention",
        "device": dname,
        "date": today,
        "versions": versions(),
        "shape": {"num_q_heads": HQ, "num_kv_heads": HKV, "head_dim": HEAD_DIM, "block_size": PAGE, "query": "bf16"},
        "argv": sys.argv[1:] if argv is None else argv,
        "kernel_env": kernel_env(),  # the process's; PINNED_BUILDS rows set their own builds
    }
    res = Results(path, meta)
    print(f"# {dname} | {meta['versions']} -> {path}", flush=True)
    gen = torch.Generator().manual_seed(args.seed)
    broken = None
    too_slow: dict[tuple[str, str, str], int] = {}  # (backend, kv, kind) -> smallest work that was too slow
    for case in build_cases(args):
        if broken or res.data.get("stopped_early"):
            break
        try:
            inp = make_inputs(case, dev, gen)
        except Exception as e:
            print(f"{case}: inputs failed: {e}", flush=True)
            continue
        timers = args.prefill_timers if case.kind == "prefill" else args.timers
        work = case.batch * case.context * case.q_len
        for backend, kv in args.backend_list:
            if time.perf_counter() - t_start > args.budget_s:
                print(f"budget of {args.budget_s} s used: stopping before {case} {backend}:{kv}", flush=True)
                res.data["stopped_early"] = f"budget {args.budget_s} s, before {case} {backend}:{kv}"
                res.save()
                break
            if too_slow.get((backend, kv, case.kind), work + 1) <= work:
                continue
            inp.notes.clear()
            row: dict[str, Any] = {
                "kind": case.kind,
                "backend": backend,
                "kv_dtype": kv,
                "batch": case.batch,
                "context": case.context,
                "q_len": case.q_len,
            }
            if case.kind == "write" and backend.startswith("cq"):  # the write kernel's settings of large steps
                row["write_settings"] = {k: getattr(write, k) for k in WRITE_SETTINGS}  # "write_large_step" before
            if backend == "cq-w128":  # the window merge's tiles
                row["window_settings"] = {k: getattr(window_triton, k) for k in WINDOW_SETTINGS}
            try:
                fn = make_fn(backend, kv, inp)
                row.update(measure(fn, dev, timers, args.max_call_s))
            except Unsupported:
                continue
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {e}"[:600]
                if isinstance(e, TooSlow):
                    too_slow[(backend, kv, case.kind)] = min(work, too_slow.get((backend, kv, case.kind), work))
                if not isinstance(e, TooSlow | ImportError | ModuleNotFoundError):
                    row["traceback"] = traceback.format_exc()[-2000:]
            finally:
                fn = None
            if dev.type == "cuda":
                try:
                    torch.cuda.synchronize()
                except Exception as e:  # sticky CUDA error: keep what we have, stop
                    broken = f"CUDA context broken after {backend}/{kv} {case}: {e}"
                    row.setdefault("error", broken)
            if inp.notes:
                row["note"] = "; ".join(inp.notes)
            row["timer"], row["ms"] = primary(row)
            if row["ms"] and case.kind != "write":
                nbytes = case.batch * case.context * HKV * kv_bytes_per_token_head(kv)
                row["kv_bytes"] = nbytes
                row["gbps"] = round(nbytes / (row["ms"] * 1e-3) / 1e9, 1)
            res.add(row)
            ms = fmt_ms(row["ms"]) or row.get("error", "")[:100]
            print(f"{case.kind:>7} b={case.batch:<3} ctx={case.context:<6} q={case.q_len:<5} {backend}:{kv:<8} {ms}")
            sys.stdout.flush()
            if broken:
                break
        inp = None
        if dev.type == "cuda":
            try:
                torch.cuda.empty_cache()
            except Exception:
                pass
    res.data["wall_s"] = round(time.perf_counter() - t_start, 1)
    if broken:
        res.data["broken"] = broken
    res.save()
    print()
    print(markdown_table(res.data["rows"]))
    print(f"\n-> {path} ({res.data['wall_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
