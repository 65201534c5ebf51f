"""What every family's `ops.py` decides the same way: whether the Triton kernels may run, and how a
reference result or a missing `max_query_len` is filled in."""

from __future__ import annotations

import os

import torch


def triton_enabled(device: torch.device) -> bool:
    """CUDA tensors take the Triton kernels unless VLLM_CQ_KERNELS=reference (debugging)."""
    return device.type == "cuda" and os.environ.get("VLLM_CQ_KERNELS", "") != "reference"


def into_out(res: torch.Tensor, out: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """A float32 reference result, written into `out` when given, else cast to `dtype`."""
    if out is None:
        return res.to(dtype)
    out.copy_(res)
    return out


def max_query_len_of(query_start_loc: torch.Tensor) -> int:
    """vLLM passes it host-side; callers without it pay one device sync here."""
    return int((query_start_loc[1:] - query_start_loc[:-1]).max())
