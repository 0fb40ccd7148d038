"""The quantizer interface: a configured, weight-only quantizer that fake-quantizes one matrix at a width
and says how that matrix is stored (format and exact storage bits)."""

import math
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar

import torch

from nsds.errors import NsdsError


@dataclass(frozen=True)
class Storage:
    """How one weight matrix is stored at a width."""

    format: str  # e.g. "int4 g128", or the ggml type llama.cpp writes ("Q5_0")
    group_size: int  # weights sharing one scale (and zero point)
    bits: int  # total bits, every scale and zero point included


class Quantizer(ABC):
    """A weight-only quantizer with its width-independent settings (group size, symmetry) fixed once.

    Allocators see its name, widths and `storage`; evaluation sees only `fake_quantize`. A new backend
    subclasses this and registers in nsds.quantize.QUANTIZERS.
    """

    name: ClassVar[str]
    widths: ClassVar[frozenset[float]]
    budget_counts: ClassVar[tuple[str, ...]] = ("weights", "storage")  # what a budget may count; first: default
    default_group_size: ClassVar[int] = 128
    takes_importance: ClassVar[bool] = False  # whether it rounds by an importance matrix (llama.cpp's types)
    default_widths: ClassVar[tuple[float, ...]] = (2, 4)  # the candidates when none are given (the paper's mix)

    def __init__(self, group_size: int | None = None, symmetric: bool = False) -> None:
        group_size = self.default_group_size if group_size is None else group_size
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise NsdsError(f"group size must be a positive integer, got {group_size!r}")
        self.group_size, self.symmetric = group_size, symmetric

    @abstractmethod
    def fake_quantize(self, weight: torch.Tensor, bits: float) -> torch.Tensor:
        """Quantize and dequantize `weight` (out x in) at `bits`, groups running along in_features."""

    @abstractmethod
    def storage(self, out_features: int, in_features: int, bits: float) -> Storage:
        """How an out x in weight is stored at `bits` (after any fallback the format makes)."""

    def fake_quantize_as(self, weight: torch.Tensor, storage_format: str,
                         importance: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """`weight` fake-quantized as a plan records it: the width whose storage has that format (with
        `importance`, one weight per input column, where the quantizer takes_importance)."""
        if importance is not None and not self.takes_importance:
            raise NsdsError(f"quantizer '{self.name}' does not round by an importance matrix; use --quantizer gguf")
        out, features = weight.shape
        for bits in sorted(self.widths):
            if self.storage(out, features, bits).format == storage_format:
                return self.fake_quantize(weight, bits)
        raise NsdsError(f"{self.describe()} cannot store a {out} x {features} weight as '{storage_format}': the "
                        "plan was made with other settings")  # fmt: skip

    def check_widths(self, widths: Iterable[float]) -> None:
        unsupported = sorted(set(widths) - self.widths)
        if unsupported:
            raise NsdsError(
                f"quantizer '{self.name}' does not support width(s) {unsupported}; it supports {sorted(self.widths)}"
            )

    def check_shape(self, out_features: int, in_features: int) -> None:  # noqa: B027 - most layouts fit any shape
        """Refuse a weight shape the layout cannot hold (before any work, not halfway through)."""

    def describe(self) -> str:
        return f"{self.name} ({'symmetric' if self.symmetric else 'asymmetric'}, group size {self.group_size})"


class GroupQuantizer(Quantizer):
    """A uniform integer grid per group of weights, each group storing its own scale (and zero point)."""

    grouping: ClassVar[str] = "row"  # "row": groups never cross rows; "flat": runs over the row-major weights

    @property
    @abstractmethod
    def overhead_bits_per_group(self) -> int:
        """Storage of one group's scale (and zero point)."""

    def groups(self, out_features: int, in_features: int) -> int:
        """Quantization groups. "row": each row's in_features in runs of group_size (the last may be short);
        "flat": runs of group_size over the row-major weights (HQQ's layout; rows may share a group)."""
        if self.grouping == "flat":
            return math.ceil(out_features * in_features / self.group_size)
        return out_features * math.ceil(in_features / self.group_size)

    def storage(self, out_features: int, in_features: int, bits: int) -> Storage:
        overhead = self.groups(out_features, in_features) * self.overhead_bits_per_group
        return Storage(f"int{bits} g{self.group_size}", self.group_size, out_features * in_features * bits + overhead)
