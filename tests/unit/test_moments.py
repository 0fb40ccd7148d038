"""Kurtosis helpers against the textbook formula (nsds.reference) on heavy-tailed and degenerate inputs."""

import numpy as np
import pytest
import torch

from nsds.metrics.moments import kurtosis, product_kurtosis
from nsds.reference import excess_kurtosis


def heavy(shape, seed=0, df=3.0):
    """Student-t entries: heavy tails, like real weight outliers."""
    gen = np.random.default_rng(seed)
    return torch.from_numpy(gen.standard_t(df, size=shape))


def test_kurtosis_matches_formula_and_known_values():
    x = heavy((300, 70))
    assert float(kurtosis(x)) == pytest.approx(excess_kurtosis(x.numpy()), rel=1e-12)
    # A symmetric two-point distribution has excess kurtosis exactly -2.
    assert float(kurtosis(torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64))) == pytest.approx(-2.0)


def test_kurtosis_of_constant_is_zero_not_nan():
    assert float(kurtosis(torch.full((5, 5), 3.0, dtype=torch.float64))) == 0.0
    assert float(kurtosis(torch.zeros(7, dtype=torch.float64))) == 0.0


def test_column_kurtosis():
    x = heavy((200, 6), seed=1)
    got = kurtosis(x, dim=-2)
    assert got.shape == (6,)
    for j in range(6):
        assert float(got[j]) == pytest.approx(excess_kurtosis(x[:, j].numpy()), rel=1e-12)


@pytest.mark.parametrize("block_bytes", [1 << 30, 4096])  # one block, and many small row blocks
def test_product_kurtosis_matches_formed_products(block_bytes):
    a = heavy((3, 90, 7), seed=2) + 0.3  # non-zero mean exercises the folded mean
    b = heavy((3, 7, 110), seed=3)
    got = product_kurtosis(a, b, block_bytes=block_bytes)
    for h in range(3):
        assert float(got[h]) == pytest.approx(excess_kurtosis((a[h] @ b[h]).numpy()), rel=1e-10)


def test_product_kurtosis_of_zero_factor_is_zero():
    a = torch.zeros(2, 10, 3, dtype=torch.float64)
    b = heavy((2, 3, 12))
    assert torch.equal(product_kurtosis(a, b), torch.zeros(2, dtype=torch.float64))
