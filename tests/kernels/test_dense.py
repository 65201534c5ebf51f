"""The shared dense attention step of the reference paths: chunking queries changes only rounding, and it
equals SDPA with the causal offset of a sequence's last tokens."""

from __future__ import annotations

import torch

from vllm_cq.kernels.dense import attend_last_queries


def test_chunked_equals_whole_and_sdpa():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(n, 4, 16, generator=g) for n in (13, 40, 40))
    whole = attend_last_queries(q, k, v, 0.25)
    assert torch.allclose(attend_last_queries(q, k, v, 0.25, chunk=3), whole, atol=1e-6)
    mask = torch.arange(40)[None, :] <= (27 + torch.arange(13))[:, None]
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, scale=0.25
    ).transpose(0, 1)
    assert torch.allclose(whole, ref, atol=1e-5)
