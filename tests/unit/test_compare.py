"""`nsds compare` end to end on a tiny real model: outputs, equal budgets, the oracle, resuming, bad input."""

import json
import math
import subprocess
import sys

import pytest
import torch

from nsds import arch
from nsds.compare import compare, write_outputs
from nsds.config import CompareConfig
from nsds.evaluate.loading import load_tokenizer
from nsds.evaluate.perplexity import perplexity
from nsds.evaluate.text import token_windows
from nsds.layerwise import load_model
from nsds.quantize.rtn import rtn
from nsds.results import CompareResult

from tiny_models import save_tiny_tokenizer, tiny_model

TEXT = "The quick brown fox jumps over the lazy dog. A lazy dog sleeps while the quick fox runs. " * 30


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-compare")
    tiny_model("llama", vocab_size=300, num_hidden_layers=8).save_pretrained(folder)
    save_tiny_tokenizer(folder, TEXT)
    text = folder / "text.txt"
    text.write_text(TEXT)
    return folder, text


def config(tiny, out, **kw) -> CompareConfig:
    folder, text = tiny
    base = dict(model=str(folder), budgets=(2.5, 3.0), quantizers=("rtn",), seeds=3, group_size=32,
                text=str(text), tokens=150, window=32, out=out, device="cpu")  # fmt: skip
    return CompareConfig(**(base | kw))


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NSDS_CACHE", str(tmp_path / "cache"))


def test_compare_writes_every_output_at_equal_budgets(tiny, tmp_path, cache):
    out = tmp_path / "out"
    result = compare(config(tiny, out, quantizers=("rtn", "hqq")))
    assert {p.name for p in out.iterdir()} == {"compare.json", "compare.md", "cells.json", "ppl-vs-budget-rtn.png",
        "ppl-vs-budget-hqq.png", "oracle-scatter-rtn.png", "oracle-scatter-hqq.png"}  # fmt: skip
    saved = json.loads((out / "compare.json").read_text())
    assert saved["schema"] == "nsds.compare/1" and saved["counts"]["resumed"] is False
    scorers = ["nsds", "zd", "mse", "ewq", "kurtboost", "lieq", "nsds-nv", "nsds-se", "nsds-mad1", "nsds-product",
               "nsds-collapsed"]  # fmt: skip
    for q in ("rtn", "hqq"):
        data = saved["quantizers"][q]
        assert len(data["oracle"]["ppl"]) == 8 and list(data["scores"]) == scorers
        assert all(-1 <= c["spearman"] <= 1 and -1 <= c["kendall"] <= 1 for c in data["correlations"].values())
    labels = {c["label"] for c in saved["cells"]}
    assert labels == set(scorers) | {
        "error",
        "uniform",
        "llama.cpp",
        "higgs",
        "oracle",
        "random-0",
        "random-1",
        "random-2",
    }
    assert len(saved["cells"]) == 2 * 2 * len(labels)
    ppl_of_plan = {}
    for cell in saved["cells"]:
        assert cell["weight_bits"] <= cell["budget"] + 1e-9 and math.isfinite(cell["ppl"])
        assert ppl_of_plan.setdefault((cell["quantizer"], cell["plan"]), cell["ppl"]) == cell["ppl"]
    random = [r for r in saved["summary"] if r["label"] == "random"]
    assert len(random) == 4 and all(r["n"] == 3 and r["ppl_std"] is not None for r in random)
    for r in random:
        seeds = [c["ppl"] for c in saved["cells"] if c["kind"] == "random" and c["quantizer"] == r["quantizer"]
                 and c["budget"] == r["budget"]]  # fmt: skip
        assert r["ppl"] == pytest.approx(sum(seeds) / 3) and r["ppl_min"] == min(seeds)
    best = result.best_allocators()["rtn"]
    assert set(best) == {2.5, 3.0}
    for budget, labels in best.items():
        rows = result.rows("rtn", budget)
        lowest = min(r.ppl for label, r in rows.items() if label != "oracle")
        assert labels == [label for label, r in rows.items() if label != "oracle" and r.ppl == lowest]
    markdown = (out / "compare.md").read_text()
    assert "| nsds | scorer |" in markdown and "Spearman" in markdown and "ppl-vs-budget-rtn.png" in markdown
    assert CompareResult.load(out / "compare.json").to_dict() == saved  # the typed result round-trips


def test_saved_results_render_the_same_outputs(tiny, tmp_path, cache):
    out = tmp_path / "out"
    compare(config(tiny, out, scorers=("zd",), seeds=0, budgets=(3.0,)))
    first = {p.name: p.read_bytes() for p in out.iterdir() if p.suffix in (".md", ".json")}
    again = tmp_path / "again"
    again.mkdir()
    write_outputs(CompareResult.load(out / "compare.json"), again)
    assert {p.name: p.read_bytes() for p in again.iterdir() if p.suffix in (".md", ".json")} == {
        k: v for k, v in first.items() if k != "cells.json"
    }


def test_oracle_is_the_ppl_with_one_layer_quantized(tiny, tmp_path, cache):
    result = compare(config(tiny, tmp_path / "out", scorers=("zd",), seeds=0, budgets=(3.0,)))
    folder, text = tiny
    tokenizer = load_tokenizer(folder)
    windows, _ = token_windows(tokenizer, text.read_text(), str(text), 32, 150)
    model = load_model(folder, "cpu")
    with torch.no_grad():
        for m in arch.linear_modules(model):
            if m.layer == 5:
                weight = model.get_submodule(m.name).weight
                weight.copy_(rtn(weight, 2, 32))
    assert result.quantizers["rtn"].oracle.ppl[5] == pytest.approx(perplexity(model, windows), rel=1e-6)
    assert result.reference_ppl == pytest.approx(perplexity(load_model(folder, "cpu"), windows), rel=1e-6)


def test_rerun_skips_finished_cells_and_a_changed_setting_starts_afresh(tiny, tmp_path, cache):
    out = tmp_path / "out"
    first = compare(config(tiny, out, scorers=("nsds", "zd")))
    distinct = len({c.plan for c in first.cells})
    assert first.counts.evaluated == 1 + 8 + distinct  # reference + oracle layers + each distinct plan once
    assert first.counts.reused == len(first.cells) - distinct
    again = compare(config(tiny, out, scorers=("nsds", "zd")))
    assert again.counts.evaluated == 0 and again.counts.resumed and again.counts.reused == len(again.cells)
    assert [c.ppl for c in again.cells] == [c.ppl for c in first.cells]
    extended = compare(config(tiny, out, scorers=("nsds", "zd", "ewq")))  # only ewq's new plans are evaluated
    new_plans = {c.plan for c in extended.cells} - {c.plan for c in first.cells}
    assert extended.counts.evaluated == len(new_plans)
    changed = compare(config(tiny, out, scorers=("zd",), tokens=120))
    assert changed.counts.resumed is False and changed.counts.evaluated == 1 + 8 + len({c.plan for c in changed.cells})


def test_an_earlier_compare_json_lends_its_measurements_when_it_is_reproduced(tiny, tmp_path, cache):
    out = tmp_path / "out"
    first = compare(config(tiny, out, scorers=("nsds", "zd")))
    saved = json.loads((out / "compare.json").read_text())
    distinct = {c.plan for c in first.cells}
    (out / "cells.json").unlink()
    lent = compare(config(tiny, out, scorers=("nsds", "zd")))  # only the reference, to check the text is the same
    assert lent.counts.evaluated == 1 and lent.counts.resumed
    assert [c.ppl for c in lent.cells] == [c.ppl for c in first.cells]
    assert lent.quantizers["rtn"] == first.quantizers["rtn"]

    changed = dict(saved, cells=[dict(c, plan="0" * 20) if c["plan"] == first.cells[0].plan else c
                                 for c in saved["cells"]])  # fmt: skip
    (out / "cells.json").unlink()
    (out / "compare.json").write_text(json.dumps(changed))  # as if that plan had not been measured
    assert compare(config(tiny, out, scorers=("nsds", "zd"))).counts.evaluated == 1 + 1

    for tampered in (dict(saved, reference_ppl=saved["reference_ppl"] * 1.01),  # another text, in effect
                     dict(saved, config=dict(saved["config"], group_size=64))):  # fmt: skip
        (out / "cells.json").unlink()
        (out / "compare.json").write_text(json.dumps(tampered))
        fresh = compare(config(tiny, out, scorers=("nsds", "zd")))
        # measured afresh (the oracle alone comes from the nsds cache, whose key is the same)
        assert fresh.counts.resumed is False and fresh.counts.evaluated == 1 + len(distinct)


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "nsds", "compare", *args], capture_output=True, text=True)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--scorers", "nsds,magic"], "unknown scorer 'magic'"),
        (["--budgets", "4.5"], "budget 4.5 bits is outside"),
        (["--quantizer", "gptq"], "unknown quantizer 'gptq'"),
        (["--widths", "2,9", "--quantizer", "hqq"], "does not support width"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(tiny, tmp_path, args, message):
    out = tmp_path / "out"
    result = run_cli(str(tiny[0]), "--out", str(out), *args)
    assert result.returncode == 2 and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not out.exists()
