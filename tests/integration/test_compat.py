"""Pieces of the compatibility layer that no engine test reaches on the CPU line."""

from __future__ import annotations

import dataclasses
import pickle

import torch

from vllm_cq.integration import compat


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
