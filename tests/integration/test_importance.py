"""The importance matrix of the model's own text, on the real SmolLM2 GGUF, with llama.cpp's own tools
(docs/GGUF.md §5): llama-completion writes the text, llama-imatrix makes the matrix (so it is llama-imatrix's
by construction: the test checks nsds reads what it wrote, in both its formats), and ggml's quantizers
rounding by it in process write exactly the bytes llama-quantize --imatrix writes, for every type.
About a minute on 2 cores."""

import gguf
import numpy as np
import pytest
import torch

from nsds import ggml, gguf_tools, importance, llamacpp, programs
from nsds.errors import NsdsError
from nsds.gguf_header import GGUFHeader

from needs import missing

pytestmark = pytest.mark.integration
TOKENS = 1024  # two chunks: the least llama-imatrix takes


@pytest.fixture(scope="module")
def own(smollm2_gguf) -> importance.ImportanceMatrix:
    try:
        ggml.library()
    except NsdsError as err:
        missing(f"importance test needs llama.cpp's build: {err}")
    return importance.self_made(smollm2_gguf, TOKENS)


def test_the_own_text_matrix_covers_every_planned_tensor(own, smollm2_gguf, monkeypatch):
    header = GGUFHeader(smollm2_gguf)
    planned = [n for n, t in header.tensors.items() if n.startswith("blk.") and n.endswith(".weight")
               and len(t.shape) == 2]  # fmt: skip
    assert len(planned) == 210 and set(planned) <= set(own.sums)
    for name in planned:
        assert own.sums[name].shape == (1, header.tensors[name].shape[-1])
        assert own.counts[name].tolist() == [own.counts[planned[0]][0]]  # every matrix saw the same tokens
    assert TOKENS // 2 < own.counts[planned[0]][0] <= TOKENS  # two chunks of up to 512 tokens
    assert np.all(own.weights(planned[0]) > 0)
    text = own.path.with_suffix("").with_suffix(".txt")
    assert len(text.read_text(encoding="utf-8")) > 1000  # what the model wrote is kept beside it

    def no_tools(*args, **kwargs):
        raise AssertionError("a cached matrix must not run llama.cpp again")

    monkeypatch.setattr(gguf_tools, "generate", no_tools)
    monkeypatch.setattr(gguf_tools, "make_imatrix", no_tools)
    assert importance.self_made(smollm2_gguf, TOKENS).path == own.path


def test_both_formats_of_llama_imatrix_read_the_same(own, smollm2_gguf, tmp_path):
    """llama-imatrix's legacy .dat of the same text: the same weights (it stores mean x 1 call)."""
    text = own.path.with_suffix("").with_suffix(".txt")
    legacy = tmp_path / "own.dat"
    result = programs.run_streams(llamacpp.tools().imatrix, ["-m", smollm2_gguf, "-f", text, "-o", legacy, "-c",
                                   "512", "--chunks", "2", "--no-ppl", "--output-format", "dat"], "llama-imatrix",
                                   None)  # fmt: skip
    assert result.returncode == 0
    old = importance.read(legacy)
    assert old.legacy and set(old.sums) == set(own.sums)
    for name in own.sums:
        np.testing.assert_allclose(old.weights(name), own.weights(name), rtol=1e-6)


def test_quantizing_with_it_is_bit_identical_to_llama_quantize(own, smollm2_gguf, tmp_path):
    """Every type nsds plans with, on tensors of every shape: llama-quantize --imatrix's bytes, and other bytes
    than without the matrix (for the types that read it)."""
    lib = ggml.library()
    header = GGUFHeader(smollm2_gguf)
    kinds = list(ggml.QUANTIZED)
    planned = [n for n, t in header.tensors.items() if n.startswith("blk.") and n.endswith(".weight")
               and len(t.shape) == 2]  # fmt: skip
    overrides = {name: kinds[i % len(kinds)] for i, name in enumerate(planned)}  # each type on ffn_down too
    target = tmp_path / "mixed.gguf"
    gguf_tools.quantize_gguf(smollm2_gguf, target, "Q8_0", overrides, imatrix=own.path)
    written = GGUFHeader(target)
    kinds_written, changed = set(), set()
    for name in overrides:
        source = header.tensors[name]
        weights = gguf.quants.dequantize(header.array(source), source.qtype).astype(np.float32)
        kind = written.tensors[name].qtype.name
        kinds_written.add(kind)
        theirs = np.asarray(written.array(written.tensors[name])).view(np.uint8).reshape(weights.shape[0], -1)
        assert np.array_equal(lib.quantize(weights, kind, own.weights(name)[0]), theirs), (name, kind)
        if kind in ggml.NEEDS_IMPORTANCE:  # written only with a matrix: without one, a one-line error
            with pytest.raises(NsdsError, match=f"{kind} is written only with an importance matrix"):
                lib.quantize(weights, kind)
            changed.add(kind)
        elif not np.array_equal(lib.quantize(weights, kind), theirs):
            changed.add(kind)
    assert kinds_written == set(ggml.QUANTIZED)  # the i-quants on ffn_down's rows of 1536
    # the importance changes the rounding of every type that reads it (Q8_0 does not; the source is Q4_1 already)
    assert changed == kinds_written - {"Q8_0", "Q4_1"}


def test_a_flat_matrix_sizes_a_preset_as_the_real_one_does(own, smollm2_gguf, tmp_path):
    """llama.cpp's rules give IQ3_XXS's tensors other types with a matrix than without; which types depends
    only on whether there is one, so a flat matrix, made before the real one, sizes the preset exactly."""
    flat = importance.flat(smollm2_gguf, tmp_path / f"flat{importance.SUFFIX}")
    read = importance.read(flat)
    assert all(np.array_equal(read.weights(n), np.ones_like(read.weights(n))) for n in read.sums)
    types = {}
    for label, matrix in (("none", None), ("flat", flat), ("own", own.path)):
        gguf_tools.quantize_gguf(smollm2_gguf, tmp_path / f"{label}.gguf", "IQ3_XXS", imatrix=matrix)
        types[label] = {n: (t.qtype, t.nbytes) for n, t in GGUFHeader(tmp_path / f"{label}.gguf").tensors.items()}
    assert types["flat"] == types["own"] != types["none"]


def test_a_matrix_made_for_another_model_is_refused_before_any_work(own, tmp_path, capsys):
    """Gemma-3's tensor names are SmolLM2's, its rows are not: a one-line error, exit 2, nothing written."""
    from nsds.cli import main

    other = tmp_path / "other.imatrix.gguf"
    writer = gguf.GGUFWriter(str(other), arch="imatrix")
    writer.add_array("imatrix.datasets", ["other.txt"])
    writer.add_uint32("imatrix.chunk_count", 1)
    writer.add_uint32("imatrix.chunk_size", 512)
    for name in own.sums:
        writer.add_tensor(f"{name}.in_sum2", np.ones((1, 640), dtype=np.float32))
        writer.add_tensor(f"{name}.counts", np.ones((1, 1), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    out = tmp_path / "out"
    argv = ["run", "smollm2", "--quantizer", "gguf", "--budget", "6", "--widths", "4,6", "--imatrix", str(other),
            "--out", str(out)]  # fmt: skip
    assert main(argv) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "holds 640 values for blk.0." in error and "made for another model" in error
    assert not out.exists()


def test_the_error_table_weighs_each_module_by_its_importance(own, smollm2_gguf, smollm2_hf):
    """The importance-weighted error of a module rounded by the matrix: ||(W - Q) diag(sqrt I)||^2 / ||W
    diag(sqrt I)||^2, Q being the weights llama-quantize --imatrix writes."""
    from nsds import arch, runtime
    from nsds.distortion import ErrorTable, measure_errors, output_error
    from nsds.quantize import WeightBank, make_quantizer

    modules = arch.linear_modules(smollm2_hf, fuse=True)[:7]  # the first layer
    names = runtime.tensor_names(smollm2_gguf, [m.name for m in modules])
    weights = own.for_modules(names, {m.name: m.in_features for m in modules})
    quantizer = make_quantizer("gguf")
    bank = WeightBank(smollm2_hf, [m.name for m in modules], quantizer, keep=False, importance=weights)
    fisher = {m.name: torch.ones(m.out_features, m.in_features) for m in modules}
    table = ErrorTable("gguf", (2, 4), measure_errors(bank, modules, (2, 4), {}, fisher))
    for m in modules:
        w = smollm2_hf.get_submodule(m.name).weight.detach()
        for bits in (2, 4):
            q = quantizer.fake_quantize_as(w, quantizer.written_type(m.in_features, bits), weights[m.name])
            expected = output_error(w, q, weights[m.name].sqrt())
            assert table.of(m.name, bits, "importance") == pytest.approx(expected, rel=1e-9), m.name
            assert table.of(m.name, bits, "relative") == pytest.approx(output_error(w, q), rel=1e-9), m.name
        assert table.of(m.name, 2, "importance") > table.of(m.name, 4, "importance") > 0
