"""llama.cpp's GGUF types as a quantizer (docs/GGUF.md): a width is a ggml type, its numerics are ggml's own
(nsds.ggml), and its cost is the true size of the type llama.cpp writes, fallbacks included."""

from collections.abc import Iterable
from typing import ClassVar

import torch

from nsds import ggml
from nsds.errors import NsdsError
from nsds.quantize.base import Quantizer, Storage

K_QUANTS = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0")  # llama.cpp's k-quants, and Q8_0 for 8 bits
I_QUANTS = (*ggml.I_QUANTS_256, "IQ4_NL")
# Width -> the ggml type it stands for: a k-quant by the bits its name states (4: Q4_K), an i-quant by its
# bits per weight (3.4375: IQ3_S), as ggml.GgmlType.nominal_bits reads them.
TYPES = {ggml.ggml_type(kind).nominal_bits: kind for kind in K_QUANTS + I_QUANTS}


def width_of(name: str) -> float:
    """The width that stands for a ggml type named by the user (IQ3_S, q4_k), or a one-line error."""
    widths = {kind: width for width, kind in TYPES.items()}
    if name.strip().upper() not in widths:
        raise NsdsError(f"'{name}' is neither a number of bits nor a GGUF type nsds plans with ({', '.join(widths)})")
    return widths[name.strip().upper()]


class GGUF(Quantizer):
    """Width b is TYPES[b]; on rows its block does not divide, llama.cpp's fallback type (ggml.written_type).
    Block sizes and scales are the types' own, so a group size or symmetry cannot be chosen."""

    name = "gguf"
    widths = frozenset(TYPES)
    budget_counts: ClassVar[tuple[str, ...]] = ("storage",)  # a type's bits include its block scales
    takes_importance: ClassVar[bool] = True
    # the k-quants (a preset mixes them all); an i-quant preset's budget adds the i-quants (pipeline)
    default_widths: ClassVar[tuple[float, ...]] = tuple(width_of(kind) for kind in K_QUANTS)

    def __init__(self, group_size: int | None = None, symmetric: bool = False) -> None:
        if group_size is not None or symmetric:
            raise NsdsError("GGUF types fix their own blocks and scales: drop --group-size and --symmetric")
        super().__init__(None, False)
        self._ggml: ggml.Ggml | None = None

    def written_type(self, in_features: int, bits: float) -> str:
        return ggml.written_type(TYPES[bits], in_features)

    def storage(self, out_features: int, in_features: int, bits: float) -> Storage:
        kind = self.written_type(in_features, bits)
        block = ggml.ggml_type(kind).block_size
        return Storage(kind, block, 8 * ggml.tensor_bytes(kind, out_features, in_features))

    def fake_quantize(self, weight: torch.Tensor, bits: float) -> torch.Tensor:
        return self.fake_quantize_as(weight, self.written_type(weight.shape[1], bits))

    def fake_quantize_as(self, weight: torch.Tensor, storage_format: str,
                         importance: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """Any ggml type llama.cpp may write (a preset's choices too), with ggml's own numerics (rounded by
        `importance`, one weight per input column, as llama-quantize --imatrix rounds)."""
        if self._ggml is None:
            self._ggml = ggml.library()
        kind = ggml.ggml_type(storage_format)
        if weight.shape[1] % kind.block_size:
            raise NsdsError(f"{kind.name} cannot store rows of {weight.shape[1]} weights")
        return self._ggml.fake_quantize(weight, kind.name, importance)

    @staticmethod
    def needing_importance(widths: Iterable[float]) -> list[str]:
        """The types among `widths` llama-quantize writes only with an importance matrix."""
        return [TYPES[w] for w in sorted(set(widths)) if w in TYPES and TYPES[w] in ggml.NEEDS_IMPORTANCE]

    def describe(self) -> str:
        return f"{self.name} (llama.cpp types: {', '.join(f'{b:g}={t}' for b, t in TYPES.items())})"
