"""Putting widths into a loaded model: fake-quantized weights from pristine copies, each computed once."""

from collections.abc import Mapping, Sequence

import torch

from nsds.arch import module_weight
from nsds.errors import NsdsError
from nsds.plan import Plan
from nsds.progress import progress
from nsds.quantize.base import Quantizer


class WeightBank:
    """A loaded model's quantizable modules, their checkpoint weights, and their quantized variants.

    `load` sets every module to its width (or back to the checkpoint's weights where none is given),
    always starting from the pristine copy, so one loaded model serves many plans in turn. With `keep`,
    each (module, width) is quantized once and kept (nsds compare evaluates hundreds of plans over a few
    widths); without, nothing but the pristine copy is held. With `importance` (module name -> one weight
    per input column: an importance matrix), a quantizer that takes one rounds every module by it.
    """

    def __init__(self, model: torch.nn.Module, names: Sequence[str], quantizer: Quantizer, keep: bool = True,
                 importance: Mapping[str, torch.Tensor] | None = None) -> None:  # fmt: skip
        self.model, self.quantizer, self.keep = model, quantizer, keep
        self.importance = dict(importance or {})
        # Each module's weight as the model holds it: its own parameter, or a MoE expert's slice of a fused
        # 3-D parameter; `transposed` where it is stored (in, out) (GPT-2's Conv1D, gpt-oss's experts).
        self.slots = {name: module_weight(model, name) for name in names}
        self.pristine = {name: weight.detach().clone() for name, (weight, _) in self.slots.items()}
        self.variants: dict[tuple[str, str], torch.Tensor] = {}

    def quantized(self, name: str, storage_format: str) -> torch.Tensor:
        """The module's checkpoint weight quantized-dequantized as `storage_format`, in the module's layout."""
        if (name, storage_format) in self.variants:
            return self.variants[name, storage_format]
        quantized = _quantized(self.quantizer, self.pristine[name], self.slots[name][1], storage_format,
                               self.importance.get(name))  # fmt: skip
        if self.keep:
            self.variants[name, storage_format] = quantized
        return quantized

    def linear(self, name: str, storage_format: str | None = None) -> torch.Tensor:
        """The module's checkpoint weight (or, given a format, its quantized variant) as out x in."""
        weight = self.pristine[name] if storage_format is None else self.quantized(name, storage_format)
        return weight.T if self.slots[name][1] else weight

    def load(self, widths: Mapping[str, float], desc: str = "quantizing") -> None:
        """Every module quantized at widths[name], or at the checkpoint's weights where absent."""
        self._check_names(widths)
        formats = {}
        for name, bits in widths.items():
            out, features = self.linear(name).shape
            formats[name] = self.quantizer.storage(out, features, bits).format
        self.load_formats(formats, desc)

    def load_formats(self, formats: Mapping[str, str], desc: str = "quantizing") -> None:
        """Every module stored as formats[name] (and read back), or at the checkpoint's weights where absent."""
        self._check_names(formats)
        with torch.no_grad():
            for name in progress(self.pristine, desc=f"{desc} ({self.quantizer.name})", unit="module"):
                kind = formats.get(name)
                weight = self.pristine[name] if kind is None else self.quantized(name, kind)
                self.slots[name][0].copy_(weight)

    def _check_names(self, names: Mapping[str, object]) -> None:
        unknown = set(names) - set(self.pristine)
        if unknown:
            raise NsdsError(f"the plan names modules this model does not have: {', '.join(sorted(unknown)[:3])}")

    def load_plan(self, plan: Plan) -> None:
        """The plan's storage formats; it must have been made for this quantizer and its settings."""
        q = self.quantizer
        if plan.quantizer != q.name or plan.symmetric != q.symmetric:
            raise NsdsError(f"the plan was made for {plan.quantizer} with other settings than {q.describe()}")
        self.load_formats(plan.formats())

    def restore(self) -> None:
        """Every module back at the checkpoint's weights."""
        self.load({}, desc="restoring")


def _quantized(quantizer: Quantizer, weight: torch.Tensor, transposed: bool, storage_format: str,
               importance: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
    """`weight` (as the model holds it, transposed or not) stored as `storage_format` and read back."""
    quantized = quantizer.fake_quantize_as(weight.T if transposed else weight, storage_format, importance)
    return quantized.T if transposed else quantized


def quantize_into(model: torch.nn.Module, formats: Mapping[str, str], quantizer: Quantizer,
                  importance: Mapping[str, torch.Tensor]) -> None:  # fmt: skip
    """Every module named in `formats` stored as its format and read back, in place, from the weights the model
    holds now (a layer just read from the checkpoint; rounded by `importance` where the quantizer takes one)."""
    with torch.no_grad():
        for name, storage_format in formats.items():
            view, transposed = module_weight(model, name)
            view.copy_(_quantized(quantizer, view, transposed, storage_format, importance.get(name)))
