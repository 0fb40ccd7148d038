"""The compressed-tensors quantizer and its export: the numbers nsds evaluates are compressed-tensors' own, the
folder `nsds run --quantizer ct --export` writes decompresses (with compressed-tensors) to exactly those
weights, its size is the plan's, transformers loads it, and what it cannot hold is refused up front."""

import json

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
from compressed_tensors.quantization import QuantizationConfig
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from nsds.cli import main
from nsds.config import RunConfig
from nsds.errors import NsdsError
from nsds.pipeline import run
from nsds.plan import Plan
from nsds.quantize import make_quantizer
from nsds.quantize.ct import DTYPE, quantization_parameters, scheme, weight_args

from tiny_models import save_tiny_tokenizer, tiny_model

TEXT = "The quick brown fox jumps over the lazy dog. A lazy dog sleeps while the quick fox runs. " * 30


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-ct")
    tiny_model("llama", vocab_size=300).to(torch.bfloat16).save_pretrained(folder)  # a bf16 checkpoint
    save_tiny_tokenizer(folder, TEXT)
    text = folder / "text.txt"
    text.write_text(TEXT)
    return folder, text


@pytest.mark.parametrize("bits", [4, 8])
def test_fake_quantization_is_what_compressed_tensors_packs_and_unpacks(bits):
    weight = torch.randn(48, 256, generator=torch.Generator().manual_seed(bits)) * 0.02
    quantizer = make_quantizer("ct", 64)
    fake = quantizer.fake_quantize(weight, bits)
    args = weight_args(bits, 64)
    scale, zero = quantization_parameters(weight, args)
    state = {"weight": weight.to(DTYPE), "weight_scale": scale, "weight_zero_point": zero}
    packed = PackedQuantizationCompressor.compress(state, scheme(bits, 64, []))
    assert packed["weight_packed"].dtype == torch.int32 and packed["weight_scale"].dtype == DTYPE
    unpacked = PackedQuantizationCompressor.decompress(packed, scheme(bits, 64, []))["weight"]
    assert torch.equal(unpacked.float(), fake)
    groups = fake.unflatten(-1, (-1, 64))
    levels = max(len(torch.unique(g)) for g in groups.flatten(0, 1))
    assert 2 < levels <= 2**bits  # a symmetric grid of 2^bits levels per group, and not a copy of the input
    assert quantizer.storage(48, 256, bits).bits == 48 * 256 * bits + 48 * 4 * 16  # one bf16 scale per group


def test_a_group_size_that_does_not_divide_the_rows_is_refused():
    with pytest.raises(NsdsError, match="groups of 128 do not divide rows of 576 weights"):
        make_quantizer("ct").check_shape(64, 576)
    with pytest.raises(NsdsError, match=r"does not support width\(s\) \[2\]"):
        make_quantizer("ct").check_widths([2, 4])


def test_the_exported_folder_holds_exactly_the_evaluated_weights(tiny_run, tmp_path):
    folder, text = tiny_run
    out = tmp_path / "out"
    result = run(RunConfig(model=str(folder), budget=6.0, quantizer="ct", widths=(4, 8), group_size=32,
                           text=str(text), tokens=200, window=32, out=out, device="cpu", export=True))  # fmt: skip
    plan = Plan.load(out / "plan.json")
    assert {m.bits for m in plan.modules} == {4, 8}  # a mixed plan
    exported = out / "model"
    config = json.loads((exported / "config.json").read_text())
    quantization = QuantizationConfig.model_validate(config["quantization_config"])
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    schemes = {name: s for s in quantization.config_groups.values() for name in s.targets}
    assert set(schemes) == {m.name for m in plan.modules}
    assert all(schemes[m.name].weights.num_bits == m.bits for m in plan.modules)

    index = json.loads((exported / "model.safetensors.index.json").read_text())["weight_map"]
    tensors = {}
    for file in set(index.values()):
        tensors |= load_file(exported / file)
    assert set(tensors) == set(index)
    source = load_file(folder / "model.safetensors")
    quantizer = make_quantizer("ct", 32)
    planned_bits = 0
    for m in plan.modules:
        state = {k: tensors[f"{m.name}.{k}"] for k in ("weight_packed", "weight_scale", "weight_shape")}
        planned_bits += 8 * sum(state[k].numel() * state[k].element_size() for k in ("weight_packed", "weight_scale"))
        weight = PackedQuantizationCompressor.decompress(state, schemes[m.name])["weight"]
        evaluated = quantizer.fake_quantize(source[f"{m.name}.weight"].float(), m.bits)
        assert torch.equal(weight.float(), evaluated), m.name
    assert planned_bits == sum(m.storage for m in plan.modules)  # the size the plan predicted, exactly
    unplanned = {k for k in tensors if k.rpartition(".")[0] not in schemes}
    assert unplanned == {k for k in source if k.rpartition(".")[0] not in schemes}
    assert all(torch.equal(tensors[k], source[k]) for k in unplanned)  # bf16 kept as it was

    model = AutoModelForCausalLM.from_pretrained(exported)  # transformers reads it through compressed-tensors
    ids = torch.tensor([[1, 5, 9, 42, 7, 3]])
    assert torch.isfinite(model(ids).logits).all()
    assert result.evaluations[1].label == "nsds" and result.evaluations[1].kld is not None


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--quantizer", "ct", "--group-size", "48"], "groups of 48 do not divide rows of 64 weights"),
        (["--quantizer", "ct", "--group-size", "32", "--export", "--no-fuse"], "must share a width; drop --no-fuse"),
        (
            ["--quantizer", "rtn", "--export"],
            "--export writes a GGUF file for llama.cpp (--quantizer gguf) or a "
            "compressed-tensors folder for vLLM (--quantizer ct)",
        ),
    ],
)
def test_what_the_format_cannot_hold_is_one_line_before_any_work(tiny_run, tmp_path, capsys, options, message):
    folder, text = tiny_run
    out = tmp_path / "out"
    assert main(["run", str(folder), "--budget", "6", "--widths", "4,8", "--text", str(text), "--out", str(out),
                 *options]) == 2  # fmt: skip
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0]
    assert not out.exists()


def test_a_moe_plan_is_not_exported(tmp_path, capsys):
    folder = tmp_path / "moe"
    tiny_model("mixtral").save_pretrained(folder)
    out = tmp_path / "out"
    assert main(["run", str(folder), "--quantizer", "ct", "--group-size", "32", "--budget", "6", "--widths", "4,8",
                 "--export", "--out", str(out)]) == 2  # fmt: skip
    assert "does not write mixture-of-experts plans yet" in capsys.readouterr().err
    assert not out.exists()
