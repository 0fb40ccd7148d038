"""Quantizers: RTN against a plain loop, HQQ as HQQLinear stores it, plans applied and undone."""

import pytest
import torch

from nsds import arch
from nsds.allocate import Setting, topk
from nsds.cli import _width_list
from nsds.errors import NsdsError
from nsds.quantize import WeightBank, make_quantizer
from nsds.quantize.base import Storage
from nsds.quantize.gguf import GGUF, width_of
from nsds.quantize.rtn import rtn

from tiny_models import tiny_model


def rtn_by_hand(weight: torch.Tensor, bits: int, group: int, symmetric: bool) -> torch.Tensor:
    """Round-to-nearest written as a loop over rows and groups, scalar by scalar."""
    out = torch.empty_like(weight)
    top = 2**bits - 1
    for r in range(weight.shape[0]):
        for start in range(0, weight.shape[1], group):
            g = weight[r, start : start + group].tolist()
            if symmetric:
                scale = 2 * max(abs(x) for x in g) / top
                zero = 2 ** (bits - 1)
            else:
                scale = (max(g) - min(g)) / top
                zero = round(-min(g) / scale) if scale > 0 else 0
            scale = scale if scale > 0 else 1.0
            for j, x in enumerate(g):
                q = min(max(round(x / scale) + zero, 0), top)
                out[r, start + j] = (q - zero) * scale
    return out


@pytest.mark.parametrize(("features", "group"), [(576, 128), (64, 64), (70, 16)])  # 576 % 128 != 0
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("symmetric", [False, True])
def test_rtn_matches_the_plain_loop(features, group, bits, symmetric):
    torch.manual_seed(bits)
    weight = torch.randn(6, features, dtype=torch.float64) * 0.05
    got = rtn(weight, bits, group, symmetric)
    expected = rtn_by_hand(weight, bits, group, symmetric)
    assert torch.allclose(got, expected, atol=1e-6)
    levels = {round(v, 5) for v in (got[0, :group] / ((got[0, :group].max() - got[0, :group].min()) or 1)).tolist()}
    assert len(levels) <= 2**bits


def test_rtn_keeps_constant_groups_and_dtype():
    weight = torch.full((3, 32), 0.25, dtype=torch.bfloat16)
    out = rtn(weight, 2, 16)
    assert out.dtype == torch.bfloat16 and torch.equal(out, weight)


def test_hqq_fake_quant_is_what_hqqlinear_stores():
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 48, bias=False)
    for bits in (2, 3, 4):
        fake = make_quantizer("hqq", 32).fake_quantize(linear.weight.detach(), bits)
        stored = HQQLinear(linear, BaseQuantizeConfig(nbits=bits, group_size=32, axis=1), compute_dtype=torch.float32,
                           device="cpu", del_orig=False).dequantize()  # fmt: skip
        assert torch.allclose(fake, stored.reshape(48, 96), atol=1e-6), bits
        weight = linear.weight.detach()
        error = (fake - weight).pow(2).mean() / weight.pow(2).mean()
        assert 0 < float(error) < {2: 0.3, 3: 0.06, 4: 0.015}[bits]


def test_quantizer_checks():
    with pytest.raises(NsdsError, match="unknown quantizer 'gptq'"):
        make_quantizer("gptq")
    with pytest.raises(NsdsError, match=r"does not support width\(s\) \[7\]"):
        make_quantizer("hqq").check_widths([2, 7])
    with pytest.raises(NsdsError, match="asymmetric by construction"):
        make_quantizer("hqq", 64, symmetric=True)
    with pytest.raises(NsdsError, match="multiple of 8"):
        make_quantizer("hqq", 20)
    with pytest.raises(NsdsError, match="must divide every module's weight count"):
        make_quantizer("hqq", 16).fake_quantize(torch.randn(3, 6), 2)
    with pytest.raises(NsdsError, match="group size must be a positive integer"):
        make_quantizer("rtn", 0)
    assert make_quantizer("rtn", 64).overhead_bits_per_group == 32
    assert make_quantizer("rtn", 64, symmetric=True).overhead_bits_per_group == 16
    assert make_quantizer("rtn").group_size == 128  # None: the quantizer's default


def test_storage_counts_every_scale_and_zero():
    # 576 inputs in groups of 128: 5 groups per row (the last has 64), 16-bit scale + 16-bit zero each.
    assert make_quantizer("rtn", 128).storage(10, 576, 3) == Storage("int3 g128", 128, 10 * 576 * 3 + 10 * 5 * 32)
    assert make_quantizer("rtn", 128, symmetric=True).storage(10, 576, 3).bits == 10 * 576 * 3 + 10 * 5 * 16
    # HQQ's groups run over the row-major weights: 5760 / 128 = 45 groups.
    assert make_quantizer("hqq", 128).storage(10, 576, 3).bits == 10 * 576 * 3 + 45 * 32
    with pytest.raises(NsdsError, match="cannot store a 4 x 32 weight as 'int3 g64'"):
        make_quantizer("rtn", 128).fake_quantize_as(torch.randn(4, 32), "int3 g64")


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_apply_plan_and_restore(model_type):
    model = tiny_model(model_type)
    modules = arch.linear_modules(model)
    before = {m.name: model.get_submodule(m.name).weight.detach().clone() for m in modules}
    plan = topk(modules, [0.9, 0.1, 0.5, 0.2], Setting(3.0, (2, 4), make_quantizer("rtn", 16), "tiny"))
    bank = WeightBank(model, [m.name for m in modules], make_quantizer("rtn", 16), keep=False)
    bank.load_plan(plan)
    conv1d = model_type == "gpt2"
    for m in plan.modules:
        weight = model.get_submodule(m.name).weight.detach()
        original = before[m.name].T if conv1d else before[m.name]
        expected = rtn(original, m.bits, 16)
        assert torch.equal(weight.T if conv1d else weight, expected), m.name
    assert bank.variants == {}  # keep=False holds nothing but the pristine copy
    bank.restore()
    assert all(torch.equal(model.get_submodule(n).weight, w) for n, w in before.items())
    with pytest.raises(NsdsError, match="other settings"):
        WeightBank(model, [m.name for m in modules], make_quantizer("rtn", 32)).load_plan(plan)


def test_weight_bank_keeps_each_variant_once_and_loads_partial_widths():
    model = tiny_model("llama")
    modules = arch.linear_modules(model)
    before = {m.name: model.get_submodule(m.name).weight.detach().clone() for m in modules}
    bank = WeightBank(model, [m.name for m in modules], make_quantizer("rtn", 16))
    first = [m.name for m in modules if m.layer == 0]
    bank.load(dict.fromkeys(first, 2))
    for m in modules:
        weight = model.get_submodule(m.name).weight
        expected = rtn(before[m.name], 2, 16) if m.layer == 0 else before[m.name]
        assert torch.equal(weight, expected), m.name
    held = bank.variants[first[0], "int2 g16"]
    bank.load(dict.fromkeys(first, 2))
    assert bank.variants[first[0], "int2 g16"] is held and len(bank.variants) == len(first)


def test_gguf_storage_is_the_type_llama_cpp_writes():
    quantizer = make_quantizer("gguf")  # pricing needs no llama.cpp build; fake-quantizing does
    assert quantizer.storage(576, 576, 4) == Storage("Q5_0", 32, 576 * 576 // 32 * 22 * 8)  # 576 % 256: fallback
    assert quantizer.storage(576, 1536, 4) == Storage("Q4_K", 256, 576 * 1536 // 256 * 144 * 8)  # 4.5 bits
    assert quantizer.storage(576, 1536, 6).bits == 576 * 1536 // 256 * 210 * 8  # Q6_K: 6.5625 bits per weight
    assert quantizer.storage(8, 100, 8).format == "F16"  # no block divides 100: llama.cpp keeps it F16
    with pytest.raises(NsdsError, match="drop --group-size and --symmetric"):
        make_quantizer("gguf", 64)
    with pytest.raises(NsdsError, match=r"does not support width\(s\) \[7\]"):
        quantizer.check_widths([4, 7])


def test_gguf_i_quants_are_widths_of_their_bits_per_weight():
    """llama.cpp's i-quants priced by their blocks, falling back to IQ4_NL on rows 256 does not divide;
    named in --widths by their types; the ones llama-quantize writes only with an importance matrix known."""
    quantizer = make_quantizer("gguf")
    assert [width_of(name) for name in ("IQ2_XXS", "iq3_s", "IQ4_XS", "Q4_K", "Q8_0")] == [2.0625, 3.4375, 4.25, 4, 8]
    assert quantizer.storage(576, 1536, 2.0625) == Storage("IQ2_XXS", 256, 576 * 1536 // 256 * 66 * 8)
    assert quantizer.storage(576, 576, 2.0625) == Storage("IQ4_NL", 32, 576 * 576 // 32 * 18 * 8)
    assert quantizer.storage(576, 1536, 1.5625).bits == 576 * 1536 * 1.5625  # IQ1_S
    assert GGUF.needing_importance([4, 3.4375, 2.0625, 1.75, 3.0625]) == ["IQ1_M", "IQ2_XXS", "IQ3_XXS"]
    assert set(quantizer.default_widths) == {2, 3, 4, 5, 6, 8}  # the k-quants, unless the budget is an IQ preset
    assert _width_list("2,IQ3_S, q4_k,4.25,6.0") == (2, 3.4375, 4, 4.25, 6)
    assert all(isinstance(w, int) for w in _width_list("2,4.0"))  # RTN's formats name integer widths (int4)
    with pytest.raises(NsdsError, match="'IQ5_X' is neither a number of bits nor a GGUF type nsds plans with"):
        width_of("IQ5_X")
