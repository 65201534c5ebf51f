"""NVRTC build, load and launch of this package's CUDA kernels (`*.cu` beside this file, sharing
`cq_common.cuh`). Compiling needs no GPU (CI compiles every instance for sm_90 on a CPU machine);
loading goes into the device's primary context, which torch makes current, and launches go on
torch's current stream, so vLLM's CUDA graphs capture them like any other kernel."""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

HERE = Path(__file__).parent
HEADERS = ("cq_common.cuh", "prefill_common.cuh", "wgmma.cuh")


@functools.cache
def toolchain_available() -> bool:
    """cuda-bindings (NVRTC and the driver API) importable; warns once when not, since the cq kernels
    then take the Triton path, 4x slower for decode at long contexts."""
    try:
        from cuda.bindings import driver, nvrtc  # noqa: F401
    except ImportError as e:
        logging.getLogger("vllm_cq").warning(
            "vllm-cq: %s; cq decode attention falls back to the slower Triton kernel "
            "(install the CUDA kernel's toolchain: pip install 'vllm-cq[gpu]' or cuda-bindings)",
            e,
        )
        return False
    return True


def kernel_choice(env_var: str, choice: str | None, variants: Sequence[str] = ()) -> str:
    """`choice`, else the environment variable `env_var`: "" (the default), "cuda", "triton" or one of the
    CUDA kernel's `variants`."""
    choice = choice or os.environ.get(env_var, "")
    allowed = ("", "cuda", "triton", *variants)
    if choice not in allowed:
        raise ValueError(f"{env_var}={choice!r}: expected one of {', '.join(repr(a) for a in allowed[1:])}")
    return choice


def kernel_chosen(env_var: str, choice: str | None, verified: bool, variants: Sequence[str] = ()) -> bool:
    """Whether a CUDA kernel runs: `choice` (else the environment variable `env_var`) "cuda" (or a variant)
    or "triton" decides; neither, the kernel runs once its GPU tests have passed (`verified`)."""
    choice = kernel_choice(env_var, choice, variants)
    return choice in ("cuda", *variants) or (choice != "triton" and verified)


# mma.sync m16n8k16 in bf16 and ldmatrix, which both kernels use, need sm_80 or later
MIN_CAPABILITY = (8, 0)


@functools.cache
def max_smem_optin(device_index: int) -> int:
    """The dynamic shared memory one CTA may opt in to on this device (227 KB on H100/H200, 163 KB on
    A100, 99 KB on sm_86/sm_89 GPUs such as the A10, L4, L40S)."""
    from cuda.bindings import driver

    check(driver.cuInit(0), "cuInit")
    dev = check(driver.cuDeviceGet(device_index), "cuDeviceGet")
    attr = driver.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN
    return int(check(driver.cuDeviceGetAttribute(attr, dev), "cuDeviceGetAttribute"))


def device_fits(device_index: int, smem_bytes: int) -> bool:
    """Whether a kernel needing `smem_bytes` of dynamic shared memory can run on the device. When not,
    the dispatch takes the Triton kernels instead of failing at the first launch (the codebooks alone are
    128 KB at head_dim 128, more than sm_86/sm_89 GPUs give a CTA)."""
    if torch.cuda.get_device_capability(device_index) < MIN_CAPABILITY:
        return False
    return smem_bytes <= max_smem_optin(device_index)


# The page layout (the cache's token stride and page size) compiled into each kernel instance as constants,
# taken from the cache tensor of the launch: code loads' offsets become immediates and page arithmetic
# shifts, and the decode kernel's pipeline loads run unguarded (decode_cuda.cu's STEADY_LOADS). sm_90 SASS
# (2026-12-04, CPU-measured): cq1's decode loop 416 -> 338 instructions per 16-key step, the wsp prefill
# producers' loop 237 -> 202 per 64-key tile. On by default since 2026-12-04 (H200): every prefill and decode
# kernel test passed with it (474), and with persistent decode CTAs it made decode 16x1K 0.041 -> 0.021 ms and
# prefill 8K cq1 1.657 -> 1.582 ms (benchmarks/results/attention-h200-2026-12-04-s13a.json); the tiny-model
# full-graph vLLM tests passed with both (2026-12-04 c). VLLM_CQ_LAYOUT_CONSTANTS=0: one build per shape,
# the layout read from the kernel arguments.
LAYOUT_ENV = "VLLM_CQ_LAYOUT_CONSTANTS"
SPECIALIZE_LAYOUT = os.environ.get(LAYOUT_ENV, "1") == "1"


def layout_of(kv_cache: torch.Tensor, specialize: bool | None = None) -> tuple[int, int]:
    """(token stride in bytes, tokens per page) of a [blocks, heads, page, slot] cache to compile in, or
    (0, 0) to read them from the arguments (`specialize`, else SPECIALIZE_LAYOUT)."""
    on = SPECIALIZE_LAYOUT if specialize is None else specialize
    return (kv_cache.stride(2), kv_cache.shape[2]) if on else (0, 0)


def layout_defines(slot_bytes: int, page_size: int) -> list[str]:
    """-D macros of a compiled-in page layout (cq_common.cuh's `layout_constants`); none for zeros."""
    out = [f"-DSLOT_BYTES={slot_bytes}"] if slot_bytes else []
    if page_size:
        assert page_size & (page_size - 1) == 0, "pages of a power-of-two size"
        out += [f"-DPAGE_SIZE={page_size}", f"-DPAGE_SHIFT={page_size.bit_length() - 1}"]
    return out


def check_index_dtypes(*tensors: torch.Tensor) -> None:
    """Block table, seq_lens and query_start_loc are int32 (what vLLM passes; the kernels read int)."""
    assert all(x.dtype == torch.int32 for x in tensors), "int32 block table, seq_lens and query_start_loc"


def check(res, what: str):
    """cuda-bindings returns (status, *values): raise on a non-success status."""
    status, *values = res if isinstance(res, tuple) else (res,)
    if int(status) != 0:
        raise RuntimeError(f"vllm-cq CUDA kernel: {what} failed ({status})")
    return values[0] if len(values) == 1 else values


def compile_cubin(source: str, defines: Sequence[str], arch: str, verbose: bool = False) -> tuple[bytes, str]:
    """NVRTC: HERE/source with -D `defines` -> (cubin for `arch`, e.g. "sm_90", and the compile log)."""
    from cuda.bindings import nvrtc

    headers = [(HERE / h).read_bytes() for h in HEADERS]
    names = [h.encode() for h in HEADERS]
    prog = check(
        nvrtc.nvrtcCreateProgram((HERE / source).read_bytes(), source.encode(), len(headers), headers, names),
        "nvrtcCreateProgram",
    )
    try:
        opts = ["-std=c++17", f"--gpu-architecture={arch}", "--use_fast_math", *defines]
        if verbose:
            opts.append("--ptxas-options=-v")
        status = nvrtc.nvrtcCompileProgram(prog, len(opts), [o.encode() for o in opts])[0]
        size = check(nvrtc.nvrtcGetProgramLogSize(prog), "nvrtcGetProgramLogSize")
        log = b" " * size
        check(nvrtc.nvrtcGetProgramLog(prog, log), "nvrtcGetProgramLog")
        log_s = log.decode(errors="replace").rstrip("\x00 \n")
        if int(status) != 0:
            raise RuntimeError(f"vllm-cq CUDA kernel {source} {' '.join(defines)} does not compile:\n{log_s}")
        size = check(nvrtc.nvrtcGetCUBINSize(prog), "nvrtcGetCUBINSize")
        cubin = b" " * size
        check(nvrtc.nvrtcGetCUBIN(prog, cubin), "nvrtcGetCUBIN")
        return cubin, log_s
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


CACHE_ENV = "VLLM_CQ_CACHE_DIR"


def cache_dir() -> Path | None:
    """Where compiled cubins are kept between processes: VLLM_CQ_CACHE_DIR ("" turns the cache off),
    else $XDG_CACHE_HOME/vllm_cq, else ~/.cache/vllm_cq. Like Triton's kernel cache, it saves every engine
    start (and every tensor-parallel worker) from compiling the same kernels again; about 0.6-0.9 s per
    kernel instance on a 2-core x86 machine, several instances per model."""
    root = os.environ.get(CACHE_ENV)
    if root is None:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "vllm_cq")
    return Path(root) / "cubin" if root else None


def cubin_key(source: str, defines: Sequence[str], arch: str) -> str:
    """Hash of everything a cubin depends on: the kernel source, the shared headers, the -D macros, the
    architecture and the NVRTC version."""
    from cuda.bindings import nvrtc

    h = hashlib.sha256()
    for part in (source, *HEADERS, arch, *defines, repr(check(nvrtc.nvrtcVersion(), "nvrtcVersion"))):
        h.update(part.encode() + b"\0")
    for name in (source, *HEADERS):
        h.update((HERE / name).read_bytes() + b"\0")
    return h.hexdigest()


def cached_cubin(source: str, defines: Sequence[str], arch: str, rebuild: bool = False) -> bytes:
    """`compile_cubin`'s cubin, from the on-disk cache when an identical build is there (unless
    `rebuild`); a new build is stored atomically (a temporary file, then a rename), so concurrent
    workers never read half a file. A cache that cannot be read or written only costs the compile."""
    where = cache_dir()
    path = where / f"{cubin_key(source, defines, arch)}.cubin" if where is not None else None
    if path is not None and not rebuild:
        try:
            return path.read_bytes()
        except OSError:
            pass
    cubin, _ = compile_cubin(source, defines, arch)
    if path is not None:
        tmp = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=path.parent, delete=False, suffix=".tmp") as f:
                tmp = f.name
                f.write(cubin)
            os.replace(tmp, path)
        except OSError as e:
            logging.getLogger("vllm_cq").debug("vllm-cq: cubin cache %s not written: %s", where, e)
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)
    return cubin


def ptxas_report(log: str) -> dict[str, int]:
    """Registers and spill bytes from a `--ptxas-options=-v` compile log (-1 registers: no report)."""
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.findall(r"(\d+) bytes spill (?:stores|loads)", log)
    return {"registers": int(regs.group(1)) if regs else -1, "spill_bytes": sum(int(s) for s in spill)}


def _make_primary_context_current(device_index: int) -> None:
    """Make the device's primary context (the one torch uses) current on this thread where none is.
    torch creates it lazily, at the first CUDA tensor or stream use, not at `torch.cuda.init()`: a module
    loaded before that failed with CUDA_ERROR_INVALID_CONTEXT (H200, 2026-12-04, a fresh pytest
    process whose first CUDA call was a kernel load)."""
    from cuda.bindings import driver

    if int(check(driver.cuCtxGetCurrent(), "cuCtxGetCurrent")) != 0:
        return
    device = check(driver.cuDeviceGet(device_index), "cuDeviceGet")
    context = check(driver.cuDevicePrimaryCtxRetain(device), "cuDevicePrimaryCtxRetain")  # torch's, kept for life
    check(driver.cuCtxSetCurrent(context), "cuCtxSetCurrent")


@functools.cache
def load(source: str, defines: tuple[str, ...], kernel: str, smem_bytes: int, device_index: int, arch_suffix: str = ""):
    """Compile for the device's architecture (`arch_suffix` "a": its architecture-specific features, e.g.
    sm_90a's wgmma) and load (once per build and device): (module, CUfunction)."""
    from cuda.bindings import driver

    major, minor = torch.cuda.get_device_capability(device_index)
    arch = f"sm_{major}{minor}{arch_suffix}"
    check(driver.cuInit(0), "cuInit")
    _make_primary_context_current(device_index)
    status, module = driver.cuModuleLoadData(cached_cubin(source, defines, arch))
    if int(status) != 0:  # a damaged cache entry: build it again
        module = check(driver.cuModuleLoadData(cached_cubin(source, defines, arch, rebuild=True)), "cuModuleLoadData")
    func = check(driver.cuModuleGetFunction(module, kernel.encode()), "cuModuleGetFunction")
    attr = driver.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
    check(driver.cuFuncSetAttribute(func, attr, smem_bytes), "cuFuncSetAttribute")
    return module, func


def resource_usage(func) -> dict[str, int]:
    """Registers per thread and local (spill) bytes of a loaded kernel, from the driver: NVRTC 13.0's
    log carries no ptxas report."""
    from cuda.bindings import driver

    attrs = driver.CUfunction_attribute
    regs = check(driver.cuFuncGetAttribute(attrs.CU_FUNC_ATTRIBUTE_NUM_REGS, func), "cuFuncGetAttribute")
    local = check(driver.cuFuncGetAttribute(attrs.CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES, func), "cuFuncGetAttribute")
    return {"registers": int(regs), "spill_bytes": int(local)}


def launch(func, grid: tuple[int, int, int], threads: int, smem_bytes: int, device: torch.device, args: list) -> None:
    """cuLaunchKernel on torch's current stream; `args` are ctypes values in the kernel's parameter order."""
    from cuda.bindings import driver

    ptrs = (ctypes.c_void_p * len(args))(*[ctypes.addressof(a) for a in args])
    stream = driver.CUstream(torch.cuda.current_stream(device).cuda_stream)
    check(
        driver.cuLaunchKernel(func, *grid, threads, 1, 1, smem_bytes, stream, ctypes.addressof(ptrs), 0),
        "cuLaunchKernel",
    )


def pointers(*tensors: torch.Tensor) -> list[ctypes.c_void_p]:
    """Kernel pointer arguments, in order."""
    return [ctypes.c_void_p(t.data_ptr()) for t in tensors]


def device_index(t: torch.Tensor) -> int:
    return t.device.index if t.device.index is not None else torch.cuda.current_device()
