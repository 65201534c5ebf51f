"""The bf16 "recent window" (docs/design/recent-window.md): the last W tokens of each sequence kept
exactly, in a second paged cache beside the codes, so a query at position i attends keys
i - W < j <= i exactly and only older keys j <= i - W over codes (one softmax over both).

Window cache layout (what vLLM allocates for the window's `SlidingWindowSpec` through
`CQWindowBackend`): `[num_blocks_w, num_kv_heads, block_size_w, 2 * head_dim]` in the model dtype,
K (post-RoPE, as vLLM hands keys over) in `[..., :D]`, V in `[..., D:]`; flat slot id =
block * block_size_w + offset. vLLM frees window blocks that are entirely older than
`num_computed_tokens - W + 1` and points the block table at its null block (id 0, garbage), so a
reader must not look below the first query's window.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_cq.kernels.dense import attend_last_queries_windowed
from vllm_cq.kernels.dispatch import triton_enabled


@dataclass(frozen=True)
class WindowCache:
    """One layer's recent window for one step: W, the window's paged cache and its block table.

    `block_table` [num_seqs, max_blocks_w] int32 is the window group's table, row s for the same
    sequence as the codes' block table row s (same `seq_lens`, `query_start_loc`)."""

    W: int
    kv_cache: torch.Tensor
    block_table: torch.Tensor

    def __post_init__(self) -> None:
        if self.W < 1:
            raise ValueError(f"recent window W={self.W}: must be >= 1 (no window is `window=None`)")
        if self.kv_cache.dim() != 4 or self.kv_cache.shape[-1] % 2:
            raise ValueError(f"window cache shape {tuple(self.kv_cache.shape)}: want [blocks, heads, block, 2*D]")
        if self.block_table.dim() != 2:
            raise ValueError(f"window block table shape {tuple(self.block_table.shape)}: want [seqs, blocks]")

    @property
    def block_size(self) -> int:
        return self.kv_cache.shape[2]

    @property
    def head_dim(self) -> int:
        return self.kv_cache.shape[3] // 2

    def gather(self, seq: int, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact keys and values [end - start, Hkv, D] (cache dtype) of sequence `seq`'s positions
        start..end-1. Reads only those entries: callers keep `start` inside the live window."""
        pos = torch.arange(start, end, device=self.kv_cache.device)
        bs = self.block_size
        rows = self.kv_cache[self.block_table[seq, pos // bs].long(), :, pos % bs]  # [n, Hkv, 2D]
        d = self.head_dim
        return rows[..., :d], rows[..., d:]


def write_window(
    window_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Store key/value [N, Hkv, D] (post-RoPE keys, as vLLM hands them over) exactly into the window
    cache at slot_mapping[n] = block * block_size_w + offset (-1 = skip: padding, or no window slot).
    The backend calls this for every new token before attending, so a query's own window is present.
    CUDA tensors take the Triton copy (`window_triton.write_window`: no host sync), others the reference."""
    d = key.shape[-1]
    if window_cache.shape[-1] != 2 * d:
        raise ValueError(f"window cache last dim {window_cache.shape[-1]} != 2 * head_dim {2 * d}")
    if triton_enabled(key.device) and d & (d - 1) == 0 and key.stride(2) == 1 and value.stride(2) == 1:
        from vllm_cq.kernels.window_triton import write_window as triton_write_window

        triton_write_window(window_cache, key, value, slot_mapping)
        return
    write_window_reference(window_cache, key, value, slot_mapping)


def write_window_reference(
    window_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """`write_window` in plain torch (selecting the valid slots waits for the device)."""
    d = key.shape[-1]
    valid = slot_mapping >= 0
    slots = slot_mapping[valid].long()
    bs = window_cache.shape[2]
    blocks, offsets = slots // bs, slots % bs
    window_cache[blocks, :, offsets, :d] = key[valid].to(window_cache.dtype)
    window_cache[blocks, :, offsets, d:] = value[valid].to(window_cache.dtype)


def code_and_window_ranges(seq_len: int, num_queries: int, W: int) -> tuple[int, int]:
    """(n_old, win_start) for a sequence's last `num_queries` of `seq_len` positions: the codes are
    needed for positions 0..n_old-1 (the last query's j <= i - W), the window for win_start..seq_len-1
    (the first query's i - W < j). This is all a step may read: vLLM keeps every window block from
    the first query's window on (it frees below num_computed_tokens - W + 1), older ones are null."""
    return max(0, seq_len - W), max(0, seq_len - num_queries - W + 1)


def attend_with_window(
    q: torch.Tensor,
    k_old: torch.Tensor,
    v_old: torch.Tensor,
    window: WindowCache,
    seq: int,
    seq_len: int,
    scale: float,
) -> torch.Tensor:
    """Sequence `seq`'s last queries q [Q, Hq, D] over its codes' keys/values k_old, v_old
    [n_old, Hkv, D] (positions 0..n_old-1, n_old from `code_and_window_ranges`, already dequantized
    and rotated) and its exact window; one softmax. Returns float32 [Q, Hq, D]."""
    _, win_start = code_and_window_ranges(seq_len, q.shape[0], window.W)
    k_win, v_win = window.gather(seq, win_start, seq_len)
    ratio = q.shape[1] // k_win.shape[1]
    return attend_last_queries_windowed(
        q,
        k_old.repeat_interleave(ratio, dim=1),
        v_old.repeat_interleave(ratio, dim=1),
        k_win.repeat_interleave(ratio, dim=1),
        v_win.repeat_interleave(ratio, dim=1),
        seq_len,
        window.W,
        scale,
    )
