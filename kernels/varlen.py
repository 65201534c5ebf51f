"""Triton helper: which sequence of a vLLM varlen batch a program works on, found on the device from
query_start_loc, so launches need no host-side index tensors (CUDA-graph safe)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def find_seq(qsl_ptr, target, num_seqs, BLOCK_Q: tl.constexpr, PER_BLOCK: tl.constexpr):
    """Largest s in [0, num_seqs) with start(s) <= target, by binary search. start(s) = qsl[s] when
    numbering tokens; with PER_BLOCK, query blocks of BLOCK_Q tokens, start(s) = qsl[s] // BLOCK_Q + s
    (the + s gives every sequence at least one block, so a grid of T // BLOCK_Q + S blocks covers all)."""
    lo = 0
    hi = num_seqs - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        v = tl.load(qsl_ptr + mid)
        if PER_BLOCK:
            v = v // BLOCK_Q + mid
        if v <= target:
            lo = mid
        else:
            hi = mid - 1
    return lo
