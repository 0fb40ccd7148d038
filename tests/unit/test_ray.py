"""Ray (`--ray`): scores from tasks in a local Ray equal the single-process scores exactly; the default path
never imports Ray; without Ray installed, --ray is a one-line error."""

import subprocess
import sys

import pytest

from nsds import cluster
from nsds.compare import compare
from nsds.compute import Compute
from nsds.config import CompareConfig
from nsds.errors import NsdsError
from nsds.scorers.nsds import NsdsParams, score
from nsds.weights import open_source

import needs
from tiny_models import save_tiny_tokenizer, tiny_model, write_gguf

needs.module("ray")


def same_report(got, expected) -> None:
    """Every measured and derived number equal, not approximately."""
    assert got.layers == expected.layers and got.ranking == expected.ranking
    assert got.unembedding_rank == expected.unembedding_rank and got.model == expected.model


@pytest.mark.parametrize("workers", [1, 2])
def test_ray_scores_equal_single_process_scores(local_ray, tiny_llama_folder, workers):
    expected = score(open_source(str(tiny_llama_folder)))
    got = cluster.score(str(tiny_llama_folder), None, NsdsParams(), Compute(), workers)
    same_report(got, expected)
    assert got.timing["read_s"] > 0


def test_ray_scores_equal_for_gguf_and_other_params(local_ray, tmp_path):
    path = tmp_path / "tiny.gguf"
    write_gguf(tiny_model("qwen3"), path, "qwen3")
    params = NsdsParams(energy=0.9, soft_or="product")
    same_report(cluster.score(str(path), None, params, Compute(), 2), score(open_source(str(path)), params))


def test_error_in_a_task_is_the_same_one_line_error(local_ray, tiny_llama, tmp_path):
    path = tmp_path / "nan.gguf"
    write_gguf(tiny_llama, path, "llama", nan_in="model.layers.1.mlp.down_proj.weight")
    with pytest.raises(NsdsError, match=r"'model\.layers\.1\.mlp\.down_proj\.weight' holds NaN or Inf"):
        cluster.score(str(path), None, NsdsParams(), Compute(), 2)


def test_cli_scores_on_local_ray(local_ray, tiny_llama_folder, tmp_path, capsys):
    from nsds.cli import main
    from nsds.scores import ScoreReport

    out = tmp_path / "scores.json"
    assert main(["score", str(tiny_llama_folder), "-o", str(out), "--ray", "--ray-workers", "2"]) == 0
    same_report(ScoreReport.load(out), score(open_source(str(tiny_llama_folder))))
    assert main(["score", str(tiny_llama_folder), "-o", str(out), "--ray", "--ray-workers", "0"]) == 2
    assert "--ray-workers must be at least 1" in capsys.readouterr().err


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_default_path_never_imports_ray(tiny_llama_folder, tmp_path):
    code = (
        "import sys\n"
        "from nsds.cli import main\n"
        "import nsds.compare\n"
        f"assert main(['score', {str(tiny_llama_folder)!r}, '-o', {str(tmp_path / 's.json')!r}]) == 0\n"
        "assert 'ray' not in sys.modules, 'the default path imported ray'\n"
    )
    done = run_python(code)
    assert done.returncode == 0, done.stderr[-2000:]


def test_ray_option_without_ray_is_a_one_line_error(tiny_llama_folder, tmp_path):
    code = (
        "import sys\n"
        "sys.modules['ray'] = None  # what an environment without Ray gives: import ray fails\n"
        "from nsds.cli import main\n"
        f"sys.exit(main(['score', {str(tiny_llama_folder)!r}, '-o', {str(tmp_path / 's.json')!r}, '--ray']))\n"
    )
    done = run_python(code)
    assert done.returncode == 2
    assert done.stderr.strip() == "nsds: error: --ray needs Ray: pip install 'nsds[ray]'"


TEXT = "The quick brown fox jumps over the lazy dog. A lazy dog sleeps while the quick fox runs. " * 30


@pytest.fixture(scope="module")
def tiny_compare(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-compare")
    tiny_model("llama", vocab_size=300, num_hidden_layers=6).save_pretrained(folder)
    save_tiny_tokenizer(folder, TEXT)
    (folder / "text.txt").write_text(TEXT)
    return folder


def compare_config(folder, out) -> CompareConfig:
    return CompareConfig(model=str(folder), budgets=(2.5, 3.0), quantizers=("rtn", "hqq"), scorers=("nsds", "zd"),
                         seeds=2, group_size=32, text=str(folder / "text.txt"), tokens=150, window=32, out=out,
                         device="cpu")  # fmt: skip


def test_ray_compare_equals_single_process_compare(local_ray, tiny_compare, tmp_path, monkeypatch):
    """Every perplexity (reference, oracle layers, plans) from the Ray model copies equals the one measured
    here, exactly; each run starts with an empty oracle cache."""
    monkeypatch.setenv("NSDS_CACHE", str(tmp_path / "cache-here"))
    here = compare(compare_config(tiny_compare, tmp_path / "here"))
    monkeypatch.setenv("NSDS_CACHE", str(tmp_path / "cache-ray"))
    on_ray = compare(compare_config(tiny_compare, tmp_path / "ray"), ray="", workers=2)
    assert on_ray.reference_ppl == here.reference_ppl
    for q in ("rtn", "hqq"):
        assert on_ray.quantizers[q].oracle == here.quantizers[q].oracle
        assert on_ray.quantizers[q].scores == here.quantizers[q].scores
    assert [(c.label, c.budget, c.plan, c.ppl) for c in on_ray.cells] == [
        (c.label, c.budget, c.plan, c.ppl) for c in here.cells
    ]
    assert (on_ray.counts.evaluated, on_ray.counts.reused) == (here.counts.evaluated, here.counts.reused)
