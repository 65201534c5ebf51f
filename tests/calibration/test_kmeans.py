"""Weighted k-means: it must beat random codebooks, and Fisher weights must pay where they point."""

from __future__ import annotations

import pytest
import torch

from vllm_cq.calibration.kmeans import _draw, kmeans_pp_init, quantization_error, weighted_kmeans


def clustered(G: int, N: int, c: int, clusters: int = 40) -> torch.Tensor:
    centers = torch.randn(G, clusters, c) * 3
    idx = torch.randint(0, clusters, (G, N))
    return torch.gather(centers, 1, idx[..., None].expand(-1, -1, c)) + 0.3 * torch.randn(G, N, c)


def test_kmeans_beats_random_codebooks():
    x = clustered(4, 4000, 4)
    k = 32
    fitted = weighted_kmeans(x, None, k, iters=30)
    random_gauss = torch.randn(4, k, 4) * x.std()
    random_points = x[:, torch.randperm(4000)[:k]]
    e_fit = quantization_error(x, None, fitted)
    assert e_fit < 0.5 * quantization_error(x, None, random_gauss)
    assert e_fit < 0.8 * quantization_error(x, None, random_points)
    # Lloyd iterations only improve on the k-means++ start
    init = kmeans_pp_init(x, torch.ones(4, 4000), k, torch.Generator().manual_seed(0))
    assert e_fit <= quantization_error(x, None, init) + 1e-6


def test_fisher_weighting_lowers_fisher_weighted_error():
    """Weights concentrated on one region of the data: weighted k-means spends centroids there."""
    G, N, c, k = 3, 3000, 4, 16
    x = torch.randn(G, N, c)
    w = torch.where(x[..., 0] > 1.0, 1.0, 1e-3)  # ~16% of points carry almost all the sensitivity
    uniform = weighted_kmeans(x, None, k, iters=40)
    fisher = weighted_kmeans(x, w, k, iters=40)
    e_u, e_f = quantization_error(x, w, uniform), quantization_error(x, w, fisher)
    assert e_f < 0.8 * e_u, (e_f, e_u)
    # ... and it pays for it on the unweighted error, as it should
    assert quantization_error(x, None, fisher) > quantization_error(x, None, uniform)


def test_deterministic_with_seed():
    x = clustered(2, 1000, 2)
    a = weighted_kmeans(x, None, 16, iters=5, seed=3)
    b = weighted_kmeans(x, None, 16, iters=5, seed=3)
    c = weighted_kmeans(x, None, 16, iters=5, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_degenerate_data_and_zero_weights():
    x = torch.zeros(2, 300, 4)
    x[:, 150:] = 1.0  # only two distinct points, 8 centroids
    w = torch.zeros(2, 300)
    cents = weighted_kmeans(x, w, 8, iters=5)
    assert torch.isfinite(cents).all()
    assert quantization_error(x, None, weighted_kmeans(x, None, 8, iters=5)) < 1e-10


def test_too_few_points():
    with pytest.raises(ValueError, match="at least 256 calibration vectors"):
        weighted_kmeans(torch.randn(1, 100, 8), None, 256)


def test_draw_follows_the_probabilities():
    """k-means++'s sampler: frequencies match p row by row, zero-probability points never come up,
    an all-zero row is uniform, and the same seed gives the same draws."""
    p = torch.tensor([[0.0, 1.0, 3.0, 0.0, 6.0], [0.0, 0.0, 0.0, 0.0, 0.0]]).repeat(2000, 1)
    draws = _draw(p, torch.Generator().manual_seed(0)).view(2000, 2)
    first = torch.bincount(draws[:, 0], minlength=5).double() / 2000
    assert first[0] == 0 and first[3] == 0
    assert torch.allclose(first[[1, 2, 4]], torch.tensor([0.1, 0.3, 0.6], dtype=torch.float64), atol=0.04)
    second = torch.bincount(draws[:, 1], minlength=5).double() / 2000
    assert torch.allclose(second, torch.full((5,), 0.2, dtype=torch.float64), atol=0.04)
    assert torch.equal(draws.flatten(), _draw(p, torch.Generator().manual_seed(0)))
