"""Codebook discovery order and tensor-parallel head slices (no engine needed)."""

from __future__ import annotations

import pytest

from vllm_cq.codebooks import default_codebook_path
from vllm_cq.errors import CodebookError, CQConfigError
from vllm_cq.integration.config import ENV_CODEBOOKS, kv_head_range, resolve_codebook_path


def touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return str(path)


def test_discovery_order(tmp_path, monkeypatch):
    model = tmp_path / "model"
    beside = touch(tmp_path / default_codebook_path("model", "cq1"))
    from_env = touch(tmp_path / "env" / "cq1.safetensors")
    explicit = touch(tmp_path / "explicit.safetensors")
    monkeypatch.delenv(ENV_CODEBOOKS, raising=False)
    assert resolve_codebook_path("cq1", {}, str(model)) == beside
    monkeypatch.setenv(ENV_CODEBOOKS, str(tmp_path / "env"))  # a directory: FMT.safetensors inside
    assert resolve_codebook_path("cq1", {}, str(model)) == from_env
    assert resolve_codebook_path("cq1", {"cq_codebooks": explicit}, str(model)) == explicit
    with pytest.raises(CodebookError, match=r"codebook file from additional_config\[\"cq_codebooks\"\] not found"):
        resolve_codebook_path("cq1", {"cq_codebooks": str(tmp_path / "nope.safetensors")}, str(model))
    monkeypatch.delenv(ENV_CODEBOOKS)
    with pytest.raises(CodebookError, match="no cq2 codebooks.*VLLM_CQ_CODEBOOKS.*vllm-cq calibrate"):
        resolve_codebook_path("cq2", None, str(model))


@pytest.mark.parametrize(
    "world, total, expected",
    [
        (1, 8, [(0, 8)]),
        (2, 8, [(0, 4), (4, 8)]),
        (4, 2, [(0, 1), (0, 1), (1, 2), (1, 2)]),  # more ranks than kv heads: heads are replicated
        (3, 3, [(0, 1), (1, 2), (2, 3)]),
    ],
)
def test_kv_head_range_matches_vllm_split(world, total, expected):
    assert [kv_head_range(r, world, total) for r in range(world)] == expected


def test_kv_head_range_refuses_uneven_splits():
    with pytest.raises(CQConfigError):
        kv_head_range(0, 3, 8)


def test_window_capacity_at_8k():
    """cq1, head_dim 128, bf16, W = 128 at 8K tokens: 32 code blocks of 256 + 9 window blocks of 16 per
    sequence, i.e. the window keeps 32/41 = 78% of the window-less tokens."""
    from vllm_cq.capacity import window_capacity
    from vllm_cq.integration.config import window_block_sizes

    cq_block, win_block = window_block_sizes("cq1", 128, 2)
    assert (cq_block, win_block) == (256, 16)
    assert window_block_sizes("cq4", 128, 2) == (64, 16) and window_block_sizes("cq2", 128, 2) == (128, 16)
    cap = window_capacity(41 * 100, 8192, 128, cq_block, win_block)
    assert cap["kv_cache_tokens"] == 100 * 8192
    assert cap["kv_cache_tokens_without_window"] == 41 * 100 * 256
