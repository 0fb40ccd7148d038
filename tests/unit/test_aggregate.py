"""MAD-Sigmoid and Soft-OR by hand, their degenerate cases, and the per-layer aggregation."""

import math

import numpy as np
import pytest

from nsds.aggregate import mad_sigmoid, soft_or
from nsds.scorers.nsds import NsdsParams, RawRole, aggregate
from nsds.scores import ranking


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_mad_sigmoid_by_hand():
    r = np.array([1.0, 2.0, 3.0, 4.0, 100.0])
    # median 3, |r - 3| = [2, 1, 0, 1, 97] -> MAD 1; z = (r - 3) / 1.4826
    expected = [sigmoid((x - 3) / 1.4826) for x in r]
    assert np.allclose(mad_sigmoid(r), expected, rtol=1e-9)
    assert np.allclose(mad_sigmoid(r, mad_constant=1.0, temperature=2.0), [sigmoid((x - 3) / 2) for x in r])


def test_mad_sigmoid_uses_the_true_median_of_even_length():
    r = np.array([1.0, 2.0, 4.0, 10.0])  # median 3 (torch.median would say 2)
    p = mad_sigmoid(r)
    assert p[1] < 0.5 < p[2]
    assert p[1] + p[2] == pytest.approx(1.0)  # 2 and 4 sit symmetrically about 3


def test_mad_sigmoid_degenerate_vectors():
    r = np.array([5.0, 5.0, 5.0, 5.0, 9.0])  # MAD = 0 -> 1.2533 * mean|r - median| = 1.2533 * 0.8
    assert np.allclose(mad_sigmoid(r), [sigmoid((x - 5) / (1.2533 * 0.8)) for x in r])
    assert np.array_equal(mad_sigmoid(np.full(6, 2.5)), np.full(6, 0.5))
    assert np.all(np.isfinite(mad_sigmoid(np.array([0.0, 0.0, 1e300]))))


def test_soft_or_forms():
    p = np.array([[0.2, 0.9], [0.5, 0.0]])  # two sources x two layers
    assert np.allclose(soft_or(p), [1 - math.sqrt(0.8 * 0.5), 1 - math.sqrt(0.1 * 1.0)])
    assert np.allclose(soft_or(p, "product"), [1 - 0.8 * 0.5, 1 - 0.1])
    assert soft_or(np.array([[1.0], [1.0]]), eps=0.0)[0] == 1.0
    with pytest.raises(ValueError):
        soft_or(p, "bogus")


def test_aggregate_is_per_layer_and_skips_uninformative_roles():
    """The authors' Soft-OR averaged over all layers at once (docs/METHOD.md §6, defect 2): scores must differ."""
    raw = [
        {"qk": RawRole(nv=nv, se=se, kept=4), "ov": RawRole(nv=1.0, se=0.0, kept=4)}
        for nv, se in [(1.0, 3.0), (2.0, 1.0), (9.0, 2.0), (1.5, 8.0)]
    ]
    layers = aggregate(raw, NsdsParams())
    p_nv_qk = mad_sigmoid(np.array([1.0, 2.0, 9.0, 1.5]))
    p_se_qk = mad_sigmoid(np.array([3.0, 1.0, 2.0, 8.0]))
    for i, layer in enumerate(layers):
        assert layer.roles["ov"].se_p is None  # all-zero SE: left out of the SE Soft-OR
        assert layer.roles["ov"].nv_p == 0.5  # constant NV: neutral, but present
        assert layer.nv == pytest.approx(1 - math.sqrt((1 - p_nv_qk[i] + 1e-12) * (1 - 0.5 + 1e-12)))
        assert layer.se == pytest.approx(p_se_qk[i])
        assert layer.score == pytest.approx(1 - math.sqrt((1 - layer.nv) * (1 - layer.se)))
    assert len({round(layer.score, 12) for layer in layers}) == 4


def test_ranking_is_descending_and_stable():
    """Most sensitive first (the authors' script sorted ascending: docs/METHOD.md §6, defect 4); ties by index."""
    assert ranking([0.1, 0.9, 0.5, 0.9]) == [1, 3, 2, 0]
