"""compressed-tensors' integer weight-only format, as vLLM's W4A16 / W8A16 kernels read it: int4 or int8,
symmetric, group-wise along the input features, one bfloat16 scale per group taken from the group's min and
max (llm-compressor's model-free observer). The numerics are compressed-tensors' own functions, run in
bfloat16, so a folder nsds exports (nsds.ct_export) holds exactly the weights nsds evaluated."""

from typing import TYPE_CHECKING, ClassVar

import torch

from nsds.errors import NsdsError
from nsds.quantize.base import GroupQuantizer

if TYPE_CHECKING:  # compressed-tensors takes seconds to import: only runs with this quantizer pay for it
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

DTYPE = torch.bfloat16  # the dtype of the exported weights and scales (vLLM's kernels run in it)


def weight_args(bits: int, group_size: int) -> "QuantizationArgs":
    """compressed-tensors' description of a width: symmetric int group-wise weights, min-max observed."""
    from compressed_tensors.quantization import QuantizationArgs

    return QuantizationArgs(num_bits=bits, type="int", symmetric=True, strategy="group", group_size=group_size,
                            observer="memoryless_minmax")  # fmt: skip


def scheme(bits: int, group_size: int, targets: list[str]) -> "QuantizationScheme":
    """One config group: the modules `targets` at `bits`, weights only."""
    from compressed_tensors.quantization import QuantizationScheme

    return QuantizationScheme(targets=targets, weights=weight_args(bits, group_size))


def quantization_parameters(weight: torch.Tensor, args: "QuantizationArgs") -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point (out x groups) of an out x in weight: each group's min and max in DTYPE, through
    compressed-tensors' calculate_qparams."""
    from compressed_tensors.quantization.utils import calculate_qparams

    groups = weight.to(DTYPE).unflatten(-1, (-1, args.group_size))
    return calculate_qparams(groups.amin(dim=-1), groups.amax(dim=-1), args)


class CompressedTensors(GroupQuantizer):
    """Widths 4 and 8 (what vLLM's compressed-tensors weight-only kernels take); symmetric by construction
    (their int8 path reads no zero point); the group size must divide every planned module's input features."""

    name = "ct"
    widths = frozenset({4, 8})
    default_widths: ClassVar[tuple[int, ...]] = (4, 8)

    def __init__(self, group_size: int | None = None, symmetric: bool = True) -> None:
        super().__init__(group_size, True)

    @property
    def overhead_bits_per_group(self) -> int:
        return 16  # one bfloat16 scale

    def check_shape(self, out_features: int, in_features: int) -> None:
        if in_features % self.group_size:
            raise NsdsError(f"compressed-tensors' groups of {self.group_size} do not divide rows of {in_features} "
                            "weights (vLLM takes whole groups); give a --group-size that divides it")  # fmt: skip

    def fake_quantize(self, weight: torch.Tensor, bits: int) -> torch.Tensor:
        from compressed_tensors.quantization.lifecycle.forward import fake_quantize

        self.check_shape(*weight.shape)
        args = weight_args(bits, self.group_size)
        scale, zero = quantization_parameters(weight, args)
        return fake_quantize(weight.to(DTYPE), scale, zero, args).to(weight.dtype)

    def describe(self) -> str:
        return f"{self.name} (compressed-tensors int, symmetric, group size {self.group_size}, {DTYPE})"
