"""Collect pre-RoPE keys, values and their Fisher information from a HF transformers causal LM.

For every decoder layer, the outputs of `k_proj` and `v_proj` are the keys *before* rotary embedding
and the values. A forward hook detaches each output and marks it as requiring grad, so one backward
pass of the LM loss yields d loss / d k_proj-output without any parameter gradients; the squared
gradient is the (diagonal, empirical) Fisher information of each channel.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from vllm_cq.errors import CQConfigError
from vllm_cq.support import check_architecture


@dataclass
class LayerStats:
    """One layer's calibration data, N = tokens seen, H kv heads, D head_dim (CPU, float32)."""

    keys: torch.Tensor  # [N, H, D] pre-RoPE
    values: torch.Tensor  # [N, H, D]
    key_fisher: torch.Tensor  # [N, H, D] squared gradients
    value_fisher: torch.Tensor  # [N, H, D]


def attention_projections(model: torch.nn.Module) -> list[tuple[torch.nn.Module, torch.nn.Module]]:
    """(k_proj, v_proj) per decoder layer, in layer order; refuses architectures it cannot vouch for."""
    archs = list(getattr(model.config, "architectures", None) or [type(model).__name__])
    check_architecture(archs[0])
    layers = model.model.layers
    return [(layer.self_attn.k_proj, layer.self_attn.v_proj) for layer in layers]


def collect(
    model: torch.nn.Module,
    batches: Iterable[torch.Tensor],
    num_batches: int | None = None,
    progress: bool = True,
) -> list[LayerStats]:
    """Run the model (with LM loss) on token batches [B, T]; return per-layer K/V and Fisher stats."""
    cfg = model.config
    heads = cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    projs = attention_projections(model)
    live: dict[tuple[int, str], torch.Tensor] = {}

    def make_hook(i: int, kind: str):
        def hook(_mod: torch.nn.Module, _inp: tuple, out: torch.Tensor) -> torch.Tensor:
            out = out.detach().requires_grad_(True)
            live[(i, kind)] = out
            return out

        return hook

    handles = []
    for i, (k, v) in enumerate(projs):
        handles.append(k.register_forward_hook(make_hook(i, "k")))
        handles.append(v.register_forward_hook(make_hook(i, "v")))
    acc: dict[tuple[int, str], list[tuple[torch.Tensor, torch.Tensor]]] = {
        (i, kind): [] for i in range(len(projs)) for kind in "kv"
    }
    model.requires_grad_(False)
    model.eval()
    device = next(model.parameters()).device
    try:
        for ids in tqdm(batches, total=num_batches, desc="collect K/V + Fisher", disable=not progress):
            ids = ids.to(device)
            live.clear()
            with torch.enable_grad():
                loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
            for key, out in live.items():
                x = out.detach().float().reshape(-1, heads, head_dim).cpu()
                g = out.grad.float().reshape(-1, heads, head_dim).cpu()
                acc[key].append((x, g * g))
    finally:
        for h in handles:
            h.remove()
    stats = []
    for i in range(len(projs)):
        k = acc[(i, "k")]
        v = acc[(i, "v")]
        stats.append(
            LayerStats(
                keys=torch.cat([a for a, _ in k]),
                values=torch.cat([a for a, _ in v]),
                key_fisher=torch.cat([b for _, b in k]),
                value_fisher=torch.cat([b for _, b in v]),
            )
        )
    return stats


def token_batches(ids: torch.Tensor, num_seqs: int, seq_len: int, batch_size: int = 1) -> list[torch.Tensor]:
    """Cut a 1-D token stream into up to num_seqs non-overlapping sequences of seq_len, batched."""
    have = ids.numel() // seq_len
    if have == 0:
        raise CQConfigError(
            f"calibration text has {ids.numel()} tokens, fewer than one sequence of {seq_len}; "
            "use a longer text or a smaller --seq-len"
        )
    n = min(num_seqs, have)
    seqs = ids[: n * seq_len].view(n, seq_len)
    return list(seqs.split(batch_size))
