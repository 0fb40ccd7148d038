"""The GGUF quantizer and llama.cpp as the runtime, on the real SmolLM2 GGUF and Brown (docs/GGUF.md).

What nsds measures must be what llama.cpp runs: ggml's numerics through ctypes agree with gguf-py's
dequantizer byte for byte; the types nsds predicts are the ones llama-quantize writes, fallbacks included;
an exported plan holds exactly the fake-quantized weights nsds evaluated, in a file of the predicted size,
no larger than the preset it was matched to; and llama-perplexity agrees with nsds's own perplexity on
how much each plan costs. About 2.5 minutes on 2 cores (one `nsds run`, llama-perplexity on four files).
"""

import json
import math

import gguf
import numpy as np
import pytest
import torch

from nsds import ggml, gguf_tools, importance, runtime
from nsds.cli import main
from nsds.config import RunConfig
from nsds.errors import NsdsError
from nsds.gguf_header import GGUFHeader
from nsds.pipeline import prepare
from nsds.plan import Plan
from nsds.quantize import make_quantizer
from nsds.quantize.gguf import TYPES
from nsds.results import RunResult
from nsds.weights import GGUFSource

from needs import missing

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def lib() -> ggml.Ggml:
    try:
        return ggml.library()
    except NsdsError as err:
        missing(f"GGUF backend test needs llama.cpp's build: {err}")


@pytest.mark.parametrize("kind", [*ggml.QUANTIZED, "F16"])
def test_ggml_numerics_match_gguf_py_byte_for_byte(lib, kind):
    rng = np.random.default_rng(0)
    weights = rng.standard_normal((48, 512)).astype(np.float32)
    weighting = rng.uniform(0.5, 2, 512).astype(np.float32) if kind in ggml.NEEDS_IMPORTANCE else None
    data = lib.quantize(weights, kind, weighting)
    assert data.shape == (48, ggml.tensor_bytes(kind, 1, 512))
    restored = lib.dequantize(data, kind, 512)
    assert np.array_equal(restored, gguf.quants.dequantize(data, gguf.GGMLQuantizationType[kind]))
    error = np.linalg.norm(restored - weights) / np.linalg.norm(weights)
    assert 0 < error < (0.6 if kind.startswith("IQ1") else 0.35)  # a real quantizer: lossy, and not garbage
    threaded = lib.quantize(weights[:7], kind, weighting)  # fewer rows than chunks: every row still written once
    assert np.array_equal(threaded, data[:7])


def test_written_types_are_what_llama_quantize_writes(lib, smollm2_gguf, tmp_path):
    """One requantization of SmolLM2 with every type on the tensors of one block each (with a flat importance
    matrix, which the IQ1/IQ2 types need): rows of 576 (attention, gate, up) take llama.cpp's fallback, rows of
    1536 (ffn_down) the type itself; every tensor of the size the GGUF quantizer prices its width at."""
    kinds = [*TYPES.values(), "Q4_0", "Q4_1", "Q5_0", "Q5_1"]
    header = GGUFHeader(smollm2_gguf)
    overrides = {
        name: kinds[block]
        for name in header.tensors
        if name.startswith("blk.") and name.endswith(".weight") and len(header.tensors[name].shape) == 2
        for block in [int(name.split(".")[1])]
        if block < len(kinds)
    }
    target = tmp_path / "mixed.gguf"
    flat = importance.flat(smollm2_gguf, tmp_path / "flat.imatrix.gguf")
    gguf_tools.quantize_gguf(smollm2_gguf, target, "Q8_0", overrides, imatrix=flat)
    written = GGUFHeader(target).tensors
    quantizer, widths = make_quantizer("gguf"), {kind: width for width, kind in TYPES.items()}
    for name, kind in overrides.items():
        rows, columns = written[name].shape
        assert written[name].qtype.name == ggml.written_type(kind, columns), name
        if kind in widths:
            assert quantizer.storage(rows, columns, widths[kind]).bits == 8 * written[name].nbytes, name
    assert {written[n].qtype.name for n in overrides} >= {"Q5_0", "Q5_1", "Q8_0", "Q4_0", "Q6_K", "Q2_K", "IQ4_NL",
                                                          "IQ1_S", "IQ2_XXS", "IQ3_S", "IQ4_XS"}  # fmt: skip


# (budget, widths): a k-quant preset; an i-quant preset llama-quantize writes only with an importance matrix,
# with i-quant candidates (on SmolLM2's rows of 576 they fall back to IQ4_NL, on ffn_down's 1536 they are stored)
EXPORTS = [("q4_k_m", "3,4,6,8"), ("iq2_m", "IQ2_XXS,IQ2_S,IQ3_S,IQ4_XS,Q4_K")]


@pytest.fixture(scope="module", params=EXPORTS, ids=[budget for budget, _ in EXPORTS])
def exported(request, tmp_path_factory, smollm2_gguf):
    """`nsds run smollm2 --quantizer gguf --budget PRESET --widths ... --export` (short protocol), and the
    preset's file."""
    smollm2 = smollm2_gguf
    try:
        ggml.library()
    except NsdsError as err:
        missing(f"GGUF backend test needs llama.cpp's build: {err}")
    budget, widths = request.param
    out = tmp_path_factory.mktemp("gguf-run") / "out"
    argv = ["run", "smollm2", "--quantizer", "gguf", "--budget", budget, "--widths", widths, "--tokens", "1024",
            "--imatrix-tokens", "1024", "--export", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    preset = runtime.preset_file(smollm2, budget.upper(), out.parent, out / "imatrix.gguf")
    return smollm2, out, preset


def test_the_export_holds_exactly_the_weights_nsds_evaluated(exported):
    """Rounded by the importance matrix of the model's own text, exported beside the file."""
    source_path, out, _ = exported
    plan = Plan.load(out / "plan.json")
    quantizer = make_quantizer("gguf")
    names = runtime.tensor_names(source_path, [m.name for m in plan.modules])
    matrix = importance.read(out / "imatrix.gguf")
    weights = matrix.for_modules(names, {m.name: m.in_features for m in plan.modules})
    with GGUFSource(source_path) as source, GGUFSource(out / "model.gguf") as written:
        for m in plan.modules:
            weight = source.tensor(f"{m.name}.weight")
            expected = quantizer.fake_quantize_as(weight, m.format, weights[m.name])
            assert torch.equal(expected, written.tensor(f"{m.name}.weight")), m.name
    types = GGUFHeader(out / "model.gguf").tensors
    assert {m.name: types[names[m.name]].qtype.name for m in plan.modules} == plan.formats()
    lines = (out / "tensor-types.txt").read_text().splitlines()
    assert len(lines) == len(plan.modules) and all(line.startswith("^blk\\.") for line in lines)


def predicted_bytes(template, formats: dict[str, str]) -> int:
    """The size of a file llama-quantize writes from the same base as `template` (a file it wrote with the
    same base type), with the tensors in `formats` (GGUF name -> type) stored as those types instead: the
    same header, then every tensor's data padded to the file's alignment."""
    header = GGUFHeader(template)
    size = header.data_start
    for name, tensor in header.tensors.items():
        nbytes = tensor.nbytes
        if name in formats:
            nbytes = ggml.tensor_bytes(formats[name], math.prod(tensor.shape[:-1]), tensor.shape[-1])
        size += -(-nbytes // header.alignment) * header.alignment
    return size


def test_the_file_has_the_predicted_size_and_fits_the_preset(exported):
    source_path, out, preset = exported
    plan = Plan.load(out / "plan.json")
    names = runtime.tensor_names(source_path, [m.name for m in plan.modules])
    formats = {names[m.name]: m.format for m in plan.modules}
    size = (out / "model.gguf").stat().st_size
    assert predicted_bytes(preset, formats) == size  # the preset's header and layout, the plan's types
    preset_tensors = GGUFHeader(preset).tensors
    preset_bits = sum(8 * preset_tensors[names[m.name]].nbytes for m in plan.modules)
    assert plan.budget == pytest.approx(preset_bits / plan.params, rel=1e-12)  # the preset name resolved to its size
    assert plan.storage_bits <= plan.budget + 1e-12
    assert sum(m.storage for m in plan.modules) == sum(8 * ggml.tensor_bytes(m.format, m.out_features,
                                                       m.in_features) for m in plan.modules)  # fmt: skip
    assert size <= preset.stat().st_size
    assert f"stored as llama.cpp's {preset.stem} stores them" in plan.embeddings


def test_llama_perplexity_agrees_with_nsds_on_every_plan(exported):
    _, out, preset = exported
    result = RunResult.load(out / "results.json")
    labels = [e.label for e in result.evaluations]
    assert labels == ["reference", "nsds", "uniform", preset.stem]
    reference = result.evaluation("reference")
    assert reference.runtime is not None and reference.runtime.chunks == 1024 // result.protocol.window
    assert reference.runtime.kld is None and result.config.imatrix == "self"
    for e in result.evaluations[1:]:
        assert e.runtime is not None and math.isfinite(e.runtime.ppl)
        r = e.runtime
        assert 0 < r.kld < r.kld_p99 and 0 < r.kld_stderr < r.kld and 0.5 < r.same_top < 1, e.label
        # in process: every position against the float32 reference; llama.cpp: the second half of each chunk,
        # activations quantized in its matrix products (measured 0.80 to 0.92 of llama.cpp's at 1024 tokens)
        assert 0 < e.kld_stderr < e.kld < e.kld_p99 and 0.5 < e.same_top < 1, e.label
        assert 0.6 < e.kld / r.kld < 1.25, e.label
        nsds_cost, llama_cost = e.ppl / reference.ppl, e.runtime.ppl / reference.runtime.ppl
        assert abs(math.log(llama_cost / nsds_cost)) < 0.1, e.label  # the same plan, two evaluators
    nsds, uniform = result.evaluation("nsds"), result.evaluation("uniform")
    assert (nsds.kld < uniform.kld) == (nsds.runtime.kld < uniform.runtime.kld)  # both judges rank them alike
    assert result.evaluation(preset.stem).runtime.file_bytes == preset.stat().st_size
    assert result.evaluation("nsds").runtime.file_bytes == (out / "model.gguf").stat().st_size
    saved = json.loads((out / "results.json").read_text())
    assert saved["config"]["budget"] == preset.stem.lower() and saved["config"]["budget_counts"] == "storage"
    assert "llama.cpp's own types" in (out / "report.md").read_text()


def test_a_preset_below_what_the_widths_reach_is_refused(lib, tmp_path):
    with pytest.raises(NsdsError, match=r"outside what widths \[6, 8\] can reach"):
        prepare(RunConfig(quantizer="gguf", budget="Q2_K", widths=(6, 8), out=tmp_path / "out"), tmp_path)
    assert not (tmp_path / "out").exists()
