"""The on-disk cubin cache of the CUDA kernels (`cuda_build.cached_cubin`): a build is compiled once per
machine, reused by later processes, rebuilt when anything it depends on changes, and a cache that cannot
be written only costs the compile. NVRTC runs on a CPU machine, so all of it is tested here."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from vllm_cq.kernels.cq import cuda_build, decode_cuda

pytest.importorskip("cuda.bindings")

INST = decode_cuda.Instance(4, 128, 8, 8, True, decode_cuda.DEFAULT_ROPE_MODE)
SOURCE, ARCH = decode_cuda.SOURCE, "sm_90"


def counting_compiles(monkeypatch) -> list:
    calls = []
    real = cuda_build.compile_cubin

    def compile_cubin(source, defines, arch, verbose=False):
        calls.append((source, tuple(defines), arch))
        return real(source, defines, arch, verbose)

    monkeypatch.setattr(cuda_build, "compile_cubin", compile_cubin)
    return calls


def test_a_build_is_compiled_once_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv(cuda_build.CACHE_ENV, str(tmp_path))
    calls = counting_compiles(monkeypatch)
    defines = INST.defines()
    first = cuda_build.cached_cubin(SOURCE, defines, ARCH)
    assert first[:4] == b"\x7fELF" and len(calls) == 1
    assert [p.suffix for p in (tmp_path / "cubin").iterdir()] == [".cubin"]  # no temporary file left
    assert cuda_build.cached_cubin(SOURCE, defines, ARCH) == first and len(calls) == 1
    cuda_build.cached_cubin(SOURCE, defines, "sm_80")  # another architecture, another build
    other = [d.replace("-DG=4", "-DG=8") for d in defines]
    assert other != defines
    cuda_build.cached_cubin(SOURCE, other, ARCH)  # another instance, another build
    assert len(calls) == 3
    cuda_build.cached_cubin(SOURCE, defines, ARCH, rebuild=True)  # what load() asks for after a bad entry
    assert len(calls) == 4


def test_the_key_covers_the_sources(monkeypatch, tmp_path):
    """A changed kernel or shared header is a new key (the files are read, not only named)."""
    key = cuda_build.cubin_key(SOURCE, INST.defines(), ARCH)
    for name in (SOURCE, cuda_build.HEADERS[0]):
        copy = tmp_path / name
        copy.write_bytes((cuda_build.HERE / name).read_bytes() + b"\n// edited\n")
        for other in {SOURCE, *cuda_build.HEADERS} - {name}:
            (tmp_path / other).write_bytes((cuda_build.HERE / other).read_bytes())
        monkeypatch.setattr(cuda_build, "HERE", tmp_path)
        assert cuda_build.cubin_key(SOURCE, INST.defines(), ARCH) != key
        monkeypatch.undo()
        copy.write_bytes((cuda_build.HERE / name).read_bytes())


def test_an_unwritable_or_disabled_cache_only_costs_the_compile(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv(cuda_build.CACHE_ENV, str(blocker))  # <file>/cubin cannot be created
    calls = counting_compiles(monkeypatch)
    assert cuda_build.cached_cubin(SOURCE, INST.defines(), ARCH)[:4] == b"\x7fELF"
    monkeypatch.setenv(cuda_build.CACHE_ENV, "")
    assert cuda_build.cache_dir() is None
    assert cuda_build.cached_cubin(SOURCE, INST.defines(), ARCH)[:4] == b"\x7fELF"
    assert len(calls) == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="loads a module: needs a GPU")
def test_a_kernel_loads_before_any_cuda_tensor():
    """A fresh process whose first CUDA call is a kernel load (torch creates its context lazily): the load
    makes the primary context current itself. It failed with CUDA_ERROR_INVALID_CONTEXT before (H200,
    2026-12-04)."""
    code = (
        "from vllm_cq.kernels.cq import cuda_build, decode_cuda\n"
        f"inst = decode_cuda.{INST!r}\n"
        "print(cuda_build.resource_usage(decode_cuda._load(inst, 0)[1])['registers'])\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and int(done.stdout.split()[-1]) > 0, done.stderr[-2000:]
