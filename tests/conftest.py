"""Shared fixtures: seeded RNG, a tiny random Llama and a calibration text, made once per session."""

from __future__ import annotations

import os

import pytest
import torch

from vllm_cq.tiny import make_tiny_llama, sample_text


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def calib_text(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("text") / "calib.txt"
    path.write_text(sample_text() * 4, encoding="utf-8")
    return str(path)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_tiny_llama(os.fspath(tmp_path_factory.mktemp("models") / "tiny-llama"))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||, the error measure used across the tests."""
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))
