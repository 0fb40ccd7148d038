"""The oracle's cache (resume, key check, damaged file) and the rank correlations against hand values."""

import json
import math
from collections.abc import Iterator

import numpy as np
import pytest

from nsds.evaluate.oracle import (
    average_ranks,
    cache_path,
    kendall,
    single_layer_sensitivity,
    spearman,
    unit_sensitivity,
)

import needs


def test_average_ranks_share_ties():
    assert average_ranks([10, 30, 20, 20]).tolist() == [1.0, 4.0, 2.5, 2.5]


def test_spearman_and_kendall_by_hand():
    x = [1, 2, 3, 4, 5]
    assert spearman(x, [2, 4, 6, 8, 10]) == pytest.approx(1.0)
    assert spearman(x, [5, 4, 3, 2, 1]) == pytest.approx(-1.0)
    assert kendall(x, [5, 4, 3, 2, 1]) == pytest.approx(-1.0)
    # one swapped pair: rho = 1 - 6 * sum d^2 / (n (n^2 - 1)) = 1 - 6 * 2 / 120 = 0.9; tau = (9 - 1) / 10
    assert spearman(x, [1, 2, 3, 5, 4]) == pytest.approx(0.9)
    assert kendall(x, [1, 2, 3, 5, 4]) == pytest.approx(0.8)
    # monotone transforms do not matter
    assert spearman(x, np.exp([1, 2, 3, 5, 4])) == pytest.approx(0.9)


def test_kendall_tau_b_with_ties():
    # x has a tie (pairs: 6; concordant 5, discordant 0, one tied in x): tau_b = 5 / sqrt(5 * 6)
    assert kendall([1, 1, 2, 3], [1, 2, 3, 4]) == pytest.approx(5 / math.sqrt(30))


def test_correlations_match_scipy_with_ties():
    scipy = needs.module("scipy.stats")  # a test extra; the package itself does not need scipy
    rng = np.random.default_rng(0)
    for _ in range(5):
        a, b = rng.integers(0, 4, 12), rng.normal(size=12)
        assert kendall(a, b) == pytest.approx(scipy.kendalltau(a, b).statistic)
        assert spearman(a, b) == pytest.approx(scipy.spearmanr(a, b).statistic)


def test_constant_side_gives_nan():
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3])) and math.isnan(kendall([1, 2, 3], [4, 4, 4]))


class Counter:
    def __init__(self, fail_at: int | None = None) -> None:
        self.calls: list[int] = []
        self.fail_at = fail_at

    def __call__(self, layers: list[int]) -> Iterator[tuple[int, float]]:
        for layer in layers:
            if layer == self.fail_at:
                raise KeyboardInterrupt
            self.calls.append(layer)
            yield layer, 100.0 + layer


def test_cache_resumes_after_an_interruption_and_skips_finished_layers(tmp_path):
    key = {"model": "m", "quantizer": "rtn", "bits": 2}
    path = cache_path(key, tmp_path)
    interrupted = Counter(fail_at=3)
    with pytest.raises(KeyboardInterrupt):
        single_layer_sensitivity(5, interrupted, key, path)
    assert interrupted.calls == [0, 1, 2]
    resumed = Counter()
    assert single_layer_sensitivity(5, resumed, key, path) == [100.0, 101.0, 102.0, 103.0, 104.0]
    assert resumed.calls == [3, 4]
    again = Counter()
    assert single_layer_sensitivity(5, again, key, path) == [100.0, 101.0, 102.0, 103.0, 104.0]
    assert again.calls == []


def test_cache_is_keyed_and_survives_damage(tmp_path):
    key = {"model": "m", "bits": 2}
    other = {"model": "m", "bits": 3}
    assert cache_path(key, tmp_path) != cache_path(other, tmp_path)
    path = cache_path(key, tmp_path)
    single_layer_sensitivity(2, Counter(), key, path)
    data = json.loads(path.read_text())
    assert data["schema"] == "nsds.oracle/1" and data["key"] == key and data["ppl"] == {"0": 100.0, "1": 101.0}
    stale = Counter()  # the same file under another key is not trusted
    single_layer_sensitivity(2, stale, other, path)
    assert stale.calls == [0, 1]
    path.write_text("{not json")
    damaged = Counter()
    assert single_layer_sensitivity(2, damaged, key, path) == [100.0, 101.0]
    assert damaged.calls == [0, 1]


def test_module_group_units_resume_and_reject_foreign_units(tmp_path, capsys):
    key = {"model": "m", "bits": 3, "units": "groups"}
    path = cache_path(key, tmp_path)
    units = ["0.qkv", "0.o", "1.qkv", "1.o"]
    calls: list[str] = []

    def measure(todo: list[str]) -> Iterator[tuple[str, float]]:
        for unit in todo:
            if unit == "1.qkv" and "interrupted" not in calls:
                calls.append("interrupted")
                raise KeyboardInterrupt
            calls.append(unit)
            yield unit, 10.0 + units.index(unit)

    with pytest.raises(KeyboardInterrupt):
        unit_sensitivity(units, measure, key, path)
    assert unit_sensitivity(units, measure, key, path) == [10.0, 11.0, 12.0, 13.0]
    assert calls == ["0.qkv", "0.o", "interrupted", "1.qkv", "1.o"]
    data = json.loads(path.read_text())
    path.write_text(json.dumps(data | {"ppl": data["ppl"] | {"2.qkv": 9.0}}))  # a unit this model lacks
    calls[:] = ["interrupted"]
    assert unit_sensitivity(units, measure, key, path) == [10.0, 11.0, 12.0, 13.0]
    assert calls == ["interrupted", *units] and "'2.qkv' is not one of the units" in capsys.readouterr().err
