"""Putting widths into a loaded model: fake-quantized weights from pristine copies, each computed once."""

from collections.abc import Mapping, Sequence

import torch

from nsds.arch import family_of
from nsds.errors import NsdsError
from nsds.plan import Plan
from nsds.progress import progress
from nsds.quantize.base import Quantizer


class WeightBank:
    """A loaded model's quantizable modules, their checkpoint weights, and their quantized variants.

    `load` sets every module to its width (or back to the checkpoint's weights where none is given),
    always starting from the pristine copy, so one loaded model serves many plans in turn. With `keep`,
    each (module, width) is quantized once and kept (nsds compare evaluates hundreds of plans over a few
    widths); without, nothing but the pristine copy is held.
    """

    def __init__(self, model: torch.nn.Module, names: Sequence[str], quantizer: Quantizer, keep: bool = True) -> None:
        self.model, self.quantizer, self.keep = model, quantizer, keep
        self.conv1d = family_of(model.config.model_type).conv1d  # GPT-2's Conv1D stores (in, out)
        self.pristine = {name: model.get_submodule(name).weight.detach().clone() for name in names}
        self.variants: dict[tuple[str, int], torch.Tensor] = {}

    def quantized(self, name: str, bits: int) -> torch.Tensor:
        """The module's checkpoint weight quantized-dequantized at `bits`, in the module's layout."""
        if (name, bits) in self.variants:
            return self.variants[name, bits]
        weight = self.pristine[name]
        quantized = self.quantizer.fake_quantize(weight.T if self.conv1d else weight, bits)
        quantized = quantized.T if self.conv1d else quantized
        if self.keep:
            self.variants[name, bits] = quantized
        return quantized

    def load(self, widths: Mapping[str, int], desc: str = "quantizing") -> None:
        """Every module quantized at widths[name], or at the checkpoint's weights where absent."""
        unknown = set(widths) - set(self.pristine)
        if unknown:
            raise NsdsError(f"the plan names modules this model does not have: {', '.join(sorted(unknown)[:3])}")
        with torch.no_grad():
            for name in progress(self.pristine, desc=f"{desc} ({self.quantizer.name})", unit="module"):
                width = widths.get(name)
                weight = self.pristine[name] if width is None else self.quantized(name, width)
                self.model.get_submodule(name).weight.copy_(weight)

    def load_plan(self, plan: Plan) -> None:
        """The plan's widths; its quantizer settings must be this bank's."""
        q = self.quantizer
        if (
            plan.quantizer != q.name
            or plan.symmetric != q.symmetric
            or any(m.group_size != q.group_size for m in plan.modules)
        ):
            raise NsdsError(f"the plan was made for {plan.quantizer} with other settings than {q.describe()}")
        self.load({m.name: m.bits for m in plan.modules})

    def restore(self) -> None:
        """Every module back at the checkpoint's weights."""
        self.load({}, desc="restoring")
