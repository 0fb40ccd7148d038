"""NSDS on the real decoders (SmolLM2-135M: Llama, GQA 9/3; Gemma-3-270M: head_dim 256 != d/H).

The GGUF source (streamed, dequantized per tensor) must agree with the transformers-loaded model to
1e-6, and the fast path with the full-SVD reference on real layers.
"""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from nsds import arch, reference
from nsds.compute import Compute
from nsds.metrics.spectra import gram_of_columns, readout_complement
from nsds.quantize import make_quantizer
from nsds.scorers.nsds import measure_layer, score
from nsds.weights import GGUFSource, ModuleSource


@pytest.fixture(scope="module")
def smollm2_reports(smollm2_gguf, smollm2_hf):
    return score(GGUFSource(smollm2_gguf)), score(ModuleSource(smollm2_hf))


def test_smollm2_gguf_and_transformers_scores_agree(smollm2_reports):
    from_gguf, from_transformers = smollm2_reports
    assert len(from_gguf.layers) == 30
    assert from_gguf.scores == pytest.approx(from_transformers.scores, abs=1e-6)
    for a, b in zip(from_gguf.layers, from_transformers.layers, strict=True):
        for role in a.roles:
            assert a.roles[role].nv_raw == pytest.approx(b.roles[role].nv_raw, rel=1e-6)
            assert a.roles[role].se_raw == pytest.approx(b.roles[role].se_raw, rel=1e-6)
    assert from_gguf.ranking == from_transformers.ranking


def test_smollm2_streamed_roles_equal_transformers_modules(smollm2_gguf, smollm2_hf):
    source = GGUFSource(smollm2_gguf)
    family, geo = arch.family_of("llama"), arch.geometry(source.config)
    assert (geo.num_heads, geo.num_kv_heads, geo.head_dim, geo.tied_embeddings) == (9, 3, 64, True)
    for i in (0, 13, 29):
        roles = arch.layer_roles(family, geo, lambda rel, i=i: source.tensor(f"model.layers.{i}.{rel}"))
        layer = smollm2_hf.model.layers[i]
        assert torch.equal(roles.q, layer.self_attn.q_proj.weight)  # the rotary permutation is undone
        assert torch.equal(roles.k, layer.self_attn.k_proj.weight)
        assert torch.equal(roles.down, layer.mlp.down_proj.weight)


def test_smollm2_scores_are_per_layer_spread_and_ranked(smollm2_reports):
    report = smollm2_reports[0]
    scores = report.scores
    for layer in report.layers:  # S = geometric Soft-OR of the two aspects: 1 - sqrt((1 - P_NV)(1 - P_SE))
        assert layer.score == pytest.approx(1 - math.sqrt((1 - layer.nv) * (1 - layer.se)), rel=1e-12)
    assert max(scores) - min(scores) > 0.3  # not collapsed to one number (authors' defect 2)
    assert report.ranking == [int(i) for i in np.argsort(-np.array(scores), kind="stable")]
    assert report.parameters["mad_constant"] == 1.4826
    assert report.unembedding_rank is not None and 2 <= report.unembedding_rank <= 576


def test_fast_path_matches_reference_on_real_layers(smollm2_gguf):
    source = GGUFSource(smollm2_gguf)
    family, geo = arch.family_of("llama"), arch.geometry(source.config)
    unembedding = source.tensor("model.embed_tokens.weight")
    complement, k_u = readout_complement(gram_of_columns(unembedding, torch.float64), 0.99)
    basis = reference.readout_basis(unembedding, 0.99)
    assert basis.shape[1] == k_u
    for i in (0, 17):
        roles = arch.layer_roles(family, geo, lambda rel, i=i: source.tensor(f"model.layers.{i}.{rel}"))
        fast = measure_layer(roles, geo, complement, 0.99, Compute())
        for role, (nv, se, kept) in reference.layer_metrics(roles, geo, basis, 0.99).items():
            assert fast[role].nv == pytest.approx(nv, rel=1e-6) and fast[role].se == pytest.approx(se, rel=1e-6)
            assert fast[role].kept == kept


def test_gemma3_head_dim_and_sources_agree(gemma3_gguf, gemma3_hf):
    source = GGUFSource(gemma3_gguf)
    geo = arch.geometry(source.config)
    assert (geo.hidden_size, geo.num_heads, geo.num_kv_heads, geo.head_dim) == (640, 4, 1, 256)
    assert geo.head_dim != geo.hidden_size // geo.num_heads  # authors' defect 3
    from_gguf, from_transformers = score(source), score(ModuleSource(gemma3_hf))
    assert len(from_gguf.layers) == 18
    assert from_gguf.scores == pytest.approx(from_transformers.scores, abs=1e-6)
    assert from_gguf.ranking == from_transformers.ranking
    layer = gemma3_hf.model.layers[5]
    roles = arch.layer_roles(arch.family_of(geo.model_type), geo, lambda rel: source.tensor(f"model.layers.5.{rel}"))
    assert roles.q.shape == (1024, 640) and torch.equal(roles.o, layer.self_attn.o_proj.weight)


def test_cli_scores_smollm2_by_asset_name(smollm2_gguf, tmp_path):
    out = tmp_path / "scores.json"
    result = subprocess.run(
        [sys.executable, "-m", "nsds", "score", "smollm2", "-o", str(out)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    assert data["model"]["files"][0]["name"] == smollm2_gguf.name
    assert len(data["model"]["files"][0]["sha256"]) == 64
    top = data["ranking"][0]
    assert f"   1 {top:>5}" in result.stdout


def test_hqq_and_rtn_on_real_smollm2_modules(smollm2_hf):
    """HQQ runs on the CPU for SmolLM2 (576 inputs; groups of 64) and, being optimised, beats RTN."""
    for name in ("model.layers.3.self_attn.q_proj", "model.layers.3.mlp.down_proj"):
        weight = smollm2_hf.get_submodule(name).weight.detach()
        errors = {}
        for quantizer in ("rtn", "hqq"):
            for bits in (2, 3, 4):
                out = make_quantizer(quantizer, 64).fake_quantize(weight, bits)
                assert out.shape == weight.shape and bool(torch.isfinite(out).all())
                errors[quantizer, bits] = float((out - weight).pow(2).sum() / weight.pow(2).sum())
        for quantizer in ("rtn", "hqq"):
            assert errors[quantizer, 2] > errors[quantizer, 3] > errors[quantizer, 4]
        for bits in (2, 3, 4):
            assert errors["hqq", bits] < errors["rtn", bits], (name, bits, errors)


def test_nsds_run_on_smollm2_offline(smollm2_gguf, tmp_path):
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "nsds", "run", "--budget", "3.5", "--tokens", "1022", "--out", str(out)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    results = json.loads((out / "results.json").read_text())
    reference, nsds, uniform = results["evaluations"]
    assert results["protocol"]["windows"] == 2 and results["protocol"]["bos_prefix"] is False
    assert 25 < reference["ppl"] < 60  # docs/PROTOCOL.md §5: ~39 on Brown with 512-token windows
    assert nsds["ppl"] > reference["ppl"] and uniform["ppl"] > reference["ppl"]
    assert nsds["weight_bits"] <= 3.5 and uniform["weight_bits"] <= 3.5
    assert {"plan.json", "report.md", "scores.png", "ppl.png"} <= {p.name for p in out.iterdir()}
    assert "nsds" in result.stdout and "uniform" in result.stdout


def test_nsds_compare_on_smollm2_offline(smollm2_gguf, tmp_path):
    """The compare command on the real model, cut to one budget, RTN and 2 windows; then resumed."""
    out = tmp_path / "compare"
    scorers = "nsds,zd,ewq,kurtboost,nsds-se"
    args = [sys.executable, "-m", "nsds", "compare", "smollm2", "--budgets", "3.5", "--quantizer", "rtn",
            "--scorers", scorers, "--seeds", "2", "--tokens", "1022", "--out", str(out)]  # fmt: skip
    result = subprocess.run(args, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    results = json.loads((out / "compare.json").read_text())
    oracle = results["quantizers"]["rtn"]["oracle"]["ppl"]
    assert len(oracle) == 30 and 25 < results["reference_ppl"] < 60
    assert min(oracle) > results["reference_ppl"]  # any one layer at 2 bits hurts (docs/PROTOCOL.md §5)
    assert max(oracle) > 1.3 * min(oracle)  # and layers differ: there is a ranking to predict
    assert all(c["weight_bits"] <= 3.5 for c in results["cells"])
    assert "rank correlation" in result.stdout
    again = subprocess.run(args, capture_output=True, text=True)
    assert again.returncode == 0 and "0 evaluations" in again.stdout
