"""benchmarks/gguf_scale.py at a toy width: the default GGUF job on bf16 safetensors checkpoints it writes
itself (converted by llama.cpp's converter, SmolLM2's tokenizer), run twice in fresh processes and caches,
with its figures and the labelled projection printed. About a minute on 2 cores."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from nsds import ggml
from nsds.errors import NsdsError

from needs import missing

pytestmark = pytest.mark.integration
SCRIPT = Path(__file__).parents[2] / "benchmarks" / "gguf_scale.py"


def test_the_scale_benchmark_runs_the_default_gguf_job_at_two_depths(smollm2_gguf, tmp_path):
    try:
        ggml.library()
    except NsdsError as err:
        missing(f"the scale benchmark needs llama.cpp's build: {err}")
    done = subprocess.run([sys.executable, str(SCRIPT), "--shape", "tiny", "--layers", "1", "2", "--tokens", "512",
                           "--dir", str(tmp_path)], capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    for layers in (1, 2):
        line = rf"^{layers} layers \([\d.]+ GB\): \d+ s, peak RSS \d+ MiB \(the nsds process; llama.cpp's tools"
        assert re.search(line, out, re.M), out
    for stage in ("imatrix", "score", "errors", "evaluate nsds", "llama-perplexity Q4_K_M"):
        assert re.search(rf"^  {stage} +[\d.]+ s$", out, re.M), stage
    assert "PROJECTION (computed from the slopes, not measured) for the full 4-layer tiny" in out
    assert list(tmp_path.iterdir()) == []  # checkpoints and caches removed
