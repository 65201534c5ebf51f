"""Codebook discovery order and tensor-parallel head slices (no engine needed)."""

from __future__ import annotations

import os

import pytest
import torch

from vllm_cq.codebooks import default_codebook_path
from vllm_cq.errors import CodebookError, CQConfigError
from vllm_cq.integration.config import ENV_CODEBOOKS, kv_head_range, resolve_codebook_path


def touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return str(path)


def test_discovery_order(tmp_path, monkeypatch):
    model = tmp_path / "model"
    beside = touch(tmp_path / default_codebook_path("model", "cq1"))
    from_env = touch(tmp_path / "env" / "cq1.safetensors")
    explicit = touch(tmp_path / "explicit.safetensors")
    monkeypatch.delenv(ENV_CODEBOOKS, raising=False)
    assert resolve_codebook_path("cq1", {}, str(model)) == beside
    monkeypatch.setenv(ENV_CODEBOOKS, str(tmp_path / "env"))  # a directory: FMT.safetensors inside
    assert resolve_codebook_path("cq1", {}, str(model)) == from_env
    assert resolve_codebook_path("cq1", {"cq_codebooks": explicit}, str(model)) == explicit
    with pytest.raises(CodebookError, match=r"codebook file from additional_config\[\"cq_codebooks\"\] not found"):
        resolve_codebook_path("cq1", {"cq_codebooks": str(tmp_path / "nope.safetensors")}, str(model))
    monkeypatch.delenv(ENV_CODEBOOKS)
    with pytest.raises(CodebookError, match="no cq2 codebooks.*VLLM_CQ_CODEBOOKS.*vllm-cq calibrate"):
        resolve_codebook_path("cq2", None, str(model))


@pytest.mark.parametrize(
    "world, total, expected",
    [
        (1, 8, [(0, 8)]),
        (2, 8, [(0, 4), (4, 8)]),
        (4, 2, [(0, 1), (0, 1), (1, 2), (1, 2)]),  # more ranks than kv heads: heads are replicated
        (3, 3, [(0, 1), (1, 2), (2, 3)]),
    ],
)
def test_kv_head_range_matches_vllm_split(world, total, expected):
    assert [kv_head_range(r, world, total) for r in range(world)] == expected


def test_kv_head_range_refuses_uneven_splits():
    with pytest.raises(CQConfigError):
        kv_head_range(0, 3, 8)


def test_window_capacity_at_8k():
    """cq1, head_dim 128, bf16, W = 128 at 8K tokens: 32 code blocks of 256 + 9 window blocks of 16 per
    sequence, i.e. the window keeps 32/41 = 78% of the window-less tokens."""
    from vllm_cq.capacity import window_capacity
    from vllm_cq.integration.config import window_block_sizes

    cq_block, win_block = window_block_sizes("cq1", 128, 2)
    assert (cq_block, win_block) == (256, 16)
    assert window_block_sizes("cq4", 128, 2) == (64, 16) and window_block_sizes("cq2", 128, 2) == (128, 16)
    cap = window_capacity(41 * 100, 8192, 128, cq_block, win_block)
    assert cap["kv_cache_tokens"] == 100 * 8192
    assert cap["kv_cache_tokens_without_window"] == 41 * 100 * 256


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype_bytes", [2, 4])
def test_window_blocks_give_equal_pages_for_every_format(head_dim, dtype_bytes):
    """The cq page (cq block x slot bytes) equals the window page (window block x model-dtype bytes of
    K and V); both blocks are multiples of 16 and as small as that allows; window blocks over 256 tokens
    are refused (KVTQ at head_dim 128) with one clear error, except that a cq page may be padded (cq2n)."""
    import math

    from vllm_cq.formats import format_names, get_format
    from vllm_cq.integration.config import window_block_sizes, window_page_padding

    full = 2 * head_dim * dtype_bytes
    accepted = []
    for name in format_names():
        slot = get_format(name).slot_bytes(head_dim)
        try:
            cq_block, win_block = window_block_sizes(name, head_dim, dtype_bytes)
        except CQConfigError as e:
            assert name.startswith("kvtq") and head_dim == 128 and "window blocks of" in str(e)
            continue
        accepted.append(name)
        if window_page_padding(name, head_dim, dtype_bytes):  # cq2n: a padded code page, under 1% unused
            assert cq_block * slot < win_block * full <= cq_block * slot / 0.99 and cq_block % 16 == 0
            assert win_block % 16 == 0 and win_block <= 256
            continue
        assert cq_block * slot == win_block * full
        assert cq_block % 16 == 0 and win_block % 16 == 0 and win_block <= 256
        assert math.gcd(cq_block // 16, win_block // 16) == 1  # no smaller pair of multiples of 16
    assert {"cq1", "cq2", "cq4", "cq_k4v1", "cq_k4v2"} <= set(accepted)
    assert window_block_sizes("cq_k4v1", head_dim, 2) == (512, 80)
    assert window_block_sizes("cq_k4v2", head_dim, 2) == (256, 48)


# loads codebooks of the Llama-3.1-8B shape (as config validation does, in the process that then forks
# vLLM's engine core), forks, and runs a parallel CPU op in the child, as the engine core does
FORK_AFTER_LOAD = """
import os, sys, torch
from vllm_cq.codebooks import ModelIdentity
from vllm_cq.integration.config import load_before_fork
load_before_fork(sys.argv[1], "cq1", ModelIdentity(**eval(sys.argv[2])))
pid = os.fork()
if pid == 0:
    torch.zeros(20_000_000).fill_(1.0)
    os._exit(0)
_, status = os.waitpid(pid, 0)
print("child exited", status, flush=True)
"""


def test_a_fork_after_loading_codebooks_does_not_hang(tmp_path):
    """GNU OpenMP hangs a forked child whose parent ran a parallel region (the forked cq engine cores
    of 2026-12-01 on the H200); loading codebooks must not start torch's thread pool."""
    import sys

    import torch

    if torch.get_num_threads() < 2:
        pytest.skip("one intra-op thread: no parallel region either way")
    from dataclasses import asdict

    from vllm_cq.codebooks import CodebookSet, ModelIdentity, save_codebooks
    from vllm_cq.formats import get_format

    fmt = get_format("cq1")
    ident = ModelIdentity("LlamaForCausalLM", 2, 8, 128, 500000.0, 128)  # the 8B shape's heads
    shape = fmt.key.codebook_shape(ident.num_kv_heads, ident.head_dim)
    layers = [torch.randn(shape) for _ in range(2)]
    save_codebooks(tmp_path / "cq1.safetensors", CodebookSet(fmt, ident, layers, [t.clone() for t in layers]))
    from vllm_cq.child import TIMEOUT_RC, run_logged

    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    log = tmp_path / "fork.log"
    cmd = [sys.executable, "-c", FORK_AFTER_LOAD, str(tmp_path / "cq1.safetensors"), repr(asdict(ident))]
    rc = run_logged(cmd, str(log), timeout=60, env=env)  # a hung child's whole process group is stopped
    out = log.read_text()
    assert rc != TIMEOUT_RC, "the forked child hung in a parallel CPU op after codebooks were loaded"
    assert rc == 0 and "child exited 0" in out, out[-2000:]


def window_config(dtype: str, extra: dict | None = None, head_dim: int = 128, **cache: object):
    from types import SimpleNamespace

    mc = SimpleNamespace(
        hf_text_config=SimpleNamespace(), get_sliding_window=lambda: None, get_head_size=lambda: head_dim,
        dtype=torch.bfloat16,
    )  # fmt: skip
    return SimpleNamespace(
        model_config=mc,
        cache_config=SimpleNamespace(cache_dtype=dtype, **cache),
        parallel_config=SimpleNamespace(pipeline_parallel_size=1),
        scheduler_config=SimpleNamespace(),
        speculative_config=None,
        additional_config=extra or {},
    )


@pytest.mark.parametrize(
    ("dtype", "extra", "cache", "want"),
    [
        ("cq1", None, {}, 128),  # cq dtypes: on by default
        ("cq_k4v1", None, {}, 128),
        ("cq_k4v2", {"cq_codebooks": "x"}, {}, 128),  # other additional_config keys leave the default
        ("cq1", {"cq_recent_window": 0}, {}, 0),  # explicit 0: codes only
        ("cq2", {"cq_recent_window": 64}, {}, 64),
        ("kvtq", None, {}, 0),  # KVTQ: off by default (its window blocks are too big at head_dim 128 anyway)
        ("kvtq1", {"cq_recent_window": 32}, {}, 32),
        ("cq1", None, {"kv_cache_dtype_skip_layers": ["0"]}, 0),  # where a window would be refused: off
        ("auto", None, {}, 0),
    ],
)
def test_the_recent_window_defaults_to_128_tokens_for_cq_dtypes(dtype, extra, cache, want):
    from vllm_cq.integration.config import window_tokens

    assert window_tokens(window_config(dtype, extra, **cache)) == want


def test_no_default_window_without_the_hybrid_manager_and_explicit_ones_are_refused_there():
    from vllm_cq.integration.config import unsupported_features, window_tokens

    cfg = window_config("cq1")
    cfg.scheduler_config.disable_hybrid_kv_cache_manager = True
    assert window_tokens(cfg) == 0 and unsupported_features(cfg) == []
    cfg.additional_config = {"cq_recent_window": 128}
    assert unsupported_features(cfg) == [
        "cq_recent_window with --disable-hybrid-kv-cache-manager (the window is a second KV-cache group)"
    ]


def test_the_window_and_skip_layers_are_not_refused():
    """Both verified on the H200 on 2026-12-02 (kernels vs the reference, vLLM window tests, quality
    through vLLM; the skip-layers engine test), so no platform refuses them."""
    from vllm_cq.integration.config import unsupported_features

    for dtype in ("cq1", "cq_k4v1", "kvtq1"):
        assert unsupported_features(window_config(dtype, {"cq_recent_window": 128})) == []
    # skip layers: the engine test passed on the H200 with vLLM's float32 dots in IEEE (2026-12-02)
    assert unsupported_features(window_config("cq4", kv_cache_dtype_skip_layers=["0"])) == []


def test_key_norm_format_gets_its_window_through_padded_code_pages():
    """cq2n's 66-byte slots (34 at head_dim 64) share no small page with model-dtype tokens (equal pages
    would need 528- or 272-token window blocks): the code page is padded up to a window page instead, with
    whole 16-token code blocks and under 1% padding, on both vLLM lines (0.26 pads only for a backend that
    says it indexes pages by block stride)."""
    from vllm_cq.integration.backend import BACKENDS
    from vllm_cq.integration.config import window_block_sizes, window_page_padding, window_tokens

    assert window_block_sizes("cq2n", 128, 2) == (496, 64) and window_page_padding("cq2n", 128, 2) == 32
    assert window_block_sizes("cq2n", 64, 4) == (240, 16) and window_page_padding("cq2n", 64, 4) == 32
    assert window_page_padding("cq1", 128, 2) == 0
    assert window_tokens(window_config("cq2n")) == 128
    assert BACKENDS["cq2n"].indexes_kv_by_block_stride()


def test_full_decode_graphs_where_the_cuda_decode_kernel_covers(monkeypatch):
    """Decode steps replay full CUDA graphs by default exactly where `decode_cuda.covers` says the CUDA
    kernel takes them; VLLM_CQ_FULL_CUDA_GRAPHS=0 turns them off, =1 on an uncovered model is one clear
    error (not a silent Triton capture)."""
    from types import SimpleNamespace

    from vllm_cq.integration import backend
    from vllm_cq.kernels.cq import decode_cuda

    asked = []

    def covers(fmt, group, head_dim, dtype, whole, block_size):
        asked.append((fmt.name, group, head_dim, dtype, whole, block_size))
        return fmt.name == "cq1"

    monkeypatch.setattr(decode_cuda, "covers", covers)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv(backend.FULL_GRAPHS_ENV, raising=False)

    def config(dtype: str, rotary: float = 1.0):
        vc = window_config(dtype)
        hf = {"architectures": ["LlamaForCausalLM"], "num_attention_heads": 32, "num_key_value_heads": 8,
              "hidden_size": 4096, "num_hidden_layers": 2, "rope_theta": 5e5,
              "partial_rotary_factor": rotary}  # fmt: skip
        vc.model_config.hf_text_config = SimpleNamespace(**hf)
        vc.model_config.model = "m"
        vc.model_config.get_num_attention_heads = lambda pc: 32
        vc.model_config.get_num_kv_heads = lambda pc: 8
        return vc

    assert backend.full_decode_graphs(config("cq1"))
    assert asked[-1] == ("cq1", 4, 128, torch.bfloat16, True, 256)  # the default window's code pages
    assert not backend.full_decode_graphs(config("cq4"))
    backend.full_decode_graphs(config("cq1", rotary=0.5))
    assert asked[-1][-2] is False  # partial rotary reaches `covers`
    vc = config("cq1")
    vc.additional_config = {"cq_recent_window": 0}
    vc.cache_config.block_size = 32
    backend.full_decode_graphs(vc)
    assert asked[-1][-1] == 32  # codes only: vLLM's block size
    monkeypatch.setenv(backend.FULL_GRAPHS_ENV, "0")
    assert not backend.full_decode_graphs(config("cq1"))
    monkeypatch.setenv(backend.FULL_GRAPHS_ENV, "1")
    assert backend.full_decode_graphs(config("cq1"))
    with pytest.raises(CQConfigError, match="VLLM_CQ_FULL_CUDA_GRAPHS=1"):
        backend.full_decode_graphs(config("cq4"))
