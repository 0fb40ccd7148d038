"""Fast spectral paths (Gram eigh, QR products) against full SVDs, and the capacity formula by hand."""

import math

import numpy as np
import pytest
import torch

from nsds.metrics.spectra import (
    capacity,
    energy_rank,
    gram_of_columns,
    product_triplets,
    readout_complement,
    triplets,
    writing_density,
)
from nsds.reference import kept_triplets, readout_basis, spectral_capacity


def rand(shape, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).standard_t(4.0, size=shape))


def same_vectors(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference between two sets of column vectors, up to each column's sign."""
    signs = torch.sign((a * b).sum(dim=0))
    return float((a - b * signs).abs().max())


def test_gram_lower_triangle_is_exact():
    w = rand((130, 37))
    full = w.T @ w
    got = gram_of_columns(w, torch.float64, block_bytes=2048, strips=5)
    assert torch.allclose(torch.tril(got), torch.tril(full), rtol=1e-13, atol=1e-11)


@pytest.mark.parametrize("shape", [(120, 40), (40, 120)])
@pytest.mark.parametrize("side", ["left", "right"])
def test_triplets_match_full_svd(shape, side):
    w = rand(shape, seed=1)
    u, s, vt = torch.linalg.svd(w, full_matrices=False)
    sigma, vectors = triplets(w, side)
    assert torch.allclose(sigma, s, rtol=1e-10)
    expected = u if side == "left" else vt.T
    assert same_vectors(vectors, expected) < 1e-9


def test_product_triplets_match_full_svd_with_gqa():
    a, b = rand((4, 50, 6), seed=2), rand((2, 6, 60), seed=3)
    group = torch.tensor([0, 0, 1, 1])
    sigma, left, right = product_triplets(a, b, group)
    for h in range(4):
        u, s, vt = torch.linalg.svd(a[h] @ b[group[h]])
        assert torch.allclose(sigma[h], s[:6], rtol=1e-10)
        assert same_vectors(left[h], u[:, :6]) < 1e-9
        assert same_vectors(right[h], vt[:6].T) < 1e-9
    sigma_only, left_only, none = product_triplets(a, b, group, right=False)  # writers need U alone
    assert none is None and torch.equal(sigma_only, sigma) and torch.allclose(left_only, left, atol=1e-12)


def test_energy_rank_rule_and_clipping():
    sigma = torch.tensor([3.0, 2.0, 1.0, 0.5, 0.1], dtype=torch.float64)
    for threshold in (0.5, 0.9, 0.99, 0.999, 1.0):
        assert int(energy_rank(sigma, threshold)) == kept_triplets(sigma.numpy(), threshold)
    assert int(energy_rank(torch.tensor([10.0, 1e-3, 1e-4], dtype=torch.float64), 0.99)) == 2  # clipped up to 2
    assert int(energy_rank(torch.zeros(4, dtype=torch.float64), 0.99)) == 2


def test_capacity_by_hand():
    sigma = torch.tensor([4.0, 2.0, 1.0], dtype=torch.float64)
    beta = torch.tensor([0.5, 1.0, 3.0], dtype=torch.float64)
    s = [2.0, 2.0]  # k = 2 keeps the first two: s = beta * sigma
    p = [0.5, 0.5]
    entropy = -sum(pi * math.log(pi) for pi in p)
    expected = sum(s) / math.exp(entropy)  # = 4 / 2
    assert float(capacity(sigma, beta, torch.tensor(2))) == pytest.approx(expected) == pytest.approx(2.0)
    assert float(capacity(sigma, torch.zeros(3, dtype=torch.float64), torch.tensor(3))) == 0.0
    one_hot = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)  # one triplet carries all: SE = s_1
    assert float(capacity(sigma, one_hot, torch.tensor(3))) == pytest.approx(4.0)
    assert float(capacity(sigma, beta, torch.tensor(3))) == pytest.approx(
        spectral_capacity(sigma.numpy(), beta.numpy(), 3)
    )


def test_writing_density_complement_equals_projection():
    unembedding = rand((300, 24), seed=4) * torch.linspace(3, 0.1, 24, dtype=torch.float64)
    complement, k_u = readout_complement(gram_of_columns(unembedding, torch.float64), 0.9)
    p = torch.from_numpy(readout_basis(unembedding, 0.9))
    assert p.shape[1] == k_u and complement.shape[1] == 24 - k_u
    u = torch.linalg.qr(rand((24, 10), seed=5)).Q
    assert torch.allclose(writing_density(u, complement), torch.linalg.vector_norm(p.T @ u, dim=0), rtol=1e-10)
