"""Weight-only quantizers behind one interface, and applying a Plan to a loaded model (fake-quant).

A quantizer maps a weight matrix (nn.Linear layout) to its dequantized self at a given width and group
size. New backends (GPTQ, AWQ) implement `Quantizer` and register in QUANTIZERS; allocators never see
them, only their supported widths and per-group storage.
"""

from abc import ABC, abstractmethod

import torch

from nsds.errors import NsdsError


class Quantizer(ABC):
    name: str
    widths: frozenset[int]
    grouping: str = "row"  # "row": groups never cross rows; "flat": runs over the row-major weights

    @abstractmethod
    def overhead_bits_per_group(self, symmetric: bool) -> int:
        """Storage of one group's scale (and zero point)."""

    @abstractmethod
    def fake_quantize(self, weight: torch.Tensor, bits: int, group_size: int, symmetric: bool) -> torch.Tensor:
        """Quantize and dequantize `weight` (out x in), groups running along in_features within a row."""

    def check(self, widths: list[int], symmetric: bool) -> None:
        unsupported = sorted(set(widths) - self.widths)
        if unsupported:
            raise NsdsError(
                f"quantizer '{self.name}' does not support width(s) {unsupported}; it supports {sorted(self.widths)}"
            )


def get_quantizer(name: str) -> Quantizer:
    from nsds.quantize.hqq import HQQ
    from nsds.quantize.rtn import RTN

    quantizers = {"rtn": RTN(), "hqq": HQQ()}
    if name not in quantizers:
        raise NsdsError(f"unknown quantizer '{name}'; choose from {', '.join(quantizers)}")
    return quantizers[name]


class Pristine:
    """A copy of the planned modules' original weights, so one loaded model can be quantized by many
    plans in turn (each plan starts from the checkpoint's values, not from the previous plan's)."""

    def __init__(self, model: torch.nn.Module, names: list[str]) -> None:
        self.weights = {name: model.get_submodule(name).weight.detach().clone() for name in names}

    def restore(self, model: torch.nn.Module) -> None:
        with torch.no_grad():
            for name, weight in self.weights.items():
                model.get_submodule(name).weight.copy_(weight)


def _fake_quantize_module(weight: torch.Tensor, conv1d: bool, quantizer: Quantizer, bits: int, group_size: int,
                          symmetric: bool) -> torch.Tensor:  # fmt: skip
    """Quantize a module's stored weight; GPT-2's Conv1D stores (in, out), so groups run along dim 0."""
    quantized = quantizer.fake_quantize(weight.T if conv1d else weight, bits, group_size, symmetric)
    return quantized.T if conv1d else quantized


def apply_plan(model: torch.nn.Module, plan, pristine: Pristine, quantizer: Quantizer) -> None:
    """Replace each planned module's weights by their quantized-dequantized values (fake-quant)."""
    from nsds.arch import family_of
    from nsds.progress import progress

    conv1d = family_of(model.config.model_type).conv1d
    with torch.no_grad():
        for module in progress(plan.modules, desc=f"quantizing ({quantizer.name})", unit="module"):
            weight = pristine.weights[module.name]
            quantized = _fake_quantize_module(weight, conv1d, quantizer, module.bits, module.group_size, plan.symmetric)
            model.get_submodule(module.name).weight.copy_(quantized)


class WeightBank:
    """Quantized variants of a model's modules, computed once per (module, width) and kept, so that
    evaluating many plans (or one layer at a time, for the oracle) quantizes each module once."""

    def __init__(self, model: torch.nn.Module, pristine: Pristine, quantizer: Quantizer, group_size: int,
                 symmetric: bool = False) -> None:  # fmt: skip
        from nsds.arch import family_of

        self.model, self.pristine, self.quantizer = model, pristine, quantizer
        self.group_size, self.symmetric = group_size, symmetric
        self.conv1d = family_of(model.config.model_type).conv1d
        self.variants: dict[tuple[str, int], torch.Tensor] = {}

    def quantized(self, name: str, bits: int) -> torch.Tensor:
        """The module's checkpoint weight quantized-dequantized at `bits`, in the module's layout."""
        if (name, bits) not in self.variants:
            self.variants[name, bits] = _fake_quantize_module(
                self.pristine.weights[name], self.conv1d, self.quantizer, bits, self.group_size, self.symmetric
            )
        return self.variants[name, bits]

    def load(self, bits: dict[str, int]) -> None:
        """Set every pristine module: quantized at bits[name], or the checkpoint's weights where absent."""
        with torch.no_grad():
            for name, weight in self.pristine.weights.items():
                width = bits.get(name)
                self.model.get_submodule(name).weight.copy_(weight if width is None else self.quantized(name, width))
