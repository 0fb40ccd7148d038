"""The quantizer interface: a configured, weight-only quantizer that fake-quantizes one matrix at a width."""

from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import ClassVar

import torch

from nsds.errors import NsdsError
from nsds.plan import quantization_groups


class Quantizer(ABC):
    """A weight-only quantizer with its width-independent settings (group size, symmetry) fixed once.

    Allocators see only its name, widths, group layout and per-group storage; evaluation sees only
    `fake_quantize`. A new backend subclasses this and registers in nsds.quantize.QUANTIZERS.
    """

    name: ClassVar[str]
    widths: ClassVar[frozenset[int]]
    grouping: ClassVar[str] = "row"  # "row": groups never cross rows; "flat": runs over the row-major weights

    def __init__(self, group_size: int = 128, symmetric: bool = False) -> None:
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise NsdsError(f"group size must be a positive integer, got {group_size!r}")
        self.group_size, self.symmetric = group_size, symmetric

    @property
    @abstractmethod
    def overhead_bits_per_group(self) -> int:
        """Storage of one group's scale (and zero point)."""

    @abstractmethod
    def fake_quantize(self, weight: torch.Tensor, bits: int) -> torch.Tensor:
        """Quantize and dequantize `weight` (out x in) at `bits`, groups running along in_features."""

    def check_widths(self, widths: Iterable[int]) -> None:
        unsupported = sorted(set(widths) - self.widths)
        if unsupported:
            raise NsdsError(
                f"quantizer '{self.name}' does not support width(s) {unsupported}; it supports {sorted(self.widths)}"
            )

    def check_shape(self, out_features: int, in_features: int) -> None:  # noqa: B027 - most layouts fit any shape
        """Refuse a weight shape the layout cannot hold (before any work, not halfway through)."""

    def groups(self, out_features: int, in_features: int) -> int:
        """Quantization groups of one weight matrix in this quantizer's layout."""
        return quantization_groups(out_features, in_features, self.group_size, self.grouping)

    def describe(self) -> str:
        return f"{self.name} ({'symmetric' if self.symmetric else 'asymmetric'}, group size {self.group_size})"
