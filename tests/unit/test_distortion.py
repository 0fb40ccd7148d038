"""Measured module errors: the formula by hand, the norm gains of each norm variant, and the table of a real
(tiny) model against a direct computation (relative, gained and Fisher-weighted)."""

import json

import pytest
import torch

from nsds import arch
from nsds.distortion import ErrorTable, cached_errors, layerwise_errors, measure_errors, output_error
from nsds.errors import NsdsError
from nsds.fisher import layerwise_fisher, self_text
from nsds.layerwise import LayerwiseModel
from nsds.quantize import WeightBank, make_quantizer
from nsds.quantize.rtn import rtn

from tiny_models import tiny_model


def test_output_error_by_hand():
    w = torch.tensor([[1.0, 2.0], [0.0, -2.0]])
    q = torch.tensor([[1.0, 1.0], [0.0, -1.0]])
    assert output_error(w, q) == pytest.approx(2 / 9)  # (1 + 1) / (1 + 4 + 4)
    gain = torch.tensor([3.0, 0.5])
    assert output_error(w, q, gain) == pytest.approx(0.5 / 11)  # (0.25 + 0.25) / (9 + 1 + 1)
    assert output_error(torch.zeros(2, 2), torch.zeros(2, 2)) == 0.0


@pytest.mark.parametrize(
    ("model_type", "attn", "mlp", "offset"),
    [
        ("llama", "input_layernorm", "post_attention_layernorm", 0.0),
        ("gemma3", "input_layernorm", "pre_feedforward_layernorm", 1.0),  # Gemma scales by (1 + w)
        ("gpt2", "ln_1", "ln_2", 0.0),  # LayerNorm: its bias cancels
    ],
)
def test_input_gains_are_the_norms_effective_weights(model_type, attn, mlp, offset):
    model = tiny_model(model_type)
    torch.manual_seed(1)
    for parameter in model.parameters():  # norms start at 1 (or 0): make every gain distinct
        parameter.data.normal_()
    modules = arch.linear_modules(model, fuse=True)
    gains = arch.input_gains(model, modules)
    assert {m.role for m in modules if m.name in gains} == {m.role for m in modules} - {"o", "down"}
    layers = model.transformer.h if model_type == "gpt2" else model.model.layers
    for m in modules:
        if m.name in gains:
            norm = getattr(layers[m.layer], attn if m.role in ("q", "k", "v", "qkv") else mlp)
            assert torch.allclose(gains[m.name], norm.weight.detach() + offset, rtol=1e-4, atol=1e-5), m.name


def test_error_table_of_a_model_equals_a_direct_computation(tmp_path):
    model = tiny_model("llama")
    modules = arch.linear_modules(model, fuse=True)
    quantizer = make_quantizer("rtn", group_size=32)
    bank = WeightBank(model, [m.name for m in modules], quantizer, keep=False)
    gains = arch.input_gains(model, modules)
    fisher = {m.name: torch.rand(m.out_features, m.in_features, generator=torch.Generator().manual_seed(i))
              for i, m in enumerate(modules)}  # fmt: skip
    table = ErrorTable("rtn", (2, 4), measure_errors(bank, modules, (2, 4), gains, fisher))
    assert set(table.modules) == {m.name for m in modules}
    for m in modules[:7]:
        w = model.get_submodule(m.name).weight.detach()
        for bits in (2, 4):
            q = rtn(w, bits, 32)
            assert table.of(m.name, bits, "relative") == pytest.approx(float(((w - q) ** 2).sum() / (w**2).sum()))
            gain = gains.get(m.name, torch.ones(w.shape[1]))
            expected = float((((w - q) * gain) ** 2).sum() / ((w * gain) ** 2).sum())
            assert table.of(m.name, bits, "gained") == pytest.approx(expected)
            assert table.of(m.name, bits, "fisher") == pytest.approx(float((fisher[m.name] * (w - q) ** 2).sum()))
        assert table.of(m.name, 2, "relative") > table.of(m.name, 4, "relative") > 0
    table.save(tmp_path / "errors.json")
    assert ErrorTable.load(tmp_path / "errors.json") == table
    with pytest.raises(NsdsError, match="no width 3"):
        table.of(modules[0].name, 3, "relative")
    with pytest.raises(NsdsError, match="no importance error: it was measured without an importance matrix"):
        table.of(modules[0].name, 2, "importance")


def test_the_layer_by_layer_table_equals_the_whole_models(tmp_path):
    """Each layer's modules measured while the Fisher pass holds that layer: the table of the whole model with
    the same Fisher information, gains and quantizer (rounding by an importance matrix: the integration
    tests with llama.cpp's types)."""
    model = tiny_model("gemma3")
    model.save_pretrained(tmp_path / "model")
    modules = arch.linear_modules(model, fuse=True)
    quantizer = make_quantizer("rtn", group_size=16)
    tokens = self_text(model, bos=1, sequences=2, length=10)
    lm = LayerwiseModel(tmp_path / "model")
    table = layerwise_errors(lm, modules, quantizer, (4, 2), {}, tokens, tmp_path)
    fisher: dict[str, torch.Tensor] = {}
    layerwise_fisher(LayerwiseModel(tmp_path / "model", resident=True), modules, tokens, tmp_path,
                     lambda i, found: fisher.update(found))  # fmt: skip
    bank = WeightBank(model, [m.name for m in modules], quantizer, keep=False)
    whole = ErrorTable("rtn", (2, 4), measure_errors(bank, modules, (2, 4), arch.input_gains(model, modules), fisher))
    assert table == whole


def _tiny_lm(folder) -> tuple[LayerwiseModel, list]:
    model = tiny_model("llama")
    model.save_pretrained(folder)
    return LayerwiseModel(folder), arch.linear_modules(model, fuse=True)


def test_the_error_table_is_kept_in_the_nsds_cache_under_its_weights_quantizer_and_widths(tmp_path, monkeypatch):
    monkeypatch.setenv("NSDS_CACHE", str(tmp_path / "cache"))
    lm, modules = _tiny_lm(tmp_path / "model")
    calls = []

    def tokens():
        calls.append(1)
        return torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(0))

    def table(widths, weights="digest-a", group_size=32):
        quantizer = make_quantizer("rtn", group_size=group_size)
        return cached_errors(lm, modules, quantizer, widths, weights, ({"sample": 1}, tokens), tmp_path)

    cache = tmp_path / "cache" / "errors"
    first = table((2, 4))
    assert len(calls) == 1 and len(list(cache.iterdir())) == 1
    assert table((4, 2)) == first and len(calls) == 1  # read back: no sampling, no quantizing
    assert table((2, 3)).widths == (2, 3) and len(calls) == 2  # each of these is measured: another key
    table((2, 4), weights="digest-b")
    table((2, 4), group_size=64)
    assert len(calls) == 4 and len(list(cache.iterdir())) == 4
    for path in cache.iterdir():
        path.write_text("{ damaged")
    assert table((2, 4)) == first and len(calls) == 5  # a damaged entry is measured again
    for path in cache.iterdir():  # valid JSON, right key, a value of the wrong type
        if path.read_text().startswith("{ damaged"):
            continue
        entry = json.loads(path.read_text())
        if entry["key"]["widths"] == [2, 4] and entry["key"]["weights"] == "digest-a":
            name = next(iter(entry["table"]["modules"]))
            entry["table"]["modules"][name]["relative"][0] = "four"
            path.write_text(json.dumps(entry))
    assert table((2, 4)) == first and len(calls) == 6  # measured again, no traceback
