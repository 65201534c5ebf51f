"""Weighted k-means with k-means++ initialisation, batched over independent groups.

CQ fits one codebook per channel group; all groups of a layer are fitted at once as a batch:
    x  [G, N, c]  the N calibration vectors of each group
    w  [G, N]     their weights (Fisher information, or ones for the uniform ablation)
Result: centroids [G, K, c]. Deterministic for a given seed on CPU (on CUDA the weighted sums use
atomics, so the last bits may differ between runs).
"""

from __future__ import annotations

import torch

from vllm_cq.kernels.cq.naive import encode


def _sq_dist(xt: torch.Tensor, c: torch.Tensor, buf: torch.Tensor) -> torch.Tensor:
    """||x - c||^2 for x given channel-major, xt [G, c, N], and one centroid per group c [G, c] -> [G, N],
    in the scratch `buf` (xt's shape). Channel-major because a sum over a last dim of 2-16 channels is 20x
    slower on a CPU (5.6 vs 0.27 ms for 48 x 8,192 x 4), and k-means++ takes 255 of these per codebook;
    the scratch because a fresh buffer of that size costs as much again in page faults."""
    return torch.sub(xt, c[:, :, None], out=buf).square_().sum(1)


def _draw(p: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One index per row with probability ~ p, by inverse CDF on p's device; only one uniform per row
    comes from the CPU generator, so seeds reproduce anywhere and a GPU never ships [G, N]
    probabilities to the host 256 times per codebook. Rows that sum to zero (all mass on already
    chosen points) fall back to uniform sampling; zero-probability points are never drawn."""
    p = p.double()
    cdf = (p + (p.sum(-1, keepdim=True) <= 0)).cumsum_(-1)  # all-zero rows: + 1 everywhere
    u = torch.rand(p.shape[0], 1, generator=generator, dtype=torch.float64).to(p.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_max(p.shape[1] - 1)


def kmeans_pp_init(x: torch.Tensor, w: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """Weighted k-means++: each next centroid is drawn with probability ~ w * D(x)^2."""
    G, N, c = x.shape
    rows = torch.arange(G, device=x.device)
    first = _draw(w, generator).to(x.device)
    cents = torch.empty(G, k, c, dtype=x.dtype, device=x.device)
    xt = x.transpose(1, 2).contiguous()
    buf = torch.empty_like(xt)
    cents[:, 0] = x[rows, first]
    d2 = _sq_dist(xt, cents[:, 0], buf)
    for j in range(1, k):
        idx = _draw(w * d2, generator).to(x.device)
        cents[:, j] = x[rows, idx]
        torch.minimum(d2, _sq_dist(xt, cents[:, j], buf), out=d2)
    return cents


def assign(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Nearest centroid per vector: codes [G, N] (same chunked search the cache writer uses)."""
    return encode(x.transpose(0, 1), centroids).transpose(0, 1)


def weighted_kmeans(
    x: torch.Tensor,
    w: torch.Tensor | None,
    k: int,
    iters: int = 100,
    seed: int = 0,
    init: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fit k centroids per group minimising sum_n w_n ||x_n - c(x_n)||^2. Returns [G, k, c] float32.

    Stops early once no assignment changes. A cluster that loses all weight keeps its centroid.
    """
    x = x.float()
    G, N, c = x.shape
    w = torch.ones(G, N, device=x.device) if w is None else w.float().to(x.device)
    if w.shape != (G, N):
        raise ValueError(f"weights {tuple(w.shape)} do not match data {(G, N)}")
    if N < k:
        raise ValueError(f"need at least {k} calibration vectors per group for {k} centroids, got {N}")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    cents = init.float().clone() if init is not None else kmeans_pp_init(x, w, k, gen)
    cents = cents.to(x.device)
    codes = None
    for _ in range(iters):
        new = assign(x, cents)
        if codes is not None and torch.equal(new, codes):
            break
        codes = new
        wsum = torch.zeros(G, k, device=x.device).scatter_add_(1, codes, w)
        sums = torch.zeros(G, k, c, device=x.device).scatter_add_(
            1, codes[..., None].expand(-1, -1, c), w[..., None] * x
        )
        keep = wsum <= 0
        cents = torch.where(keep[..., None], cents, sums / wsum.clamp_min(1e-30)[..., None])
    return cents


def quantization_error(x: torch.Tensor, w: torch.Tensor | None, centroids: torch.Tensor) -> float:
    """Relative (weighted) squared error sum w||x - q(x)||^2 / sum w||x||^2 of x [G, N, c]."""
    x = x.float()
    codes = assign(x, centroids)
    q = torch.gather(centroids, 1, codes[..., None].expand(-1, -1, x.shape[-1]))
    err = ((x - q) ** 2).sum(-1)
    ref = (x**2).sum(-1)
    if w is not None:
        w = w.float().to(x.device)
        err, ref = err * w, ref * w
    return float(err.sum() / ref.sum().clamp_min(1e-30))
