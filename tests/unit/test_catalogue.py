"""The catalogue of bad inputs and faults, run as a user would: each gets one line on stderr starting with
`nsds: error:`, exit code 2, no traceback, and no output written; most fail before the model is loaded."""

import json
import math
import subprocess
import sys
from dataclasses import replace

import pytest

from nsds.compare import compare
from nsds.config import CompareConfig
from nsds.errors import NsdsError
from nsds.plan import Plan
from nsds.results import CompareResult
from nsds.scores import ScoreReport

from tiny_models import save_tiny_tokenizer, tiny_model

TEXT = "The quick brown fox jumps over the lazy dog. A lazy dog sleeps while the quick fox runs. " * 30


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-catalogue")
    tiny_model("llama", vocab_size=300).save_pretrained(folder)
    save_tiny_tokenizer(folder, TEXT)
    text = folder / "text.txt"
    text.write_text(TEXT)
    return folder, text


def nsds(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nsds", *args], capture_output=True, text=True, timeout=600)


def assert_one_line_error(result: subprocess.CompletedProcess, message: str) -> None:
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("nsds: error: ") and result.stderr.count("\n") == 1, result.stderr
    assert message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


# Every case is (command, extra arguments, expected message); {file}, {dir}, {text} are filled in per test.
SCORE_CASES = [
    (["-o", "{dir}"], "is a folder"),
    (["-o", "{file}/scores.json"], "which is a file"),
    (["--device", "bogus"], "unknown device 'bogus'"),
    (["--device", "mps"], "unknown device 'mps'"),
    (["--temperature", "nan"], "temperature must be a positive finite number"),
    (["--mad-constant", "inf"], "mad constant must be a positive finite number"),
    (["--energy", "nan"], "energy threshold must be in (0, 1]"),
]
RUN_CASES = [
    (["--out", "{file}"], "is a file; give a folder"),
    (["--out", "{file}/out"], "which is a file"),
    (["--device", "bogus"], "unknown device 'bogus'"),
    (["--budget", "nan"], "budget must be a finite number"),
    (["--window", "0"], "--window must be at least 2 tokens"),
    (["--window", "500", "--tokens", "100"], "more than --tokens 100"),
    (["--text", "{binary}"], "NUL"),
    (["--allocator", "topk", "--widths", "2,3,4"], "exactly two widths"),
    (["--budget-counts", "storage", "--budget", "2.1"], "outside what widths [2, 4] can reach"),
    # the exact reach with the group overhead comes from the real shapes, read before the model is loaded
    (["--budget-counts", "storage", "--budget", "5.2", "--group-size", "32"], "([3, 5] bits with group overhead)"),
    (["--quantizer", "hqq", "--group-size", "40"], "must divide every module's weight count"),
    (["--group-size", "0"], "group size must be a positive integer"),
]
COMPARE_CASES = [
    (["--scorers", ""], "give at least one scorer"),
    (["--quantizer", ""], "give at least one quantizer"),
    (["--seeds", "-1"], "--seeds must not be negative"),
    (["--out", "{file}"], "is a file; give a folder"),
    (["--device", "mps"], "unknown device 'mps'"),
    (["--budgets", "2.5,x"], "budget 'x' is not a number of bits; llama.cpp presets as budgets need --quantizer gguf"),
    (["--budgets", "2.5,x", "--quantizer", "gguf"], "unknown llama.cpp preset 'x'; choose from Q2_K"),
]


def fill(args: list[str], tmp_path, tiny) -> list[str]:
    file = tmp_path / "a-file"
    file.write_text("x")
    folder = tmp_path / "a-folder"
    folder.mkdir(exist_ok=True)
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"text\0with\0nul\0bytes " * 50)
    return [a.format(file=file, dir=folder, binary=binary, text=tiny[1]) for a in args]


@pytest.mark.parametrize(("args", "message"), SCORE_CASES)
def test_score(tiny, tmp_path, args, message):
    out = ["-o", str(tmp_path / "scores.json")] if "-o" not in args else []
    assert_one_line_error(nsds("score", str(tiny[0]), *out, *fill(args, tmp_path, tiny)), message)
    assert not (tmp_path / "scores.json").exists()


@pytest.mark.parametrize(("args", "message"), RUN_CASES)
def test_run(tiny, tmp_path, args, message):
    base = ["--budget", "3", "--tokens", "100", "--window", "32", "--text", str(tiny[1])]
    out = [] if "--out" in args else ["--out", str(tmp_path / "out")]
    assert_one_line_error(nsds("run", str(tiny[0]), *base, *out, *fill(args, tmp_path, tiny)), message)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("args", "message"), COMPARE_CASES)
def test_compare(tiny, tmp_path, args, message):
    base = ["--budgets", "3", "--tokens", "100", "--window", "32", "--text", str(tiny[1])]
    out = [] if "--out" in args else ["--out", str(tmp_path / "out")]
    assert_one_line_error(nsds("compare", str(tiny[0]), *base, *out, *fill(args, tmp_path, tiny)), message)
    assert not (tmp_path / "out").exists()


def test_compare_with_undefined_correlations_still_writes_every_output(tmp_path, monkeypatch):
    """A one-layer model has nothing to rank: its rank correlations are undefined (stored as null, shown as
    n/a), and compare.json is still written (the JSON writer refuses NaN)."""
    monkeypatch.setenv("NSDS_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "one-layer"
    tiny_model("llama", vocab_size=300, num_hidden_layers=1).save_pretrained(folder)
    save_tiny_tokenizer(folder, TEXT)
    (folder / "text.txt").write_text(TEXT)
    out = tmp_path / "out"
    text = str(folder / "text.txt")
    config = CompareConfig(model=str(folder), budgets=(3.0,), quantizers=("rtn",), scorers=("zd", "nsds"), seeds=1,
                           group_size=32, text=text, tokens=100, window=32, out=out, device="cpu")  # fmt: skip
    result = compare(config)
    saved = json.loads((out / "compare.json").read_text())
    assert saved["quantizers"]["rtn"]["correlations"]["zd"] == {"spearman": None, "kendall": None}
    assert CompareResult.load(out / "compare.json") == result
    assert "| zd | n/a | n/a |" in (out / "compare.md").read_text()


def plan_data(tmp_path) -> dict:
    from nsds.allocate import Setting, topk
    from nsds.plan import Module
    from nsds.quantize.rtn import RTN

    modules = [Module(f"m{i}", i, "q", 4, 8, f"{i}.q") for i in range(2)]
    return topk(modules, [0.2, 0.9], Setting(3.0, (2, 4), RTN(8), "tiny")).to_dict()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d["modules"][0].update(bits="four"), "Plan.modules[0].bits: expected a finite number, got 'four'"),
        (lambda d: d["modules"][0].update(bits=-3), "bits, group size, features and storage must be positive"),
        (lambda d: d["modules"][0].update(storage=0), "bits, group size, features and storage must be positive"),
        (lambda d: d["modules"][0].pop("format"), "missing field(s) ['format']"),
        (lambda d: d.update(modules=[]), "at least one module"),
        (lambda d: d.update(widths="2,4"), "Plan.widths: expected a list"),
        (lambda d: d.update(budget=math.inf), "expected a finite number"),
        (lambda d: d.pop("quantizer"), "missing field(s) ['quantizer']"),
        (lambda d: d.update(grouping="row"), "unexpected field(s) ['grouping']"),
        (lambda d: d.update(schema="nsds.plan/1"), "schema 'nsds.plan/1', expected 'nsds.plan/2'"),
    ],
)
def test_plan_load_refuses_wrong_types_and_values(tmp_path, change, message):
    data = plan_data(tmp_path)
    assert Plan.from_dict(data).to_dict() == data  # the untouched plan loads back as it was
    change(data)
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(data))  # json.dumps writes inf as Infinity, as a hand edit might
    with pytest.raises(NsdsError, match="cannot read plan file") as caught:
        Plan.load(path)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_score_report_load_refuses_wrong_types(tiny_llama_folder, tmp_path):
    from nsds.compute import Compute
    from nsds.scorers.nsds import score
    from nsds.weights import open_source

    with open_source(str(tiny_llama_folder)) as source:
        report = score(source, compute=Compute())
    path = tmp_path / "scores.json"
    report.save(path)
    assert ScoreReport.load(path) == report
    for change, message in [
        (lambda d: d["layers"][1]["roles"]["qk"].update(nv_raw="high"), "nv_raw: expected a finite number"),
        (lambda d: d.update(ranking=[0, 0, 1, 2]), "ranking must list every layer once"),
        (lambda d: d["geometry"].pop("num_heads"), "missing field(s) ['num_heads']"),
    ]:
        data = report.to_dict()
        change(data)
        path.write_text(json.dumps(data))
        with pytest.raises(NsdsError, match="cannot read score file") as caught:
            ScoreReport.load(path)
        assert message in str(caught.value), caught.value


def test_damaged_cells_store_starts_afresh(tiny, tmp_path, monkeypatch, capsys):
    """A hand-edited cells.json with the right fingerprint but wrong types is lost work, not a crash, and said;
    so is a damaged compare.json."""
    monkeypatch.setenv("NSDS_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    config = CompareConfig(model=str(tiny[0]), budgets=(3.0,), quantizers=("rtn",), scorers=("zd",), seeds=0,
                           group_size=32, text=str(tiny[1]), tokens=100, window=32, out=out, device="cpu")  # fmt: skip
    first = compare(config)
    cells = json.loads((out / "cells.json").read_text())
    next(iter(cells["cells"].values()))["ppl"] = "low"
    (out / "cells.json").write_text(json.dumps(cells))
    (out / "compare.json").unlink()  # else it would lend its measurements (test_compare.py)
    capsys.readouterr()
    again = compare(replace(config))
    assert again.counts.resumed is False and [c.ppl for c in again.cells] == [c.ppl for c in first.cells]
    assert "cannot read compare cells file" in capsys.readouterr().err
    (out / "cells.json").unlink()
    (out / "compare.json").write_text("{ damaged")
    compare(replace(config))
    assert "cannot read compare results file" in capsys.readouterr().err


@pytest.mark.parametrize("memo", ["[1, 2]", '{"KEY": 42}', '{"KEY": "not-a-digest"}', "{broken"])
def test_damaged_digest_memo_is_recomputed(tmp_path, monkeypatch, memo):
    import hashlib

    from nsds.files import sha256_file

    monkeypatch.setenv("NSDS_CACHE", str(tmp_path / "cache"))
    target = tmp_path / "weights.bin"
    target.write_bytes(b"weights")
    stat = target.resolve().stat()
    key = f"{target.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "sha256.json").write_text(memo.replace("KEY", key))
    assert sha256_file(target) == hashlib.sha256(b"weights").hexdigest()
