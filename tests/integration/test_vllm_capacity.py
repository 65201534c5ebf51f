"""vLLM's own reported KV capacity with cq dtypes vs `auto`, same model, same memory (bf16 model)."""

from __future__ import annotations

from tests.integration.conftest import ENGINE
from vllm_cq.capacity import measure


def test_capacity_matches_the_format_bytes(cq_model):
    engine = {**ENGINE, "dtype": "bfloat16"}
    rows = {r["kv_cache_dtype"]: r for r in measure(cq_model, ["auto", "cq4", "cq2", "cq1", "cq_k4v1"], engine)}
    f = {k: r["factor"] for k, r in rows.items()}
    assert f["cq1"] >= 15 and f["cq2"] >= 7.5 and f["cq4"] >= 3.9, f
    assert 6.0 <= f["cq_k4v1"] <= 6.5, f  # 64 K + 16 V... at head_dim 64: 32 + 8 bytes vs 256
    # same block size everywhere: the gain is in blocks, i.e. in what the scheduler can admit
    assert len({r["block_size"] for r in rows.values()}) == 1
