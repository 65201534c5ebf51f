"""Registers, spills, shared memory and static SASS instruction counts of the cq and KVTQ Triton
kernels, compiled ahead of time for a GPU architecture (default sm_90) on any machine, GPU or not:
Triton's own compiler and the ptxas and cuobjdump it ships. Not a benchmark: it shows occupancy
limits before GPU time is spent (an H100/H200 SM has 64K registers, so 4 warps at 255 registers
leave room for two programs). Instruction counts are static (the cubin's SASS, whole kernel and the
largest loop, i.e. one KV tile of the attention kernels), not executed counts.

    python benchmarks/kernel_resources.py                    # Llama-3.1-8B attention shape, all cq formats
    python benchmarks/kernel_resources.py --formats cq1 --block-n 32 --num-warps 8
    python benchmarks/kernel_resources.py --formats kvtq,kvtq:levelwise,kvtq1,kvtq1:levelwise
    python benchmarks/kernel_resources.py --formats cq1,cq_k4v1 --cuda      # + the CUDA kernels (NVRTC)

KVTQ names take the attention_bench.py suffixes for the kernel's level-wise variants:
kvtq:levelwise (keys and values), kvtq:levelwise-k, kvtq:levelwise-v.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile
from typing import Any

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from vllm_cq.formats import get_format
from vllm_cq.kernels import window_triton
from vllm_cq.kernels.cq import attention, write
from vllm_cq.kernels.kvtq import triton_ops as tq

TQ_VARIANTS = {"": "none", "levelwise": "kv", "levelwise-k": "k", "levelwise-v": "v"}  # as in attention_bench


def compile_aot(
    fn: Any,
    pointers: dict[str, str],
    constexprs: dict[str, Any],
    floats: set[str],
    arch: int,
    ints: dict[str, int] | None = None,
    **opts: Any,
) -> Any:
    """Compile `fn` for sm_<arch> with the given pointer element types and constexprs (other args i32).

    Specialized as the JIT launcher would: pointers 16-byte aligned (torch allocations are) and the
    integers in `ints` whose representative value is a multiple of 16 marked so. Without these hints
    Triton cannot prove a centroid's C coordinates are aligned, splits every vector load into scalar
    ones with a 64-bit address each, and the register count no longer describes the kernel that runs.
    """
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        sig[name] = "constexpr" if name in constexprs else pointers.get(name, "fp32" if name in floats else "i32")
        if name in pointers or (ints or {}).get(name, 1) % 16 == 0:
            attrs[(i,)] = [["tt.divisibility", 16]]
    constants = {(fn.arg_names.index(k),): v for k, v in constexprs.items()}
    src = ASTSource(fn=fn, signature=sig, constexprs=constants, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=opts)


def programs_per_sm(res: dict[str, int], num_warps: int) -> int:
    """Resident programs per Hopper SM as registers (64K, allocated per warp in units of 256) and shared
    memory (228 KB; cuobjdump's static SHARED is the 1 KB reserved per program) allow, at most 64 warps."""
    per_warp = -(-max(res["reg"], 1) * 32 // 256) * 256
    by_regs = 65536 // (per_warp * num_warps)
    by_smem = 233472 // (res["dynamic_shared"] + max(res["shared"], 1024))
    return min(by_regs, by_smem, 64 // num_warps)


def resources(kernel: Any) -> dict[str, int]:
    """REG / STACK (spill) / SHARED as cuobjdump reports them for a Triton kernel's cubin."""
    return cubin_resources(kernel.asm["cubin"], int(kernel.metadata.shared))


def cuobjdump(cubin: bytes, *flags: str) -> str:
    """cuobjdump (the one Triton ships) on a cubin."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([tool, *flags, f.name], capture_output=True, text=True).stdout


def cubin_resources(cubin: bytes, dynamic_shared: int) -> dict[str, int]:
    out = cuobjdump(cubin, "--dump-resource-usage")
    fields = next((ln for ln in out.splitlines() if "REG:" in ln), "")
    got = dict(tok.split(":", 1) for tok in fields.split() if ":" in tok)
    res = {k.lower(): int(got.get(k, 0)) for k in ("REG", "STACK", "SHARED")}
    res["dynamic_shared"] = dynamic_shared
    res.update(sass_counts(cubin))
    return res


SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
SASS_CLASSES = {
    "mma": ("HMMA", "HGMMA", "IMMA"),
    "fp32": ("FFMA", "FMUL", "FADD", "FMNMX", "FSEL", "FSETP", "FRND", "MUFU"),
    "ld_global": ("LDG",),
    "smem": ("LDS", "STS", "LDSM"),
    "local": ("LDL", "STL"),
}


def sass_counts(cubin: bytes) -> dict[str, int]:
    """Static SASS instruction counts (NOPs excluded), for the whole kernel and for its largest loop
    (the span of the longest backward branch): per class in SASS_CLASSES, `instrs` and `loop_*`."""
    out = cuobjdump(cubin, "-sass")
    ins = []  # (address, opcode, operands)
    for m in SASS_LINE.finditer(out):
        ins.append((int(m.group(1), 16), m.group(3), m.group(4)))
    loop = (0, -1)
    for addr, op, args in ins:
        tgt = re.search(r"0x([0-9a-f]+)", args) if op == "BRA" else None
        if tgt and int(tgt.group(1), 16) < addr and addr - int(tgt.group(1), 16) > loop[1] - loop[0]:
            loop = (int(tgt.group(1), 16), addr)

    def count(sel: list[tuple[int, str, str]]) -> dict[str, int]:
        ops = [op.split(".")[0] for _, op, _ in sel if not op.startswith("NOP")]
        c = {"instrs": len(ops)}
        for name, prefixes in SASS_CLASSES.items():
            c[name] = sum(op in prefixes for op in ops)
        return c

    res = count(ins)
    res.update({f"loop_{k}": v for k, v in count([i for i in ins if loop[0] <= i[0] <= loop[1]]).items()})
    return res


def launch_ints(fmt_name: str, decode: bool, args: argparse.Namespace) -> dict[str, int]:
    """Integer arguments as a launch on the benchmark shape passes them (decode batch 64 at 32K, one 8K
    prefill; q/k/v views of a fused qkv tensor), for the JIT's multiple-of-16 specialization."""
    fmt, d, hq, hkv, page = get_format(fmt_name), args.head_dim, args.q_heads, args.kv_heads, 16
    slot, row = fmt.slot_bytes(d), (hq + 2 * hkv) * d
    return dict(
        num_seqs=64 if decode else 1, stride_qt=row, stride_qh=d, stride_ot=0 if decode else hq * d,
        stride_oh=0 if decode else d, stride_cb=hkv * page * slot, stride_ch=page * slot, stride_co=slot,
        stride_bt=32768 // page, stride_cs=d, rope_rows=131072, block_size=page, v_offset=fmt.key_bytes(d),
        num_tokens=64 if decode else 8192, search_steps=7 if decode else 1, stride_kn=row, stride_kh=d,
        stride_vn=row, stride_vh=d, norm_offset=max(fmt.key.norm_offset(d), 0),
    )  # fmt: skip


def attention_kernel(fmt_name: str, decode: bool, args: argparse.Namespace) -> dict[str, Any]:
    fmt, d, g = get_format(fmt_name), args.head_dim, args.q_heads // args.kv_heads
    segments = 16 if decode else 1
    block_m = max(16, triton.next_power_of_2(g)) if decode else 64
    c = dict(
        G=g, BLOCK_Q=1 if decode else max(1, block_m // g), BLOCK_M=block_m, HALF=d // 2,
        CK=fmt.key.channels, GK=d // fmt.key.channels, CV=fmt.value.channels, GV=d // fmt.value.channels,
        IS_NEOX=True, HAS_ROPE=True, BLOCK_N=args.block_n or (32 if decode else 64), NUM_SEGMENTS=segments,
        IEEE=False, HEAD_MAJOR=True, ABLATE=0, ROPE_SPLIT=args.rope_split or not decode,
        K_PARTS=args.k_parts or (2 if decode else 1), KEY_NORM=fmt.key.norm_offset(d) >= 0,
        NORM_ON_KEYS=args.norm_on == "keys" if args.norm_on else not decode,
    )  # fmt: skip  # paged_attention's defaults
    out_t = "*fp32" if segments > 1 else "*bf16"
    ptr = dict(
        q_ptr="*bf16", out_ptr=out_t, ml_ptr="*fp32", cache_ptr="*u8", kcb_ptr="*bf16", vcb_ptr="*bf16",
        block_table_ptr="*i32", seq_lens_ptr="*i32", qsl_ptr="*i32", cos_sin_ptr="*fp32",
    )  # fmt: skip
    stages = args.num_stages or (1 if not decode else 2 if fmt.key.norm else 3)  # paged_attention's
    k = compile_aot(
        attention._cq_attention_kernel, ptr, c, {"qk_scale"}, args.arch, ints=launch_ints(fmt_name, decode, args),
        num_warps=args.num_warps, num_stages=stages,
    )  # fmt: skip
    return dict(kernel="attention", kind="decode" if decode else "prefill", block_n=c["BLOCK_N"], **resources(k))


def tq_attention_kernel(name: str, decode: bool, args: argparse.Namespace) -> dict[str, Any]:
    """KVTQ attention as `kvtq/triton_ops.paged_attention` launches it (key tile 32, 4 warps, Triton's
    default 3 stages), `name` = format[:variant]."""
    fmt_name, _, variant = name.partition(":")
    fmt, d, g = get_format(fmt_name), args.head_dim, args.q_heads // args.kv_heads
    lw_k, lw_v = tq.levelwise_sides(TQ_VARIANTS[variant], fmt.key, fmt.value, d)
    segments = 16 if decode else 1
    block_m = max(16, triton.next_power_of_2(g)) if decode else max(16, triton.next_power_of_2(g), 64)
    c = dict(
        G=g, D=d, LK=fmt.key.levels, GK=fmt.key.group, LV=fmt.value.levels, GV=fmt.value.group,
        NB=fmt.key.digit_bytes(d), BLOCK_Q=1 if decode else max(1, block_m // g), BLOCK_M=block_m,
        BLOCK_N=args.block_n or 32, NUM_SEGMENTS=segments, IEEE=False, LEVELWISE_K=lw_k, LEVELWISE_V=lw_v,
    )  # fmt: skip
    ptr = dict(
        q_ptr="*bf16", out_ptr="*fp32" if segments > 1 else "*bf16", ml_ptr="*fp32", cache_ptr="*u8",
        block_table_ptr="*i32", seq_lens_ptr="*i32", qsl_ptr="*i32",
    )  # fmt: skip
    k = compile_aot(
        tq._tq_attention_kernel, ptr, c, {"qk_scale"}, args.arch, num_warps=args.num_warps,
        num_stages=args.num_stages or 3,
    )  # fmt: skip
    return dict(kernel="attention", kind="decode" if decode else "prefill", block_n=c["BLOCK_N"], **resources(k))


def tq_write_kernel(name: str, args: argparse.Namespace) -> dict[str, Any]:
    fmt, d = get_format(name.partition(":")[0]), args.head_dim
    nb = fmt.key.digit_bytes(d)
    c = dict(
        D=d, LK=fmt.key.levels, GK=fmt.key.group, LV=fmt.value.levels, GV=fmt.value.group, NB=nb,
        NB_PAD=triton.next_power_of_2(nb),
    )  # fmt: skip
    ptr = dict(k_ptr="*bf16", v_ptr="*bf16", cache_ptr="*u8", slot_ptr="*i64")
    k = compile_aot(tq._write_kernel, ptr, c, set(), args.arch, num_warps=4)
    return dict(kernel="write", kind="", block_n=None, **resources(k))


def window_kernel(decode: bool, args: argparse.Namespace) -> dict[str, Any]:
    """The recent window's exact part plus the merge of the code part's 16 (decode) or 2 segments."""
    d, g = args.head_dim, args.q_heads // args.kv_heads
    block_m = max(16, triton.next_power_of_2(g)) if decode else 64
    c = dict(
        G=g, BLOCK_Q=1 if decode else max(1, block_m // g), BLOCK_M=block_m, D=d, BLOCK_N=args.block_n or 32,
        NUM_SEGMENTS=16 if decode else 2, IEEE=False,
    )  # fmt: skip
    ptr = dict(
        q_ptr="*bf16", out_ptr="*bf16", part_ptr="*fp32", ml_ptr="*fp32", win_ptr="*bf16", wbt_ptr="*i32",
        seq_lens_ptr="*i32", qsl_ptr="*i32",
    )  # fmt: skip
    hkv, page = args.kv_heads, 16
    ints = dict(
        num_seqs=64 if decode else 1, stride_qt=(args.q_heads + 2 * hkv) * d, stride_qh=d, stride_ot=args.q_heads * d,
        stride_oh=d, stride_wb=hkv * page * 2 * d, stride_wh=page * 2 * d, stride_wo=2 * d, stride_wbt=32768 // page,
        W=128, win_block_size=page,
    )  # fmt: skip
    k = compile_aot(window_triton._window_merge_kernel, ptr, c, {"qk_scale"}, args.arch, ints=ints, num_warps=4)
    return dict(kernel="window", kind="decode" if decode else "prefill", block_n=c["BLOCK_N"], **resources(k))


def kernels_of(name: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Decode and prefill attention, and the write (not for level-wise names: the write is shared)."""
    if get_format(name.partition(":")[0]).family == "tq":
        rows = [tq_attention_kernel(name, True, args), tq_attention_kernel(name, False, args)]
        return rows + ([] if ":" in name else [tq_write_kernel(name, args)])
    return [attention_kernel(name, True, args), attention_kernel(name, False, args), *write_kernels(name, args)]


def write_kernels(fmt_name: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The write kernel as a decode step launches it and as a prefill-sized step does (`write.py`'s
    LARGE_* settings where every group is a matmul), the prefill step's group-loop form, and both steps
    with the packed argmin (`write.PACKED_ARGMIN`)."""
    fmt, d = get_format(fmt_name), args.head_dim
    ck, cv = fmt.key.channels, fmt.value.channels
    ptr = dict(
        k_ptr="*bf16", v_ptr="*bf16", kcb_ptr="*fp32", vcb_ptr="*fp32", cache_ptr="*u8", slot_ptr="*i64",
        qsl_ptr="*i32", seq_lens_ptr="*i32", cos_sin_ptr="*fp32",
    )  # fmt: skip
    ints = launch_ints(fmt_name, True, args)
    rows = []
    launches = [
        ("decode", 1, None, False),
        ("prefill", write.LARGE_STEP, None, False),
        ("prefill", write.LARGE_STEP, True, False),
        ("decode", 1, None, True),
        ("prefill", write.LARGE_STEP, None, True),
    ]
    for kind, n, loop, packed in launches:
        block_t, warps, prec, matmul_c, group_loop = write.launch_settings(n, ck, cv)
        group_loop = group_loop if loop is None else loop
        c = dict(
            GK=d // ck, CK=ck, GV=d // cv, CV=cv, HALF=d // 2, HAS_ROPE=True, IS_NEOX=True, BLOCK_T=block_t,
            KEY_NORM=fmt.key.norm_offset(d) >= 0, D_P2=triton.next_power_of_2(d), PRECISION=prec, MATMUL_C=matmul_c,
            GROUP_LOOP=group_loop, PACKED=packed,
        )  # fmt: skip
        k = compile_aot(write._write_kv_kernel, ptr, c, set(), args.arch, ints=ints, num_warps=warps)
        name = f"write {block_t} {prec}" + (" group loop" if group_loop else "") + (" packed" if packed else "")
        rows.append(dict(kernel=name, kind=kind, block_n=None, num_warps=warps, **resources(k)))
    return rows


def cuda_kernels_of(name: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The CUDA kernels (decode_cuda.cu, prefill_cuda.cu) as the dispatch would build them for this shape,
    compiled by NVRTC (needs cuda-bindings and nvidia-cuda-nvrtc, the [test] extra)."""
    from vllm_cq.kernels.cq import cuda_build, decode_cuda, prefill_cuda

    fmt, d, g = get_format(name), args.head_dim, args.q_heads // args.kv_heads
    ck, cv = fmt.key.codebook_shape(1, d)[2], fmt.value.codebook_shape(1, d)[2]
    rows = []
    layout = (fmt.slot_bytes(d), 16) if cuda_build.SPECIALIZE_LAYOUT else (0, 0)  # vLLM's pages of 16
    if decode_cuda.shape_ok(g, d, ck, cv):
        inst = decode_cuda.Instance(
            g, d, ck, cv, True, decode_cuda.DEFAULT_ROPE_MODE, slot_bytes=layout[0], page_size=layout[1]
        )
        res = cubin_resources(decode_cuda.compile_cubin(inst, f"sm_{args.arch}")[0], inst.smem_bytes())
        if res["stack"] and inst.fallback() is not None:  # what the dispatch launches instead
            inst = inst.fallback()
            res = cubin_resources(decode_cuda.compile_cubin(inst, f"sm_{args.arch}")[0], inst.smem_bytes())
        rows.append(dict(kernel="cuda attention", kind="decode", block_n=16, num_warps=inst.num_warps, **res))
    if prefill_cuda.shape_ok(g, d, ck, cv):
        inst = prefill_cuda.Instance(g, d, ck, cv, True, True, False, *layout)
        res = cubin_resources(prefill_cuda.compile_cubin(inst, f"sm_{args.arch}")[0], inst.smem_bytes())
        rows.append(dict(kernel="cuda attention", kind="prefill", block_n=prefill_cuda.BLOCK_N, num_warps=8, **res))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--formats", default="cq1,cq2,cq4,cq_k4v1")
    p.add_argument("--arch", type=int, default=90)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--q-heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--block-n", type=int, default=None, help="key tile (default: the kernel's, 32)")
    p.add_argument("--num-warps", type=int, default=4)
    p.add_argument("--num-stages", type=int, default=None)
    p.add_argument("--rope-split", action="store_true", help="the R(P) R(n) rotation (paged_attention's rope_split)")
    p.add_argument(
        "--norm-on", choices=("keys", "scores"), default=None, help="key norms scale (default: paged_attention's)"
    )
    p.add_argument("--k-parts", type=int, default=None, help="key tile parts (default: 2 decode / 4 prefill)")
    p.add_argument("--cuda", action="store_true", help="also the CUDA kernels (decode_cuda.cu, prefill_cuda.cu)")
    args = p.parse_args()
    shape = f"head_dim {args.head_dim}, {args.q_heads}/{args.kv_heads} heads"
    print(f"sm_{args.arch}, triton {triton.__version__}, {shape}")
    cls = list(SASS_CLASSES)
    print(
        "| format | kernel | kind | key tile | registers | spill bytes | dynamic smem | programs/SM | SASS instrs | "
        + " | ".join(cls)
        + " | loop instrs | "
        + " | ".join(f"loop {c}" for c in cls)
        + " |"
    )
    print("|---" * (10 + 2 * len(cls)) + "|")
    rows = [(name, r) for name in args.formats.split(",") for r in kernels_of(name, args)]
    rows += [("(any)", window_kernel(decode, args)) for decode in (True, False)]
    if args.cuda:
        rows += [(name, r) for name in args.formats.split(",") if ":" not in name for r in cuda_kernels_of(name, args)]
    for name, r in rows:
        warps = r.get("num_warps", args.num_warps if r["kernel"] == "attention" else 4)
        print(
            f"| {name} | {r['kernel']} | {r['kind']} | {r['block_n'] or ''} | {r['reg']} | {r['stack']} "
            f"| {r['dynamic_shared']} | {programs_per_sm(r, warps)} "
            f"| {r['instrs']} | "
            + " | ".join(str(r[c]) for c in cls)
            + f" | {r['loop_instrs']} | "
            + " | ".join(str(r[f"loop_{c}"]) for c in cls)
            + " |"
        )


if __name__ == "__main__":
    main()
