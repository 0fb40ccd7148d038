"""Ray (`--ray`): scores from tasks in a local Ray equal the single-process scores exactly; the default path
never imports Ray; without Ray installed, --ray is a one-line error."""

import subprocess
import sys

import pytest

from nsds import cluster
from nsds.compute import Compute
from nsds.errors import NsdsError
from nsds.scorers.nsds import NsdsParams, score
from nsds.weights import open_source

from tiny_models import tiny_model, write_gguf

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


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
