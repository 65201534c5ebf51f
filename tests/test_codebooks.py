"""Codebook files: round trip, and one clear error for each kind of bad file."""

from __future__ import annotations

import dataclasses
import json
import pickle

import pytest
import torch
from safetensors.torch import save_file

from vllm_cq.codebooks import CodebookSet, ModelIdentity, compose, load_codebooks, read_metadata, save_codebooks
from vllm_cq.errors import CodebookError
from vllm_cq.formats import get_format

MODEL = ModelIdentity("LlamaForCausalLM", 3, 2, 64, 10000.0, 64, "default", "tiny")


def make_set(fmt_name: str = "cq_k4v1", model: ModelIdentity = MODEL) -> CodebookSet:
    fmt = get_format(fmt_name)
    ks = [torch.randn(fmt.key.codebook_shape(model.num_kv_heads, model.head_dim)) for _ in range(model.num_layers)]
    vs = [torch.randn(fmt.value.codebook_shape(model.num_kv_heads, model.head_dim)) for _ in range(model.num_layers)]
    return CodebookSet(fmt, model, ks, vs, calibration={"text": "unit test"})


def test_roundtrip(tmp_path):
    cbs = make_set()
    path = tmp_path / "cb.safetensors"
    save_codebooks(path, cbs)
    got = load_codebooks(path, fmt="cq_k4v1", model=dataclasses.replace(MODEL, name="other path"))
    assert got.fmt.name == "cq_k4v1" and got.pre_rope and got.model == MODEL
    assert got.calibration["text"] == "unit test"
    for a, b in zip(got.keys + got.values, cbs.keys + cbs.values, strict=True):
        assert torch.equal(a, b)
    assert read_metadata(path)["format"]["key"] == {"method": "cq", "channels": 2, "bits": 8}


def test_select_heads_is_the_rank_slice():
    cbs = make_set("cq1")
    sub = cbs.select_heads(1, 2)
    g = 64 // 8
    assert sub.keys[0].shape == (g, 256, 8)
    assert torch.equal(sub.keys[2], cbs.keys[2][g : 2 * g])
    assert torch.equal(sub.values[1], cbs.values[1][g:])
    with pytest.raises(CodebookError, match="outside"):
        cbs.select_heads(1, 3)


def test_compose_asymmetric_from_two_sets():
    c4, c1 = make_set("cq4"), make_set("cq1")
    k4v1 = compose(get_format("cq_k4v1"), c4, c1)
    assert k4v1.fmt.name == "cq_k4v1" and k4v1.keys is c4.keys and k4v1.values is c1.values
    assert k4v1.calibration["composed_from"] == "cq4 keys + cq1 values"
    with pytest.raises(CodebookError, match="needs"):
        compose(get_format("cq_k4v1"), c1, c4)
    other = make_set("cq1", dataclasses.replace(MODEL, rope_theta=500000.0))
    with pytest.raises(CodebookError, match="different models"):
        compose(get_format("cq_k4v1"), c4, other)


def test_missing_file(tmp_path):
    with pytest.raises(CodebookError, match="codebook file not found"):
        load_codebooks(tmp_path / "nope.safetensors")


def test_pickle_is_refused(tmp_path):
    path = tmp_path / "cb.safetensors"
    with open(path, "wb") as f:
        pickle.dump({"layers.0.k": torch.randn(2, 2)}, f)
    with pytest.raises(CodebookError, match="not a safetensors file.*never from pickles"):
        load_codebooks(path)
    torch.save({"layers.0.k": torch.randn(2, 2)}, tmp_path / "cb.pt")
    with pytest.raises(CodebookError, match="not a safetensors file"):
        load_codebooks(tmp_path / "cb.pt")


def test_plain_safetensors_without_metadata(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(CodebookError, match="not a vllm-cq codebook file"):
        load_codebooks(path)


def test_wrong_format(tmp_path):
    path = tmp_path / "cb.safetensors"
    save_codebooks(path, make_set("cq4"))
    with pytest.raises(CodebookError, match="holds cq4 codebooks, but kv_cache_dtype is cq1"):
        load_codebooks(path, fmt="cq1")


def test_wrong_model(tmp_path):
    path = tmp_path / "cb.safetensors"
    save_codebooks(path, make_set())
    other = dataclasses.replace(MODEL, num_kv_heads=4, rope_theta=500000.0)
    with pytest.raises(CodebookError, match=r"another model.*num_kv_heads: file has 2, model has 4.*rope_theta"):
        load_codebooks(path, model=other)


def rewrite(path, mutate_tensors=None, mutate_meta=None):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = dict(f.metadata())
    if mutate_tensors:
        mutate_tensors(tensors)
    if mutate_meta:
        m = json.loads(meta["vllm_cq"])
        mutate_meta(m)
        meta["vllm_cq"] = json.dumps(m)
    save_file(tensors, str(path), metadata=meta)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (
            lambda t: t.__setitem__("layers.1.k", torch.randn(8, 256, 2)),
            r"layers.1.k has shape \(8, 256, 2\).*needs \(64, 256, 2\)",
        ),
        (lambda t: t.pop("layers.2.v"), "tensor layers.2.v is missing"),
        (lambda t: t.__setitem__("layers.0.v", t["layers.0.v"].to(torch.int32)), "layers.0.v has dtype torch.int32"),
        (lambda t: t["layers.0.k"].__setitem__((0, 0, 0), float("nan")), "NaN or inf"),
        (lambda t: t.__setitem__("layers.3.k", torch.randn(64, 256, 2)), "unexpected tensors"),
    ],
    ids=["wrong-shape", "missing-tensor", "int-dtype", "nan", "extra-layer"],
)
def test_bad_tensors(tmp_path, mutate, message):
    path = tmp_path / "cb.safetensors"
    save_codebooks(path, make_set())
    rewrite(path, mutate_tensors=mutate)
    with pytest.raises(CodebookError, match=message):
        load_codebooks(path)


def test_bad_metadata(tmp_path):
    path = tmp_path / "cb.safetensors"
    save_codebooks(path, make_set())
    rewrite(path, mutate_meta=lambda m: m.__setitem__("version", 99))
    with pytest.raises(CodebookError, match="version 99"):
        load_codebooks(path)
    save_codebooks(path, make_set())
    rewrite(path, mutate_meta=lambda m: m["format"]["value"].__setitem__("channels", 4))
    with pytest.raises(CodebookError, match="stored with different specs"):
        load_codebooks(path)


def test_model_identity_from_hf_config_dict():
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "hidden_size": 576,
        "rope_theta": 100000.0,
    }
    mid = ModelIdentity.from_hf_config(cfg)
    assert (mid.head_dim, mid.num_kv_heads, mid.rope_theta, mid.rotary_dim) == (64, 3, 100000.0, 64)
    cfg5 = {**cfg, "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"}}
    del cfg5["rope_theta"]
    assert ModelIdentity.from_hf_config(cfg5) == mid


def test_compose_command_writes_a_loadable_file(tmp_path, capsys):
    from vllm_cq.cli import main

    c4, c1 = make_set("cq4"), make_set("cq1")
    save_codebooks(tmp_path / "cq4.safetensors", c4)
    save_codebooks(tmp_path / "cq1.safetensors", c1)
    args = ["compose", "--format", "cq_k4v1", "--keys", str(tmp_path / "cq4.safetensors")]
    assert main([*args, "--values", str(tmp_path / "cq1.safetensors")]) == 0
    got = load_codebooks(tmp_path / "cq_k4v1.safetensors", fmt="cq_k4v1", model=MODEL)
    assert torch.equal(got.keys[1], c4.keys[1]) and torch.equal(got.values[2], c1.values[2])
    assert "cq4 keys + cq1 values" in capsys.readouterr().out
