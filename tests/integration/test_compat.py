"""Pieces of the compatibility layer that no engine test reaches on the CPU line."""

from __future__ import annotations

import dataclasses
import pickle

import pytest
import torch

from vllm_cq.errors import CQConfigError
from vllm_cq.formats import get_format
from vllm_cq.integration import compat
from vllm_cq.integration.backend import CQAttentionImpl, CQAttentionMetadata


def test_cq_page_spec_survives_pickle():
    """vLLM 0.26 with tensor parallelism sends each worker's KV-cache specs to the engine core by
    pickle (2026-11-23, H200 x2: "Can't pickle local object ... CQFullAttentionSpec"); the spec class
    is made at run time, so it must pickle through a module-level function and keep its page size."""
    cls = compat._cq_spec_class_026()
    spec = cls(block_size=16, num_kv_heads=4, head_size=128, dtype=torch.uint8, cq_slot_bytes=32)
    back = pickle.loads(pickle.dumps(spec))
    assert type(back) is cls
    assert back == spec
    assert back.real_page_size_bytes == 16 * 4 * 32
    assert dataclasses.replace(back, block_size=32).real_page_size_bytes == 32 * 4 * 32


def test_pages_the_kernels_cannot_address_stop_the_first_step():
    """A KV page of another block size, slot size or dtype than the kernels address is refused at the
    first forward instead of corrupting silently (e.g. a block table in kernel-block units while the
    tensor has manager blocks)."""
    impl = CQAttentionImpl.__new__(CQAttentionImpl)  # the check needs only the format and the shapes
    impl.fmt, impl.num_kv_heads, impl.head_size = get_format("cq4"), 2, 64
    i32 = torch.zeros(2, dtype=torch.int32)
    md = CQAttentionMetadata(1, 1, i32, i32[:1], i32.view(1, 2), i32[:1].long(), block_size=32)
    impl.check_pages(torch.zeros(5, 2, 32, 64, dtype=torch.uint8), md)  # cq4 at head_dim 64: 64-byte slots
    page = 2 * 32 * 64
    padded = torch.zeros(5 * (page + 32), dtype=torch.uint8).as_strided((5, 2, 32, 64), (page + 32, 32 * 64, 64, 1))
    impl.check_pages(padded, md)  # blocks further apart than their slots (a padded page) are fine
    for bad in (
        torch.zeros(5, 2, 16, 64, dtype=torch.uint8),  # blocks of another size than the block table's
        torch.zeros(5, 2, 32, 32, dtype=torch.uint8),  # another slot size
        torch.zeros(5, 2, 32, 64, dtype=torch.float16),  # not code pages
        torch.zeros(5, 32, 2, 64, dtype=torch.uint8),  # another layout
        torch.zeros(5, 32, 2, 64, dtype=torch.uint8).transpose(1, 2),  # right shape, heads not block-major
        torch.zeros(5, 2, 32, 128, dtype=torch.uint8)[..., :64],  # right shape, slots not dense
    ):
        with pytest.raises(CQConfigError, match="the kernels address"):
            impl.check_pages(bad, md)
