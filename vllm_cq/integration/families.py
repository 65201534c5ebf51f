"""What the attention backend does per quantization family: what a layer loads on its device, how a
step's keys/values are written into the paged cache, and how attention over the stored bytes runs.
The backend picks the class by `KVFormat.family`, so a new family is one class here plus its kernels
(`kernels/<family>/ops.py`) and tests; formats, page sizes, registration and errors are shared.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch

from vllm_cq.errors import CQConfigError
from vllm_cq.formats import KVFormat
from vllm_cq.integration import compat
from vllm_cq.integration.config import kv_head_range, load_checked, model_identity, resolve_codebook_path
from vllm_cq.kernels.cq import ops as cq_ops
from vllm_cq.kernels.kvtq import ops as tq_ops
from vllm_cq.kernels.window import WindowCache


class Step(Protocol):
    """The attention metadata fields the families read (`backend.CQAttentionMetadata`)."""

    max_query_len: int
    num_decodes: int
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_table: torch.Tensor
    slot_mapping: torch.Tensor


@functools.lru_cache(maxsize=8)
def rank_codebooks(path: str, fmt_name: str, identity: Any, start: int, end: int) -> Any:
    """This rank's kv-head slice of the model's codebooks, cut once per process for all layers."""
    return load_checked(path, fmt_name, identity).select_heads(start, end)


@functools.lru_cache(maxsize=4)
def rope_table(
    head_size: int, rotary_dim: int | None, device: torch.device, rope_theta: float | None, max_position: int | None
) -> tuple[torch.Tensor, bool]:
    """One RoPE table per model and device shared by all layers (Llama-3.1's is 64 MiB in float32).
    Keyed by the model's RoPE too: a second model built in the same process with the same head size
    but another rope_theta must not get the first one's table (wrong tokens, no error)."""
    return compat.rotary_embedding(head_size, rotary_dim, device, rope_theta, max_position)


@dataclass
class CQLayerState:
    """One layer's codebooks (this rank's heads) and the RoPE table, on the layer's device."""

    k_codebook: torch.Tensor  # float32: encoding is an exact argmin
    v_codebook: torch.Tensor
    k_codebook_attn: torch.Tensor  # model dtype: what attention's tensor-core products read
    v_codebook_attn: torch.Tensor
    cos_sin_cache: torch.Tensor | None
    is_neox: bool


class CQFamily:
    """Coupled quantization: per-layer codebooks found through vLLM's config, pre-RoPE key codes."""

    name: ClassVar[str] = "cq"

    def __init__(self, fmt: KVFormat, head_size: int, scale: float, num_kv_heads: int) -> None:
        self.fmt, self.head_size, self.scale = fmt, head_size, scale
        vllm_config = compat.current_vllm_config()
        self.identity = model_identity(vllm_config)
        self.max_position = getattr(vllm_config.model_config.hf_text_config, "max_position_embeddings", None)
        self.codebook_path = resolve_codebook_path(
            fmt.name, vllm_config.additional_config, str(vllm_config.model_config.model)
        )
        rank, world = compat.tensor_parallel_rank_and_size()
        self.kv_heads = kv_head_range(rank, world, self.identity.num_kv_heads)
        if self.kv_heads[1] - self.kv_heads[0] != num_kv_heads:
            raise CQConfigError(f"rank {rank}/{world} holds {num_kv_heads} kv heads, expected {self.kv_heads}")

    def load(self, layer_name: str, device: torch.device, dtype: torch.dtype) -> CQLayerState:
        sub = rank_codebooks(self.codebook_path, self.fmt.name, self.identity, *self.kv_heads)
        idx = compat.layer_index(layer_name)
        if not 0 <= idx < sub.num_layers:
            raise CQConfigError(f"{layer_name}: no codebook for layer {idx} in {self.codebook_path}")
        cos_sin, is_neox = rope_table(
            self.head_size, self.identity.rotary_dim, device, self.identity.rope_theta, self.max_position
        )
        k, v = (t.to(device=device, dtype=torch.float32) for t in (sub.keys[idx], sub.values[idx]))
        return CQLayerState(k, v, k.to(dtype), v.to(dtype), cos_sin if sub.pre_rope else None, is_neox)

    def write(self, st: CQLayerState, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, md: Step) -> None:
        cq_ops.write_kv_cache(
            key, value, kv_cache, md.slot_mapping, st.k_codebook, st.v_codebook, self.fmt,
            md.query_start_loc, md.seq_lens, st.cos_sin_cache, st.is_neox,
        )  # fmt: skip

    def attend(
        self,
        st: CQLayerState,
        query: torch.Tensor,
        kv_cache: torch.Tensor,
        md: Step,
        out: torch.Tensor,
        window: WindowCache | None = None,
    ) -> None:
        cq_ops.paged_attention(
            query, kv_cache, st.k_codebook, st.v_codebook, self.fmt, md.block_table, md.seq_lens,
            md.query_start_loc, self.scale, st.cos_sin_cache, st.is_neox, max_query_len=md.max_query_len,
            out=out, k_codebook_attn=st.k_codebook_attn, v_codebook_attn=st.v_codebook_attn, window=window,
            num_decodes=md.num_decodes,
        )  # fmt: skip


class TernaryFamily:
    """KVTQ: nothing to load (scales are computed per group at write time); keys stored post-RoPE."""

    name: ClassVar[str] = "tq"

    def __init__(self, fmt: KVFormat, head_size: int, scale: float, num_kv_heads: int) -> None:
        self.fmt, self.scale = fmt, scale

    def load(self, layer_name: str, device: torch.device, dtype: torch.dtype) -> None:
        return None

    def write(self, st: None, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, md: Step) -> None:
        tq_ops.write_kv_cache(key, value, kv_cache, md.slot_mapping, self.fmt)

    def attend(
        self,
        st: None,
        query: torch.Tensor,
        kv_cache: torch.Tensor,
        md: Step,
        out: torch.Tensor,
        window: WindowCache | None = None,
    ) -> None:
        tq_ops.paged_attention(
            query, kv_cache, self.fmt, md.block_table, md.seq_lens, md.query_start_loc, self.scale,
            max_query_len=md.max_query_len, out=out, window=window,
        )  # fmt: skip


FAMILIES: dict[str, type[CQFamily] | type[TernaryFamily]] = {"cq": CQFamily, "tq": TernaryFamily}


def family_for(fmt: KVFormat, head_size: int, scale: float, num_kv_heads: int) -> CQFamily | TernaryFamily:
    try:
        cls = FAMILIES[fmt.family]
    except KeyError:
        raise CQConfigError(f"--kv-cache-dtype {fmt.name}: no attention backend for family {fmt.family!r}") from None
    return cls(fmt, head_size, scale, num_kv_heads)
