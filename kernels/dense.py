"""Plain-torch attention of one sequence's new queries over its dense (already dequantized, already
rotated) keys and values: the last step of every family's reference paged attention."""

from __future__ import annotations

import torch


def attend_last_queries(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool = True, chunk: int = 1024
) -> torch.Tensor:
    """q [Q, Hq, D] are the sequence's last Q tokens; k, v [L, Hq, D] all its keys/values (GQA heads
    already repeated). Returns float32 [Q, Hq, D]. Queries go in chunks, so memory stays
    O(chunk x L) per head on long prompts (every row's softmax is still computed whole)."""
    n_q, n_k = q.shape[0], k.shape[0]
    pos = torch.arange(n_k, device=q.device)
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    kf, vf = k.float(), v.float()
    for s in range(0, n_q, chunk):
        e = min(n_q, s + chunk)
        scores = torch.einsum("qhd,khd->hqk", q[s:e].float(), kf) * scale
        if causal:
            q_pos = n_k - n_q + torch.arange(s, e, device=q.device)
            scores = scores.masked_fill(pos[None, None, :] > q_pos[None, :, None], float("-inf"))
        out[s:e] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), vf)
    return out
