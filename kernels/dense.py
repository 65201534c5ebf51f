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


def attend_last_queries_windowed(
    q: torch.Tensor,
    k_old: torch.Tensor,
    v_old: torch.Tensor,
    k_win: torch.Tensor,
    v_win: torch.Tensor,
    seq_len: int,
    window: int,
    scale: float,
    chunk: int = 1024,
) -> torch.Tensor:
    """Like `attend_last_queries` with two key sources and one softmax: query i (the sequence's last
    Q of `seq_len` positions) sees keys i - window < j <= i from k_win/v_win and keys j <= i - window
    from k_old/v_old (GQA heads already repeated).

    k_old, v_old [n_old, Hq, D] hold positions 0..n_old-1 (the codes, dequantized and rotated);
    k_win, v_win [n_win, Hq, D] hold the exact positions seq_len-n_win..seq_len-1. Every entry given
    must be finite: a score outside its row's range is replaced by -inf before the softmax, but a
    value is multiplied by a zero weight. Returns float32 [Q, Hq, D]."""
    n_q, n_old, n_win = q.shape[0], k_old.shape[0], k_win.shape[0]
    dev = q.device
    pos_old = torch.arange(n_old, device=dev)
    pos_win = torch.arange(seq_len - n_win, seq_len, device=dev)
    out = torch.empty(q.shape, dtype=torch.float32, device=dev)
    ko, vo, kw, vw = k_old.float(), v_old.float(), k_win.float(), v_win.float()
    for s in range(0, n_q, chunk):
        e = min(n_q, s + chunk)
        qf = q[s:e].float()
        q_pos = (seq_len - n_q + torch.arange(s, e, device=dev))[None, :, None]  # [1, q, 1]
        s_old = torch.einsum("qhd,khd->hqk", qf, ko) * scale
        s_old = s_old.masked_fill(pos_old[None, None, :] > q_pos - window, float("-inf"))
        s_win = torch.einsum("qhd,khd->hqk", qf, kw) * scale
        in_win = (pos_win[None, None, :] > q_pos - window) & (pos_win[None, None, :] <= q_pos)
        s_win = s_win.masked_fill(~in_win, float("-inf"))
        p = torch.cat([s_old, s_win], dim=-1).softmax(-1)
        out[s:e] = torch.einsum("hqk,khd->qhd", p[..., :n_old], vo) + torch.einsum("hqk,khd->qhd", p[..., n_old:], vw)
    return out
