"""vLLM attention backend for the plugin's KV caches (cq codebooks, KVTQ ternary digits): codes are
written into the paged blocks and attention is computed over them, for prefill, chunked prefill and
decode alike (write first, then attend over the cache, as vLLM's CPU backend does), so prefix-cache
hits and chunked prefill need no special case and perplexity from prompt logprobs measures the
stored codes.

Page layout per layer: [num_blocks, num_kv_heads, block_size, slot_bytes] uint8, one slot = a token's
key codes then its value codes (`vllm_cq.formats`). One backend class per format (generated below),
because vLLM sizes pages from the backend class alone. What differs per family (what a layer loads,
which kernels write and attend) is in `families.py`.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionCGSupport,
    AttentionImpl,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
    MultipleOf,
)
from vllm.v1.attention.backends.utils import split_decodes_and_prefills

from vllm_cq.errors import CQConfigError
from vllm_cq.formats import KVFormat, format_names, get_format
from vllm_cq.integration import compat
from vllm_cq.integration.config import model_identity, window_block_sizes, window_tokens
from vllm_cq.integration.families import family_for
from vllm_cq.integration.warmup import warm_up
from vllm_cq.kernels.window import WindowCache, write_window


@dataclass
class CQAttentionMetadata:
    num_actual_tokens: int  # real tokens of the step (the batch may be padded past this)
    max_query_len: int  # 1 = decode-only step (split-KV decode kernel)
    query_start_loc: torch.Tensor  # [B+1]
    seq_lens: torch.Tensor  # [B] context + new tokens
    block_table: torch.Tensor  # [B, max_blocks]
    slot_mapping: torch.Tensor  # [num_actual_tokens]
    block_size: int = 0  # tokens per block of `block_table`, as vLLM sized this group (0: unknown)
    num_decodes: int = 0  # leading sequences with one new token (the decode kernel's share of a mixed step)


FULL_GRAPHS_ENV = "VLLM_CQ_FULL_CUDA_GRAPHS"


def full_decode_graphs(vllm_config: Any) -> bool:
    """Whether decode-only steps replay full CUDA graphs (cq attention captured with the model, no Python
    between layers): by default where the CUDA decode kernel takes every decode step (`decode_cuda.covers`;
    greedy tokens equal eager's on the H200 with codes and with a recent window, and 128 x (4096+512) on
    the 8B shape went from 1,677 to 2,219 output tok/s, 2026-12-03). Elsewhere attention stays between
    vLLM's piecewise graphs: the Triton decode kernel failed its full-graph test (H100, 2026-11-23).
    VLLM_CQ_FULL_CUDA_GRAPHS=0 turns them off; =1 insists (an error where the kernel does not cover)."""
    choice = os.environ.get(FULL_GRAPHS_ENV, "")
    if choice == "0" or not torch.cuda.is_available():
        return False
    from vllm_cq.kernels.cq import decode_cuda

    mc, pc = vllm_config.model_config, vllm_config.parallel_config
    ident = model_identity(vllm_config)
    group = mc.get_num_attention_heads(pc) // max(1, mc.get_num_kv_heads(pc))
    fmt = get_format(vllm_config.cache_config.cache_dtype)
    if window_tokens(vllm_config):  # the code pages the window's page padding gives
        block_size = window_block_sizes(fmt.name, ident.head_dim, mc.dtype.itemsize)[0]
    else:
        block_size = getattr(vllm_config.cache_config, "block_size", None) or 16
    whole = ident.rotary_dim in (None, ident.head_dim)
    covered = decode_cuda.covers(fmt, group, ident.head_dim, mc.dtype, whole, block_size)
    if choice == "1" and not covered:
        raise CQConfigError(
            f"{FULL_GRAPHS_ENV}=1: the CUDA decode kernel does not cover --kv-cache-dtype {fmt.name} for this "
            "model on this GPU (8-bit CQ codes without key norms, bf16/fp16, GQA <= 8, RoPE over the whole "
            "head, pages of a power of two >= 16 tokens, sm_80+ with the codebooks' shared memory), and the "
            "Triton kernel is not verified in full CUDA graphs"
        )
    return covered


class CQAttentionMetadataBuilder(AttentionMetadataBuilder[CQAttentionMetadata]):
    # The kernels read only vLLM's persistent buffers (query_start_loc, seq_lens, block table, slot
    # mapping) and derive positions on the device, as full CUDA graphs need; `full_decode_graphs` says
    # where decode steps are captured whole (mixed and prefill steps stay piecewise).
    # vLLM puts requests with one new token first in a step, so a mixed step splits into a decode part
    # (decode kernel) and a prefill part; without the reordering the split only gets shorter
    reorder_batch_threshold: ClassVar[int | None] = 1

    def __init__(self, kv_cache_spec: Any, layer_names: list[str], vllm_config: Any, device: torch.device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)

    @classmethod
    def get_cudagraph_support(cls, vllm_config: Any, kv_cache_spec: Any) -> AttentionCGSupport:
        if full_decode_graphs(vllm_config):
            return AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE
        return AttentionCGSupport.NEVER

    def build(
        self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata, fast_build: bool = False
    ) -> CQAttentionMetadata:
        cam = common_attn_metadata
        n = cam.num_actual_tokens
        return CQAttentionMetadata(
            num_actual_tokens=n,
            max_query_len=cam.max_query_len,
            query_start_loc=cam.query_start_loc,
            seq_lens=cam.seq_lens,
            block_table=cam.block_table_tensor,
            slot_mapping=cam.slot_mapping[:n],
            block_size=int(getattr(self.kv_cache_spec, "block_size", 0) or 0),
            num_decodes=split_decodes_and_prefills(cam, decode_threshold=1)[0],
        )


class CQAttentionImpl(AttentionImpl[CQAttentionMetadata]):
    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int | None = None,
        alibi_slopes: list[float] | None = None,
        sliding_window: int | None = None,
        kv_cache_dtype: str = "cq1",
        logits_soft_cap: float | None = None,
        attn_type: str = AttentionType.DECODER,
        kv_sharing_target_layer_name: str | None = None,
        **extra: Any,
    ) -> None:
        self.fmt: KVFormat = get_format(kv_cache_dtype)
        refused = [
            ("ALiBi", alibi_slopes is not None),
            ("sliding window", sliding_window is not None),
            ("logits soft-capping", bool(logits_soft_cap)),
            (f"attention type {attn_type}", attn_type != AttentionType.DECODER),
            ("cross-layer KV sharing", kv_sharing_target_layer_name is not None),
            ("attention sinks", extra.get("sinks") is not None),
        ]
        bad = [name for name, is_bad in refused if is_bad]
        if bad:
            raise CQConfigError(f"--kv-cache-dtype {kv_cache_dtype} does not support {', '.join(bad)}")
        self.fmt.check_head_dim(head_size)
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads or num_heads
        self.family = family_for(self.fmt, head_size, self.scale, self.num_kv_heads)

    def layer_state(self, layer: Any, device: torch.device, dtype: torch.dtype) -> Any:
        """What this layer's family needs on its device (cq: codebooks of this rank's heads, RoPE table),
        loaded on first use (before any CUDA graph capture: vLLM's profiling run calls forward first)
        and kept on the layer."""
        if not hasattr(layer, "_vllm_cq_state"):
            layer._vllm_cq_state = self.family.load(layer.layer_name, device, dtype)
        return layer._vllm_cq_state

    def check_pages(self, kv_cache: torch.Tensor, md: CQAttentionMetadata) -> None:
        """The pages vLLM allocated must be the ones the kernels address: uint8 slots of this format,
        blocks of the block table's size. A mismatch (e.g. a block table in other units than the tensor)
        would write and read the wrong slots without an error, so it stops the first step instead."""
        want = (self.num_kv_heads, md.block_size or kv_cache.shape[2], self.fmt.slot_bytes(self.head_size))
        # within a block the slots are dense; blocks may be further apart (vLLM pads a cq page up to its
        # window page when their bytes share no small multiple: cq2n)
        dense = (want[1] * want[2], want[2], 1)
        if (
            kv_cache.dtype != torch.uint8
            or kv_cache.dim() != 4
            or tuple(kv_cache.shape[1:]) != want
            or tuple(kv_cache.stride()[1:]) != dense
            or kv_cache.stride(0) < want[0] * dense[0]
        ):
            raise CQConfigError(
                f"--kv-cache-dtype {self.fmt.name}: vLLM allocated KV pages {tuple(kv_cache.shape)} "
                f"{kv_cache.dtype} (strides {kv_cache.stride()}), the kernels address [blocks, {want[0]}, {want[1]}, "
                f"{want[2]}] uint8 with dense blocks; this "
                "vLLM configuration is not supported"
            )

    def forward(
        self,
        layer: Any,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: CQAttentionMetadata,
        output: torch.Tensor,
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("fused output quantization is not supported with cq KV caches")
        st = self.layer_state(layer, query.device, query.dtype)
        if attn_metadata is None:  # profiling / warm-up run: compile the prefill-step kernels now (CUDA)
            warm_up(self, layer, st, query.dtype, query.device)
            return output
        md = attn_metadata
        if not getattr(layer, "_vllm_cq_pages_checked", False):
            self.check_pages(kv_cache, md)
            layer._vllm_cq_pages_checked = True
        n, h, hkv, d = md.num_actual_tokens, self.num_heads, self.num_kv_heads, self.head_size
        new_kv = None if key is None or value is None else (key[:n].view(n, hkv, d), value[:n].view(n, hkv, d))
        window = None
        win = compat.window_step(layer)
        if win is not None:  # recent window: this step's K/V exact in the window group's pages too
            w, win_cache, win_md = win
            if new_kv is not None:
                write_window(win_cache, *new_kv, win_md.slot_mapping)
            window = WindowCache(w, win_cache, win_md.block_table)
        if new_kv is not None:
            self.family.write(st, *new_kv, kv_cache, md)
        self.family.attend(st, query[:n].view(n, h, d), kv_cache, md, output.view(-1, h, d)[:n], window=window)
        return output


class CQAttentionBackend(AttentionBackend):
    """Base of the per-format backends; `FORMAT` names the cq dtype."""

    FORMAT: ClassVar[str] = ""
    accept_output_buffer: bool = True
    forward_includes_kv_cache_update: bool = True
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]

    @classmethod
    def fmt(cls) -> KVFormat:
        return get_format(cls.FORMAT)

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec: Any = None) -> list[int | MultipleOf]:
        return [MultipleOf(1)]

    @classmethod
    def supports_kv_cache_dtype(cls, kv_cache_dtype: str | None) -> bool:
        return kv_cache_dtype == cls.FORMAT

    @staticmethod
    def get_impl_cls() -> type[CQAttentionImpl]:
        return CQAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[CQAttentionMetadataBuilder]:
        return CQAttentionMetadataBuilder

    @classmethod
    def slot_bytes(cls, head_size: int) -> int:
        return cls.fmt().slot_bytes(head_size)

    @classmethod
    def customize_spec(cls, spec: Any) -> Any:
        return compat.customize_spec(spec, cls.slot_bytes(spec.head_size))

    @classmethod
    def get_kv_cache_shape(
        cls, num_blocks: int, block_size: int, num_kv_heads: int, head_size: int, cache_dtype_str: str = "auto"
    ) -> tuple[int, ...]:
        return (num_blocks, num_kv_heads, block_size, cls.slot_bytes(head_size))

    @staticmethod
    def get_kv_cache_stride_order(include_num_layers_dimension: bool = False) -> tuple[int, ...]:
        return (0, 1, 2, 3, 4) if include_num_layers_dimension else (0, 1, 2, 3)

    @classmethod
    def supported_kv_cache_layouts(cls) -> Any:
        return compat.supported_kv_cache_layouts()

    @classmethod
    def indexes_kv_by_block_stride(cls) -> bool:
        """The kernels address a block through the page tensor's stride(0), so vLLM may pad pages (0.26
        asks this before padding; 0.32 pads regardless, `check_pages` accepts the strided view)."""
        return True

    @classmethod
    def supports_kv_connector(cls) -> bool:
        return False


def _class_name(fmt_name: str) -> str:
    return "".join(p.capitalize() for p in fmt_name.split("_")) + "AttentionBackend"


def _make_backend(fmt_name: str) -> type[CQAttentionBackend]:
    return type(
        _class_name(fmt_name),
        (CQAttentionBackend,),
        {
            "FORMAT": fmt_name,
            "get_name": staticmethod(lambda: compat.backend_enum_name(fmt_name)),
            "__module__": __name__,
        },
    )


BACKENDS: dict[str, type[CQAttentionBackend]] = {}
for _name in format_names():
    BACKENDS[_name] = globals()[_class_name(_name)] = _make_backend(_name)


def backend_path(fmt_name: str) -> str:
    return f"{__name__}.{_class_name(fmt_name)}"


@functools.cache
def window_backend(fmt_name: str) -> type[CQAttentionBackend]:
    """The backend of a cq layer's recent-window shadow (`compat` P7): pages of the model dtype,
    [blocks, kv_heads, block_size, K | V], as vLLM's own SlidingWindowSpec sizes them. Its metadata is
    the window group's block table and slot mapping; the cq layer's impl reads it (`compat.window_step`)."""
    base = BACKENDS[fmt_name]

    class Window(base):  # type: ignore[valid-type, misc]
        @classmethod
        def customize_spec(cls, spec: Any) -> Any:
            return spec

        @classmethod
        def supports_kv_cache_dtype(cls, kv_cache_dtype: str | None) -> bool:
            return True

        @classmethod
        def get_kv_cache_shape(
            cls, num_blocks: int, block_size: int, num_kv_heads: int, head_size: int, cache_dtype_str: str = "auto"
        ) -> tuple[int, ...]:
            return (num_blocks, num_kv_heads, block_size, 2 * head_size)

    Window.__name__ = Window.__qualname__ = base.__name__.replace("AttentionBackend", "WindowBackend")
    globals()[Window.__name__] = Window  # importable by name, like the format backends
    return Window
