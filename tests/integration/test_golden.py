"""Golden-file regression: SmolLM2's NSDS layer scores (paper defaults, cpu float64) must not drift.

tests/golden/smollm2-scores.json was generated once from `nsds score smollm2` (its "note" says how).
Any change of the method's numbers, intended or not, fails here; regenerate the file only on purpose.
"""

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest

from nsds.compute import Compute
from nsds.files import sha256_file
from nsds.scorers.nsds import NsdsParams, aggregate, raw_roles, score
from nsds.weights import open_source

pytestmark = pytest.mark.integration

GOLDEN = Path(__file__).resolve().parent.parent / "golden" / "smollm2-scores.json"
REL, ABS = 1e-9, 1e-12


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=REL, abs_tol=ABS)


def mismatches(what: str, got: list[float], want: list[float]) -> list[str]:
    if len(got) != len(want):
        return [f"{what}: {len(got)} values, golden has {len(want)}"]
    pairs = enumerate(zip(got, want, strict=True))
    return [f"{what}[{i}]: {g!r} != golden {w!r}" for i, (g, w) in pairs if not close(g, w)]


@pytest.fixture(scope="module")
def golden() -> dict:
    return json.loads(GOLDEN.read_text())


@pytest.fixture(scope="module")
def smollm2_report(smollm2_gguf, golden):
    digest = sha256_file(smollm2_gguf)
    if digest != golden["model_sha256"]:
        pytest.fail(
            f"the smollm2 asset changed: {smollm2_gguf} has sha256 {digest}, the golden scores were made from "
            f"{golden['model_sha256']}; the golden file no longer applies (regenerate it on purpose)",
            pytrace=False,
        )
    with open_source(str(smollm2_gguf)) as source:
        return score(source, NsdsParams(), Compute())


def test_golden_file_is_well_formed(golden):
    layers = len(golden["scores"])
    assert layers > 0
    assert sorted(golden["ranking"]) == list(range(layers))
    assert all(len(golden[key]) == layers for key in ("nv", "se"))
    for role, aspects in golden["roles"].items():
        assert set(aspects) == {"nv_raw", "se_raw"}, role
        assert all(len(values) == layers for values in aspects.values()), role


def test_smollm2_scores_match_golden(smollm2_report, golden):
    report = smollm2_report
    assert report.model["files"][0]["sha256"] == golden["model_sha256"]
    assert report.compute["device"] == "cpu" and report.compute["dtype"] == "float64"
    assert report.roles == list(golden["roles"]), "the scored roles (or their order) changed"
    layers = report.layers
    bad = mismatches("score", [layer.score for layer in layers], golden["scores"])
    bad += mismatches("nv", [layer.nv for layer in layers], golden["nv"])
    bad += mismatches("se", [layer.se for layer in layers], golden["se"])
    for role, aspects in golden["roles"].items():
        for aspect, want in aspects.items():
            got = [getattr(layer.roles[role], aspect) for layer in layers]
            bad += mismatches(f"{role}.{aspect}", got, want)
    assert not bad, f"{len(bad)} values differ from {GOLDEN.name} (rel {REL}, abs {ABS}):\n" + "\n".join(bad[:20])
    assert report.ranking == golden["ranking"]


def test_golden_catches_an_aggregation_change(smollm2_report, golden):
    """The golden test is sensitive: re-aggregating the same raw measurements with MAD constant 1.0
    (instead of 1.4826) must give scores the golden comparison rejects."""
    same = aggregate(raw_roles(smollm2_report), NsdsParams())
    assert not mismatches("score", [layer.score for layer in same], golden["scores"])
    changed = aggregate(raw_roles(smollm2_report), replace(NsdsParams(), mad_constant=1.0))
    assert mismatches("score", [layer.score for layer in changed], golden["scores"]), (
        "scores with mad_constant=1.0 still match the golden file: the golden test cannot see aggregation changes"
    )
