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


def test_rope_table_is_the_models_own_when_the_process_built_another(monkeypatch):
    """vLLM's get_rope cache is per process: after one model (rope_theta 1e4), a second with the same
    head size but rope_theta 5e5, or a longer table, must get its own cos/sin rows, not the first model's
    (which would rotate its keys wrongly with no error)."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers import rotary_embedding as vllm_rope

    from vllm_cq.integration.families import rope_table

    monkeypatch.setattr(vllm_rope, "_ROPE_DICT", {})
    with set_current_vllm_config(VllmConfig()):
        ropes = {
            (theta, pos): vllm_rope.get_rope(32, pos, True, {"rope_theta": theta}, torch.float32)
            for theta, pos in [(1e4, 64), (5e5, 64), (1e4, 128)]
        }
    assert len(vllm_rope._ROPE_DICT) == 3
    cpu = torch.device("cpu")
    rope_table.cache_clear()
    try:
        for (theta, pos), r in ropes.items():
            table, is_neox = rope_table(32, 32, cpu, theta, pos)
            assert is_neox and torch.equal(table, r._compute_cos_sin_cache().float()), (theta, pos)
        assert not torch.equal(rope_table(32, 32, cpu, 1e4, 64)[0], rope_table(32, 32, cpu, 5e5, 64)[0])
        with pytest.raises(CQConfigError, match="exactly one rotary embedding of head size 32, found 2"):
            compat.rotary_embedding(32, 32, cpu, 1e4)  # two lengths of one theta: ambiguous, refused
        with pytest.raises(CQConfigError, match="found 0"):
            compat.rotary_embedding(32, 32, cpu, 1e6, 64)
    finally:
        rope_table.cache_clear()
