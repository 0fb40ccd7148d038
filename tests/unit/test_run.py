"""`nsds run` end to end on a tiny real model (safetensors folder + tokenizer + a local text file)."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import replace

import pytest
import torch

from nsds.config import RunConfig
from nsds.distortion import ErrorTable
from nsds.pipeline import measures_errors, output_names, run
from nsds.plan import Plan
from nsds.results import RunResult

from tiny_models import save_tiny_tokenizer, tiny_model

TEXT = "The quick brown fox jumps over the lazy dog. A lazy dog sleeps while the quick fox runs. " * 30


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-run")
    model = tiny_model("llama", vocab_size=300)
    model.save_pretrained(folder)
    save_tiny_tokenizer(folder, TEXT)
    text = folder / "text.txt"
    text.write_text(TEXT)
    return folder, text


@pytest.mark.parametrize("quantizer", ["rtn", "hqq"])
def test_run_writes_every_output(tiny_run, tmp_path, quantizer):
    folder, text = tiny_run
    out = tmp_path / "out"
    save = tmp_path / "hqq-model" if quantizer == "hqq" else None
    baselines = ("all",) if quantizer == "rtn" else ("uniform",)
    result = run(RunConfig(model=str(folder), budget=2.5, quantizer=quantizer, group_size=32, text=str(text),
                           tokens=200, window=32, out=out, save=save, device="cpu", baselines=baselines))  # fmt: skip
    files = {p.name for p in out.iterdir()}
    others = {"uniform", "llama.cpp", "higgs", "paper"} if quantizer == "rtn" else {"uniform"}
    assert files == {"plan.json", "scores.json", "errors.json", "results.json", "report.md", "scores.png",
                     "ppl.png"} | {f"plan-{label}.json" for label in others}  # fmt: skip
    saved = json.loads((out / "results.json").read_text())
    assert saved["schema"] == "nsds.results/1" == result.schema
    assert RunResult.load(out / "results.json") == result  # the typed result round-trips
    labels = [e["label"] for e in saved["evaluations"]]
    assert labels == ["reference", "nsds", *(b for b in ("uniform", "llama.cpp", "higgs", "paper") if b in others)]
    plans = {"nsds": Plan.load(out / "plan.json")} | {b: Plan.load(out / f"plan-{b}.json") for b in others}
    for e in saved["evaluations"][1:]:
        plan = plans[e["label"]]
        assert e["weight_bits"] == plan.weight_bits <= 2.5 and e["storage_bits"] == plan.storage_bits
        assert e["allocator"] == plan.allocator == {"nsds": "error", "paper": "topk"}.get(e["label"], e["label"])
    assert saved["protocol"]["windows"] == 200 // 31
    assert saved["config"]["allocator"] == "error" and saved["config"]["group_size"] == 32
    plan = json.loads((out / "plan.json").read_text())
    assert plan["quantizer"] == quantizer and plan["allocator"] == "error"
    errors = ErrorTable.load(out / "errors.json")
    assert errors.quantizer == quantizer and errors.widths == (2, 4) and len(errors.modules) == len(plan["modules"])
    assert (out / "scores.png").read_bytes()[:4] == b"\x89PNG"
    if save is not None:
        from hqq.models.hf.base import AutoHQQHFModel

        reloaded = AutoHQQHFModel.from_quantized(str(save), device="cpu", compute_dtype=torch.float32)
        first = plan["modules"][0]
        layer = reloaded.get_submodule(first["name"])
        assert type(layer).__name__ == "HQQLinear" and layer.meta["nbits"] == first["bits"]


def test_run_measures_errors_only_when_a_plan_reads_them(tiny_run, tmp_path):
    folder, text = tiny_run
    out = tmp_path / "out"
    baselines = ("uniform", "llama.cpp", "paper")
    cfg = RunConfig(model=str(folder), budget=3, widths=(2, 4), allocator="topk", group_size=32, text=str(text),
                    tokens=200, window=32, out=out, device="cpu", baselines=baselines)  # fmt: skip
    assert not measures_errors(cfg) and "errors.json" not in output_names(cfg)
    assert measures_errors(replace(cfg, baselines=("higgs",))) and measures_errors(replace(cfg, allocator="auto"))
    run(cfg)
    assert {p.name for p in out.iterdir()} == set(output_names(cfg)) and not (out / "errors.json").exists()
    assert Plan.load(out / "plan.json").allocator == "topk"


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "nsds", "run", *args], capture_output=True, text=True)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--budget", "4.5"], "outside what widths"),
        (["--no-budget"], "the following arguments are required: --budget"),
        (["--quantizer", "awq"], "unknown quantizer 'awq'"),
        (["--quantizer", "hqq", "--widths", "2,7"], "does not support width(s) [7]"),
        (["--widths", "2,x"], "'x' is neither a number of bits nor a GGUF type nsds plans with"),
        (["--text", "{empty}"], "is empty"),
        (["--text", "{short}"], "fewer than one window"),
        (["--save", "{out}/m"], "--save writes HQQ's format"),
        (["--allocator", "topk", "--widths", "2,3,4"], "exactly two widths"),
        (["--allocator", "greedy"], "unknown allocator 'greedy'; choose from auto, error, topk"),
        (["--baselines", "uniform,gptq"], "unknown baseline 'gptq'; choose from uniform, llama.cpp, higgs, paper"),
        pytest.param(
            ["--tasks", "arc_easy"],
            "need lm-evaluation-harness",
            marks=pytest.mark.skipif(
                importlib.util.find_spec("lm_eval") is not None, reason="lm-eval is installed here"
            ),
        ),
        pytest.param(
            ["--text", "wikitext2"],
            "wikitext2",
            marks=pytest.mark.skipif(
                importlib.util.find_spec("datasets") is not None, reason="datasets is installed (the hub may answer)"
            ),
        ),
    ],
)
def test_run_bad_input_is_one_line_exit_2_and_no_output(tiny_run, tmp_path, extra, message):
    folder, _ = tiny_run
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "short.txt").write_text("The fox.")
    out = tmp_path / "out"
    extra = [a.format(empty=tmp_path / "empty.txt", short=tmp_path / "short.txt", out=tmp_path) for a in extra]
    budget = [] if extra == ["--no-budget"] else ["--budget", "3"]  # a later --budget overrides this one
    extra = [a for a in extra if a != "--no-budget"]
    result = run_cli(str(folder), "--out", str(out), "--tokens", "100", "--window", "64", *budget, *extra)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
    assert not out.exists()


@pytest.mark.parametrize(
    ("stage", "sig", "code", "message"),
    [
        ("score", signal.SIGTERM, 143, "nsds: terminated"),
        ("cached_errors", signal.SIGINT, 130, "nsds: interrupted"),
        ("publish", signal.SIGTERM, 143, "nsds: terminated"),  # every output written, none published yet
        ("publish", signal.SIGINT, 130, "nsds: interrupted"),
    ],
)
def test_an_interrupt_at_any_stage_leaves_nothing_behind(tiny_run, tmp_path, monkeypatch, capsys, stage, sig, code,
                                                         message):  # fmt: skip
    """SIGTERM (what timeout, systemd and CI send) and SIGINT: one line, their own exit codes, no temporary
    folder, no partial or empty --out."""
    import nsds.pipeline as pipeline
    from nsds.cli import main

    folder, text = tiny_run
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temporary))
    original = getattr(pipeline, stage)

    def interrupted(*args, **kwargs):
        os.kill(os.getpid(), sig)  # delivered before the stage starts its work
        return original(*args, **kwargs)

    monkeypatch.setattr(pipeline, stage, interrupted)
    work = tmp_path / "work"
    work.mkdir()
    argv = ["run", str(folder), "--budget", "2.5", "--group-size", "32", "--text", str(text), "--tokens", "200",
            "--window", "32", "--out", str(work / "out"), "--device", "cpu"]  # fmt: skip
    before = signal.getsignal(signal.SIGTERM)  # the default, or one an earlier test's ray.init installed
    assert main(argv) == code
    assert capsys.readouterr().err.strip().splitlines()[-1] == message
    assert list(temporary.iterdir()) == [] and list(work.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) is before  # main() put the handler it found back


def test_a_rerun_removes_the_outputs_of_an_earlier_run_it_does_not_write(tiny_run, tmp_path, capsys):
    folder, text = tiny_run
    out = tmp_path / "out"
    common = dict(model=str(folder), budget=2.5, group_size=32, text=str(text), tokens=200, window=32, out=out,
                  device="cpu")  # fmt: skip
    run(RunConfig(**common, baselines=("uniform", "higgs")))
    (out / "notes.txt").write_text("the user's own file")
    run(RunConfig(**common, baselines=("uniform",)))
    assert not (out / "plan-higgs.json").exists() and (out / "plan-uniform.json").is_file()
    assert (out / "notes.txt").read_text() == "the user's own file"  # only nsds's own outputs are touched
    assert "removed plan-higgs.json from" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging folder left beside it


def test_more_tokens_than_the_text_holds_is_said(tiny_run, tmp_path, capsys):
    folder, text = tiny_run
    result = run(RunConfig(model=str(folder), budget=2.5, group_size=32, text=str(text), tokens=100000, window=32,
                           out=tmp_path / "out", device="cpu"))  # fmt: skip
    windows, scored = result.protocol.windows, result.protocol.scored_tokens
    assert scored < 100000
    assert f"holds {windows} windows of 32 tokens: {scored} scored tokens, not the 100000 asked for" in \
        capsys.readouterr().err  # fmt: skip
