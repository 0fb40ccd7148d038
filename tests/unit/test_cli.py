"""The `nsds` command: a real run on a tiny model, its JSON, and one-line errors with exit code 2."""

import json
import subprocess
import sys

import pytest
import torch

from nsds.cli import main
from nsds.scores import SCHEMA, ScoreReport


def run_cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nsds", *args], capture_output=True, text=True, cwd=cwd)


def test_score_writes_versioned_json_with_every_intermediate(tiny_llama_folder, tmp_path, capsys):
    out = tmp_path / "scores.json"
    assert main(["score", str(tiny_llama_folder), "-o", str(out), "--top", "0"]) == 0
    printed = capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["schema"] == SCHEMA == "nsds.scores/1"
    assert data["parameters"] == {"mad_constant": 1.4826, "temperature": 1.0, "energy": 0.99,
                                  "soft_or": "geometric", "eps": 1e-12}  # fmt: skip
    assert data["geometry"]["num_layers"] == len(data["layers"]) == 4
    assert data["model"]["source"] == "safetensors" and len(data["model"]["files"][0]["sha256"]) == 64
    assert data["roles"] == ["qk", "ov", "up", "gate", "down"]
    for layer in data["layers"]:
        assert set(layer) == {"index", "roles", "nv", "se", "score"}
        for role in layer["roles"].values():
            assert set(role) == {"nv_raw", "se_raw", "nv_p", "se_p", "kept"}
    scores = [layer["score"] for layer in data["layers"]]
    assert data["ranking"] == sorted(range(4), key=lambda i: -scores[i])
    report = ScoreReport.load(out)
    assert (
        report.ranking == data["ranking"]
        and report.layers[0].roles["qk"].nv_raw == data["layers"][0]["roles"]["qk"]["nv_raw"]
    )
    assert f"{data['ranking'][0]:>5}" in printed.splitlines()[2]


def test_options_reach_the_scorer(tiny_llama_folder, tmp_path):
    out = tmp_path / "s.json"
    args = ["score", str(tiny_llama_folder), "-o", str(out), "--mad-constant", "1.0", "--soft-or", "product"]
    assert main([*args, "--energy", "0.9", "--temperature", "2"]) == 0
    params = json.loads(out.read_text())["parameters"]
    assert params["mad_constant"] == 1.0 and params["soft_or"] == "product" and params["energy"] == 0.9


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["score", "/no/such/model"], "does not exist"),
        (["score", "{folder}", "--energy", "1.5"], "energy threshold must be in (0, 1]"),
        pytest.param(
            ["score", "{folder}", "--device", "cuda"],
            "no CUDA GPU",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU"),
        ),
        (["score", "{folder}", "--precision", "float16"], "invalid choice"),
        (["score", "{bert}"], "unsupported architecture 'bert'"),
        (["score", "{folder}", "--gguf-file", "x.gguf"], "no GGUF file 'x.gguf'"),
        (["score", "{notmodel}"], "not a .gguf file or a model folder"),
        (["assets", "fetch", "nonsense"], "unknown asset(s) nonsense"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_no_output(args, message, tiny_llama_folder, tmp_path):
    import transformers as tf

    bert = tmp_path / "bert"
    tf.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2).save_pretrained(bert)
    notmodel = tmp_path / "weights.bin"
    notmodel.write_bytes(b"\0" * 16)
    formatted = [a.format(folder=tiny_llama_folder, bert=bert, notmodel=notmodel) for a in args]
    result = run_cli(*formatted, "-o", str(tmp_path / "out.json")) if args[0] == "score" else run_cli(*formatted)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out.json").exists()


def test_failed_run_leaves_existing_output_untouched(tiny_llama, tmp_path):
    from tiny_models import write_gguf

    bad = tmp_path / "nan.gguf"
    write_gguf(tiny_llama, bad, "llama", nan_in="model.layers.0.self_attn.k_proj.weight")
    out = tmp_path / "scores.json"
    out.write_text("previous")
    result = run_cli("score", str(bad), "-o", str(out))
    assert result.returncode == 2 and "NaN or Inf" in result.stderr
    assert out.read_text() == "previous"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".scores")] == []


def test_the_option_names_are_the_registries_names():
    """config's Literal types, which results documents are checked against, name what the CLI dispatches to."""
    from typing import get_args

    from nsds.allocate import ALLOCATORS
    from nsds.config import AllocatorName, QuantizerName
    from nsds.quantize import QUANTIZERS

    assert get_args(QuantizerName) == tuple(QUANTIZERS)
    assert get_args(AllocatorName) == ("auto", *ALLOCATORS)
