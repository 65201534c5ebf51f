"""The recent-window attention of benchmarks/quality/fakequant.py on a tiny random Llama: W=0 is the
plain fake-quantized model (output hooks), W >= sequence length the unquantized one, and positions
before W see only exact keys and values."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import rel_err

transformers = pytest.importorskip("transformers")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "quality" / "fakequant.py"


def _fakequant():
    spec = importlib.util.spec_from_file_location("fakequant_under_test", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


@torch.no_grad()
def test_window_limits():
    fq = _fakequant()
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        architectures=["LlamaForCausalLM"],
    )
    cfg._attn_implementation = "sdpa"
    model = transformers.LlamaForCausalLM(cfg).eval()
    _, hkv, d = fq.head_shape(model)
    # 2-channel groups, 8-bit codes, random codebooks: coarse enough that quantization shows
    qs = [tuple(fq._coder(torch.randn(hkv * d // 2, 256, 2) * 0.5) for _ in "kv") for _ in range(2)]
    ids = torch.randint(0, 128, (1, 48))

    def logits(install) -> torch.Tensor:
        handles = install()
        try:
            return model(input_ids=ids).logits.double()
        finally:
            for h in handles:
                h.remove()

    exact = logits(lambda: [])
    plain = logits(lambda: fq.install(model, qs))
    assert rel_err(plain, exact) > 1e-2  # the quantization is visible
    assert rel_err(logits(lambda: fq.install_window(model, qs, 0)), plain) < 1e-5
    assert rel_err(logits(lambda: fq.install_window(model, qs, 48)), exact) < 1e-5
    assert rel_err(logits(lambda: fq.install_window(model, qs, 1000)), exact) < 1e-5
    mid = logits(lambda: fq.install_window(model, qs, 16))
    assert rel_err(mid[:, :16], exact[:, :16]) < 1e-5  # positions < W see only exact K/V
    assert rel_err(mid[:, 16:], exact[:, 16:]) > 1e-3 and rel_err(mid[:, 16:], plain[:, 16:]) > 1e-3
    sink = logits(lambda: fq.install_window(model, qs, 16, sinks=4))
    assert rel_err(sink[:, :16], exact[:, :16]) < 1e-5
    assert rel_err(sink[:, 16:], mid[:, 16:]) > 1e-3  # the first 4 keys are exact for every query now
    assert rel_err(logits(lambda: fq.install_window(model, qs, 0, sinks=48)), exact) < 1e-5
    assert model.config._attn_implementation == "sdpa"  # restored
    assert fq.get_recipe("cq1+w128").window == 128 and fq.get_recipe("cq1").window is None
    r = fq.get_recipe("cq1+w128+s4")
    assert (r.window, r.sinks, r.key.channels) == (128, 4, 8) and fq.get_recipe("cq1+s4").window == 0


def test_postrope_keys_are_coded_in_the_rotated_frame():
    """The post-RoPE ablation: a codebook fitted on rotated keys reproduces a calibration key at its own
    position (every calibration point is a centroid here), and the same key at another position is
    coded in another frame, i.e. not by the pre-RoPE codebook's answer."""
    fq = _fakequant()
    from vllm_cq.kernels.rope import build_cos_sin_cache

    torch.manual_seed(0)
    n, h, d = 256, 1, 16
    x, fisher = torch.randn(n, h, d), torch.rand(n, h, d) + 0.1
    table = build_cos_sin_cache(d, 4 * n, base=100.0)
    post = fq.fit_quantizer(fq.TensorRecipe(2, mode="postrope"), x, fisher, None, 5, 0, (table, n))
    pre = fq.fit_quantizer(fq.TensorRecipe(2), x, fisher, None, 5, 0)
    assert rel_err(post(x), x) < 1e-5 and rel_err(pre(x), x) < 1e-5  # 256 points, 256 centroids
    shifted = torch.cat([torch.zeros(7, h, d), x])[:n]  # x[i] now sits at position i + 7
    assert rel_err(post(shifted)[7:], x[: n - 7]) > 1e-2
    assert rel_err(pre(shifted)[7:], x[: n - 7]) < 1e-5
    assert fq.get_recipe("cq1+kpost").key.mode == "postrope" and fq.get_recipe("cq1+kpost").value.mode == "plain"


def test_repeated_halves_calibration_text():
    """Each calibration sequence is one span of the text twice; consecutive sequences take new spans."""
    fq = _fakequant()
    out = fq.repeated_halves(torch.arange(100), num_seqs=3, seq_len=8).view(3, 8)
    assert torch.equal(out[:, :4], out[:, 4:])
    assert torch.equal(out[:, :4].reshape(-1), torch.arange(12))
