"""Compile the kernels of prefill and mixed steps during vLLM's profiling run, not on the first request.

vLLM's start-up runs the model once without attention metadata (profiling) and, with CUDA graphs,
captures decode steps: the decode kernels are compiled then, but nothing runs a prefill through the cq
kernels, so the first long prompt of an engine paid for compiling them (the write's prefill-step form,
the prefill attention, the window merge; vLLM 0.26's JIT monitor warned of it on the H200, 2026-12-03).
At the profiling run the backend calls `warm_up` once per layer shape: one synthetic mixed step (a
decode token and a prompt of `write.LARGE_STEP` tokens) and one decode-only step go through the family's
own write and attention on scratch pages, with the layer's codebooks and its recent window if it has
one. Integer sizes are not specialized on (`do_not_specialize`), so these are the variants real steps
launch. A warm-up that fails only costs the first step its compiles: it logs a warning and goes on.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from vllm_cq.kernels.cq import write as cq_write
from vllm_cq.kernels.window import WindowCache, write_window

logger = logging.getLogger(__name__)
_DONE: set[tuple] = set()


def synthetic_step(seqs: list[tuple[int, int]], block_size: int, device: torch.device) -> Any:
    """The backend's metadata (`CQAttentionMetadata`) of a batch of (context + new tokens, new tokens) per
    sequence, decodes first as vLLM orders them; each sequence owns consecutive blocks; the new tokens'
    slots are their positions' slots."""
    from vllm_cq.integration.backend import CQAttentionMetadata  # the backend imports this module

    blocks = [-(-length // block_size) for length, _ in seqs]
    table = torch.zeros(len(seqs), max(blocks), dtype=torch.int32)
    slots, start = [], 0
    for s, ((length, q_len), nb) in enumerate(zip(seqs, blocks, strict=True)):
        table[s, :nb] = torch.arange(start, start + nb, dtype=torch.int32)
        pos = torch.arange(length - q_len, length)
        slots.append(table[s, pos // block_size].long() * block_size + pos % block_size)
        start += nb
    q_lens = torch.tensor([q for _, q in seqs])
    qsl = torch.cat([torch.zeros(1, dtype=torch.long), q_lens.cumsum(0)]).to(torch.int32)
    leading = next((i for i, q in enumerate(q_lens.tolist()) if q != 1), len(seqs))
    return CQAttentionMetadata(
        num_actual_tokens=int(qsl[-1]),
        max_query_len=int(q_lens.max()),
        query_start_loc=qsl.to(device),
        seq_lens=torch.tensor([length for length, _ in seqs], dtype=torch.int32, device=device),
        block_table=table.to(device),
        slot_mapping=torch.cat(slots).to(device),
        block_size=block_size,
        num_decodes=leading,
    )


def run_steps(
    family: Any,
    state: Any,
    num_heads: int,
    num_kv_heads: int,
    head_size: int,
    slot_bytes: int,
    dtype: torch.dtype,
    device: torch.device,
    block_size: int = 16,
    window: tuple[int, int] | None = None,
) -> list[torch.Tensor]:
    """A mixed step (one decode token after 17 tokens, a prompt of LARGE_STEP tokens) and a decode-only
    step (two sequences) through `family`'s write and attention on scratch pages; `window` = (W, window
    page size) adds the recent window's pages. Returns the attention outputs (for tests)."""
    prompt = max(cq_write.LARGE_STEP, 2 * block_size)
    outs = []
    for seqs in ([(18, 1), (prompt, prompt)], [(prompt + 1, 1), (40, 1)]):
        md = synthetic_step(seqs, block_size, device)
        num_blocks = int(md.block_table.max()) + 1
        n = md.num_actual_tokens
        cache = torch.zeros(num_blocks, num_kv_heads, block_size, slot_bytes, dtype=torch.uint8, device=device)
        gen = torch.Generator(device="cpu").manual_seed(0)
        heads = (num_heads, num_kv_heads, num_kv_heads)
        q, k, v = (torch.randn(n, h, head_size, generator=gen).to(device, dtype) for h in heads)
        win = None
        if window is not None:
            w, wbs = window
            wmd = synthetic_step(seqs, wbs, device)
            blocks_w = int(wmd.block_table.max()) + 1
            win_cache = torch.zeros(blocks_w, num_kv_heads, wbs, 2 * head_size, dtype=dtype, device=device)
            write_window(win_cache, k, v, wmd.slot_mapping)
            win = WindowCache(w, win_cache, wmd.block_table)
        family.write(state, k, v, cache, md)
        out = torch.zeros(n, num_heads, head_size, dtype=dtype, device=device)
        family.attend(state, q, cache, md, out, window=win)
        outs.append(out)
    return outs


def warm_up(impl: Any, layer: Any, state: Any, dtype: torch.dtype, device: torch.device) -> None:
    """Once per process and layer shape, on CUDA: `run_steps` with this layer's codebooks and window."""
    shadow = getattr(layer, "_vllm_cq_window", None)
    window = (shadow.window, shadow.block_size) if shadow is not None else None
    key = (impl.fmt.name, impl.num_heads, impl.num_kv_heads, impl.head_size, dtype, str(device), window)
    if device.type != "cuda" or key in _DONE or torch.cuda.is_current_stream_capturing():
        return
    _DONE.add(key)
    try:
        run_steps(
            impl.family, state, impl.num_heads, impl.num_kv_heads, impl.head_size,
            impl.fmt.slot_bytes(impl.head_size), dtype, device,
            block_size=getattr(shadow, "cq_block_size", 16) if shadow is not None else 16, window=window,
        )  # fmt: skip
        torch.cuda.synchronize(device)
    except Exception as e:  # noqa: BLE001 - a failed warm-up costs only the first step's compiles
        logger.warning("vllm-cq: kernel warm-up for %s failed (%s: %s); the first steps compile instead",
                       impl.fmt.name, type(e).__name__, e)  # fmt: skip
