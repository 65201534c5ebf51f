"""Calibration on a tiny random Llama: pre-RoPE collection, true Fisher gradients, CLI output."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from vllm_cq.calibration.calibrate import CalibrationConfig
from vllm_cq.calibration.collect import collect, token_batches
from vllm_cq.cli import main
from vllm_cq.codebooks import ModelIdentity, load_codebooks
from vllm_cq.errors import CQConfigError


@pytest.fixture(scope="module")
def model(tiny_llama):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float64)


def test_collected_keys_are_pre_rope_k_proj_outputs(model):
    ids = torch.randint(0, model.config.vocab_size, (2, 24))
    stats = collect(model, [ids], progress=False)
    assert len(stats) == model.config.num_hidden_layers
    out = model(input_ids=ids, output_hidden_states=True)
    for i, layer in enumerate(model.model.layers):
        h = layer.input_layernorm(out.hidden_states[i])
        k = layer.self_attn.k_proj(h).reshape(48, 2, 64)
        v = layer.self_attn.v_proj(h).reshape(48, 2, 64)
        assert torch.allclose(stats[i].keys, k.float(), atol=1e-5)
        assert torch.allclose(stats[i].values, v.float(), atol=1e-5)


def test_fisher_is_the_squared_loss_gradient(model):
    """Check d loss / d k_proj-output by central finite differences along a random direction."""
    ids = torch.randint(0, model.config.vocab_size, (1, 16))
    st = collect(model, [ids], progress=False)[1]
    grad_sq = st.key_fisher
    assert torch.all(grad_sq[-1] == 0)  # the last key only feeds the last position, which has no label
    assert torch.all(grad_sq[:-1].sum(-1) > 0)

    # recover the signed gradient with one more backward, then compare to finite differences
    k_proj = model.model.layers[1].self_attn.k_proj
    saved = {}

    def keep(_m, _i, o):
        o = o.detach().requires_grad_(True)
        saved["o"] = o
        return o

    h = k_proj.register_forward_hook(keep)
    model(input_ids=ids, labels=ids).loss.backward()
    h.remove()
    g = saved["o"].grad.reshape(16, 2, 64)
    assert torch.allclose(g.float() ** 2, grad_sq, rtol=1e-4, atol=1e-20)
    direction = torch.randn_like(saved["o"])
    eps = 1e-4

    def loss_with(delta):
        hh = k_proj.register_forward_hook(lambda _m, _i, o: o + delta)
        try:
            logits = model(input_ids=ids).logits[0, :-1]  # HF's own loss upcasts only to float32
            return torch.nn.functional.cross_entropy(logits, ids[0, 1:]).item()
        finally:
            hh.remove()

    fd = (loss_with(eps * direction) - loss_with(-eps * direction)) / (2 * eps)
    # HF computes the loss (and so the gradient) in float32: agreement to 1e-3 is all it can give
    assert fd == pytest.approx(float((saved["o"].grad * direction).sum()), rel=1e-3)


def test_token_batches():
    ids = torch.arange(100)
    assert [b.shape for b in token_batches(ids, 3, 30, batch_size=2)] == [(2, 30), (1, 30)]
    assert len(token_batches(ids, 16, 30)) == 3  # only 3 full sequences fit
    with pytest.raises(CQConfigError, match="fewer than one sequence"):
        token_batches(ids, 1, 101)


def test_config_errors():
    with pytest.raises(CQConfigError, match="unknown vllm-cq KV cache dtype"):
        CalibrationConfig(format="int3")
    with pytest.raises(CQConfigError, match="weighting"):
        CalibrationConfig(weighting="magic")


def test_cli_calibrate_writes_a_loadable_file(tiny_llama, calib_text, tmp_path, capsys):
    out = tmp_path / "cq4.safetensors"
    args = f"calibrate {tiny_llama} --format cq4 --text {calib_text} --num-seqs 4 --seq-len 128 --iters 5"
    rc = main(args.split() + ["--out", str(out), "--quiet"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "K err(Fisher)" in printed and " mean " in printed and str(out) in printed
    from transformers import AutoConfig

    cbs = load_codebooks(out, fmt="cq4", model=ModelIdentity.from_hf_config(AutoConfig.from_pretrained(tiny_llama)))
    assert cbs.num_layers == 2 and cbs.keys[0].shape == (64, 256, 2)
    assert cbs.calibration["tokens"] == 512 and cbs.calibration["weighting"] == "fisher"
    assert 0 < cbs.calibration["mean_key_error"] < 0.5


def test_cli_errors_are_one_line(tiny_llama, calib_text, capsys):
    assert main(["calibrate", tiny_llama, "--format", "cq3", "--text", calib_text]) == 2
    assert "vllm-cq: error: unknown vllm-cq KV cache dtype 'cq3'" in capsys.readouterr().err


def test_console_script_is_installed():
    out = subprocess.run([sys.executable, "-m", "vllm_cq.cli", "formats"], capture_output=True, text=True, check=True)
    assert "| cq1 | 8c8b | 8c8b | 1 | 32 | 16.0x |" in out.stdout


def test_cli_calibrates_several_formats_from_one_collection(tiny_llama, calib_text, tmp_path, capsys, monkeypatch):
    import shutil

    import vllm_cq.calibration.calibrate as cal

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_llama, model_dir, ignore=shutil.ignore_patterns("vllm-cq"))
    calls = []
    real_collect = cal.collect
    monkeypatch.setattr(cal, "collect", lambda *a, **k: calls.append(1) or real_collect(*a, **k))
    common = f"--text {calib_text} --num-seqs 2 --seq-len 128 --iters 3 --quiet".split()
    assert main(["calibrate", str(model_dir), "--format", "cq4,cq1", *common]) == 0
    assert len(calls) == 1
    assert "collect" in capsys.readouterr().out
    from transformers import AutoConfig

    ident = ModelIdentity.from_hf_config(AutoConfig.from_pretrained(model_dir))
    both = {f: load_codebooks(model_dir / "vllm-cq" / f"{f}.safetensors", fmt=f, model=ident) for f in ("cq4", "cq1")}
    # the same codebooks as a calibration of that format alone
    alone = tmp_path / "cq1-alone.safetensors"
    assert main(["calibrate", str(model_dir), "--format", "cq1", *common, "--out", str(alone)]) == 0
    single = load_codebooks(alone, fmt="cq1", model=ident)
    for a, b in zip(both["cq1"].keys + both["cq1"].values, single.keys + single.values, strict=True):
        torch.testing.assert_close(a, b)
    assert both["cq4"].keys[0].shape == (64, 256, 2) and both["cq1"].keys[0].shape == (16, 256, 8)
    assert main(["calibrate", str(model_dir), "--format", "cq4,cq1", *common, "--out", str(alone)]) == 2
    assert "--out names one file" in capsys.readouterr().err


def test_norm_spec_fit_reports_the_stored_keys_error():
    """A norm spec's codebook is fitted on unit directions weighted by |k|^2, and the error calibration
    reports is the relative error of the keys as the plugin stores and reads them (codes + float16 norm)."""
    from tests.conftest import rel_err
    from vllm_cq.calibration.calibrate import fit_tensor
    from vllm_cq.formats import get_format
    from vllm_cq.kernels.cq import naive

    spec = get_format("cq2n").key
    x = torch.randn(1024, 2, 32) * torch.linspace(0.2, 3.0, 32) * torch.exp(torch.randn(1024, 1, 1))
    cfg = CalibrationConfig(format="cq2n", weighting="uniform", iters=5, device="cpu")
    cb, err, _ = fit_tensor(x, torch.ones_like(x), spec, cfg)
    assert cb.shape == spec.codebook_shape(2, 32)
    assert cb.norm(dim=-1).max() <= 1.0 + 1e-5  # centroids of unit vectors' groups
    stored = naive.dequantize(naive.quantize(x, cb, spec), cb, spec, 32)
    assert err == pytest.approx(rel_err(stored, x) ** 2, rel=2e-2)
    with pytest.raises(CQConfigError, match="needs no calibration"):
        CalibrationConfig(format="kvtq")
