"""nsds.gguf_convert.convert_hf_to_gguf: llama.cpp's own converter on a tiny random Llama, read back by nsds.

Skipped, with the reason, when llama.cpp's tools (and the converter beside them) are not built. The pinned
converter imports `sentencepiece` for every Llama folder, so the round trip is skipped without it (and the
one-line install hint is checked instead). About 15 s: each converter run starts torch (3-6 s).

The tiny model gets a Llama-2 style tokenizer.json (BPE with byte fallback, "▁" for spaces): the converter
reads that through gguf-py's LlamaHfVocab without a check. tests/tiny_models.save_tiny_tokenizer's byte-level
BPE would be refused, since the converter identifies byte-level pre-tokenizers by a hash of how they tokenize
a fixed text, and a freshly trained tokenizer has no known hash (that refusal is tested too).
"""

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nsds import gguf_convert, gguf_tools, llamacpp
from nsds.cli import main
from nsds.errors import NsdsError
from nsds.files import cache_dir
from nsds.plan import Plan
from nsds.results import RunResult
from nsds.weights import GGUFSource, SafetensorsSource

from needs import missing
from tiny_models import save_tiny_tokenizer, tiny_model

pytestmark = pytest.mark.integration

TEXT = "The quick brown fox jumps over the lazy dog. A lazy dog sleeps while the quick fox runs. "
HAS_SENTENCEPIECE = importlib.util.find_spec("sentencepiece") is not None
NEEDS_SENTENCEPIECE = pytest.mark.skipif(
    not HAS_SENTENCEPIECE,
    reason="llama.cpp's converter imports sentencepiece for every Llama model: `pip install sentencepiece`",
)


@pytest.fixture(scope="module")
def script() -> Path:
    try:
        found = llamacpp.tools()
    except NsdsError as err:
        missing(f"GGUF conversion test needs llama.cpp's tools: {err}")
    if found.convert_script is None:
        missing(f"GGUF conversion test needs {llamacpp.CONVERT_SCRIPT} beside llama.cpp's tools ({found.source})")
    return found.convert_script


def save_llama_tokenizer(folder: Path, text: str, vocab_size: int = 300) -> int:
    """A Llama-2 style tokenizer.json (BPE, byte fallback, Metaspace-like normalizer); its vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    specials = ["<unk>", "<s>", "</s>", *(f"<0x{byte:02X}>" for byte in range(256))]
    tokenizer.train_from_iterator([text * 20], trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials))
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(folder)
    return tokenizer.get_vocab_size()


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-llama")
    vocab = save_llama_tokenizer(folder, TEXT)
    tiny_model("llama", vocab_size=vocab).save_pretrained(folder)
    return folder


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message, message
    return message


def test_converter_imports_its_own_gguf_py(script, monkeypatch):
    monkeypatch.setenv("NO_LOCAL_GGUF", "1")  # would make the converter fall back to the venv's gguf
    env = gguf_convert.converter_env(script)
    assert "NO_LOCAL_GGUF" not in env
    found = subprocess.run(
        [sys.executable, "-c", "import gguf; print(gguf.__file__)"], env=env, capture_output=True, text=True,
        check=True, timeout=60,
    ).stdout.strip()  # fmt: skip
    assert Path(found).resolve().is_relative_to((script.parent / "gguf-py").resolve()), found


@NEEDS_SENTENCEPIECE
def test_f32_conversion_streams_the_safetensors_tensors_exactly(script, tiny_llama, tmp_path):
    target = tmp_path / "out" / "tiny-f32.gguf"
    gguf_convert.convert_hf_to_gguf(tiny_llama, target, "F32", timeout=300)
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]  # no temporary left
    original = SafetensorsSource(tiny_llama)
    with GGUFSource(target) as converted:
        assert converted.arch == "llama"
        names = converted.names()
        assert len(names) >= 2 + 4 * 7  # embedding, lm_head, and q/k/v/o/gate/up/down of each of 4 layers
        assert names <= original.names()
        for name in sorted(names):
            got, want = converted.tensor(name), original.tensor(name)
            assert got.dtype == want.dtype == torch.float32, name
            assert torch.equal(got, want), name  # f32: exact, q/k un-permuted by nsds
    types = gguf_tools.tensor_types_of(target)
    matrices = [name for name, shape, _ in gguf_tools.gguf_tensor_infos(target) if len(shape) == 2]
    assert len(matrices) >= 2 + 4 * 7
    assert {types[name] for name in matrices} == {"F32"}


@NEEDS_SENTENCEPIECE
def test_unknown_byte_level_pre_tokenizer_is_one_line(script, tmp_path):
    folder = tmp_path / "byte-level"
    tiny_model("llama", vocab_size=300).save_pretrained(folder)
    save_tiny_tokenizer(folder, TEXT)
    target = tmp_path / "out" / "tiny.gguf"
    with pytest.raises(NsdsError) as err:
        gguf_convert.convert_hf_to_gguf(folder, target, timeout=300)
    assert "pre-tokenizer was not recognized" in one_line(err) and "chkhsh" in one_line(err)
    assert list(target.parent.iterdir()) == []


def test_unsupported_architecture_is_one_line_and_leaves_no_target(script, tmp_path):
    folder = tmp_path / "not-a-model"
    folder.mkdir()
    (folder / "config.json").write_text('{"architectures": ["NoSuchModelForCausalLM"]}')
    target = tmp_path / "out" / "x.gguf"
    with pytest.raises(NsdsError) as err:
        gguf_convert.convert_hf_to_gguf(folder, target, timeout=300)
    assert "NoSuchModelForCausalLM is not supported" in one_line(err)
    assert list(target.parent.iterdir()) == []


def test_folder_without_config_fails_before_running(script, tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    target = tmp_path / "x.gguf"
    with pytest.raises(NsdsError, match=r"no config\.json") as err:
        gguf_convert.convert_hf_to_gguf(tmp_path, target)
    one_line(err)
    assert not target.exists()


@pytest.mark.parametrize("outtype", ["q4_k_m", "auto", "tq1_0"])
def test_unknown_outtype_is_refused_up_front(outtype, tmp_path):
    with pytest.raises(NsdsError, match="valid types are f32, f16, bf16, q8_0"):
        gguf_convert.convert_hf_to_gguf(tmp_path, tmp_path / "x.gguf", outtype)


@NEEDS_SENTENCEPIECE
def test_run_gguf_on_a_model_folder_converts_it_once_and_measures_every_plan(script, tiny_llama, tmp_path):
    """A Hugging Face folder through the whole GGUF path: converted by llama.cpp (bf16/f32 as its weights are),
    planned, every plan written as a GGUF, measured by llama-perplexity; the export holds the plan's types."""
    text = tmp_path / "text.txt"
    text.write_text(TEXT * 40)
    out = tmp_path / "out"
    argv = ["run", str(tiny_llama), "--quantizer", "gguf", "--budget", "6", "--widths", "4,8", "--text", str(text),
            "--tokens", "256", "--window", "64", "--export", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    result = RunResult.load(out / "results.json")
    assert [e.label for e in result.evaluations] == ["reference", "nsds", "uniform"]
    assert all(e.runtime is not None and e.runtime.chunks == 4 for e in result.evaluations)
    assert result.evaluation("reference").runtime.file.endswith("-f32.gguf")  # the converted base, in the cache
    plan = Plan.load(out / "plan.json")
    written = gguf_tools.tensor_types_of(out / "model.gguf")
    with GGUFSource(out / "model.gguf") as exported:
        names = {m.name: exported.gguf_name(f"{m.name}.weight") for m in plan.modules}
    assert {m.name: written[names[m.name]] for m in plan.modules} == plan.formats()
    assert plan.storage_bits <= 6.0 and {m.format for m in plan.modules} <= {"Q5_0", "Q8_0"}  # 64 columns: fallback
    converted = sorted((cache_dir() / "gguf").glob("*.gguf"))
    assert main([*argv[:-1], str(tmp_path / "again")]) == 0  # the second run reuses the converted base
    assert sorted((cache_dir() / "gguf").glob("*.gguf")) == converted


@NEEDS_SENTENCEPIECE
def test_the_converted_base_is_keyed_by_every_file_the_converter_reads(script, tiny_llama, tmp_path):
    """The same weights with another tokenizer are another GGUF: the cache key covers the tokenizer too."""
    from nsds import runtime

    other = tmp_path / "other-tokenizer"
    shutil.copytree(tiny_llama, other)
    config = json.loads((other / "tokenizer_config.json").read_text())
    (other / "tokenizer_config.json").write_text(json.dumps(config | {"model_max_length": 123}))
    with SafetensorsSource(tiny_llama) as first, SafetensorsSource(other) as second:
        assert runtime.base_gguf(first) != runtime.base_gguf(second)


@NEEDS_SENTENCEPIECE
def test_run_gguf_on_a_folder_llama_cpp_cannot_convert_is_one_line(script, tmp_path, capsys):
    folder = tmp_path / "byte-level"
    tiny_model("llama", vocab_size=300).save_pretrained(folder)
    save_tiny_tokenizer(folder, TEXT)
    out = tmp_path / "out"
    capsys.readouterr()  # transformers' own progress lines from saving the model
    assert main(["run", str(folder), "--quantizer", "gguf", "--budget", "6", "--widths", "4,8", "--out", str(out)]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and "pre-tokenizer was not recognized" in lines[0]
    assert not out.exists()
