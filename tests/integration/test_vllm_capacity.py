"""vLLM's own reported KV capacity with plugin dtypes vs `auto`, same model, same memory (bf16 model)."""

from __future__ import annotations


def test_capacity_matches_the_format_bytes(capacity_rows):
    rows = {k: r for k, r in capacity_rows.items() if "+w" not in k}  # codes only (ENGINE's setting)
    assert list(rows)[0] == "auto"
    f = {k: r["factor"] for k, r in rows.items()}
    assert f["cq1"] >= 15 and f["cq2"] >= 7.5 and f["cq4"] >= 3.9, f
    assert 6.0 <= f["cq_k4v1"] <= 6.5, f  # 64 K + 16 V... at head_dim 64: 32 + 8 bytes vs 256
    # cq2n at head_dim 64: 16 B key codes + 2 B float16 norm + 16 B value codes = 34 B vs cq2's 32
    assert abs(f["cq2n"] - 256 / 34) < 0.05 and f["cq2n"] < f["cq2"], f
    # KVTQ at head_dim 64, groups of 32: K 4 levels = 16 B scales + 4 x 13 B digits, V 3 levels = 12 + 39
    # (+1 pad) = 120 B; kvtq1: (4 + 13 + 1) x 2 = 36 B; vs 256 B of bf16 K+V
    assert abs(f["kvtq"] - 256 / 120) < 0.03 and abs(f["kvtq1"] - 256 / 36) < 0.08, f
    # same block size everywhere: the gain is in blocks, i.e. in what the scheduler can admit
    assert len({r["block_size"] for r in rows.values()}) == 1
