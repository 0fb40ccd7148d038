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


def apply_plan(model: torch.nn.Module, plan, pristine: Pristine, quantizer: Quantizer) -> None:
    """Replace each planned module's weights by their quantized-dequantized values (fake-quant)."""
    from nsds.arch import family_of
    from nsds.progress import progress

    conv1d = family_of(model.config.model_type).conv1d  # GPT-2 stores (in, out): groups run along dim 0
    with torch.no_grad():
        for module in progress(plan.modules, desc=f"quantizing ({quantizer.name})", unit="module"):
            weight = pristine.weights[module.name]
            weight = weight.T if conv1d else weight
            quantized = quantizer.fake_quantize(weight, module.bits, module.group_size, plan.symmetric)
            model.get_submodule(module.name).weight.copy_(quantized.T if conv1d else quantized)
