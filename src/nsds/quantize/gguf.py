"""llama.cpp's GGUF types as a quantizer (docs/GGUF.md): a width is a k-quant (or Q8_0), its numerics
are ggml's own (nsds.ggml), and its cost is the true size of the type llama.cpp writes, fallbacks included."""

from typing import ClassVar

import torch

from nsds import ggml
from nsds.errors import NsdsError
from nsds.quantize.base import Quantizer, Storage

# Nominal bits -> the ggml type a width stands for: llama.cpp's k-quants, and Q8_0 for 8 bits.
TYPES = {2: "Q2_K", 3: "Q3_K", 4: "Q4_K", 5: "Q5_K", 6: "Q6_K", 8: "Q8_0"}


class GGUF(Quantizer):
    """Width b is TYPES[b]; on rows its block does not divide, llama.cpp's fallback type (ggml.written_type).
    Block sizes and scales are the types' own, so a group size or symmetry cannot be chosen."""

    name = "gguf"
    widths = frozenset(TYPES)
    budget_counts: ClassVar[tuple[str, ...]] = ("storage",)  # a type's bits include its block scales
    takes_importance: ClassVar[bool] = True
    default_widths: ClassVar[tuple[int, ...]] = tuple(sorted(TYPES))  # every type: a preset mixes them all

    def __init__(self, group_size: int | None = None, symmetric: bool = False) -> None:
        if group_size is not None or symmetric:
            raise NsdsError("GGUF types fix their own blocks and scales: drop --group-size and --symmetric")
        super().__init__(None, False)
        self._ggml: ggml.Ggml | None = None

    def written_type(self, in_features: int, bits: int) -> str:
        return ggml.written_type(TYPES[bits], in_features)

    def storage(self, out_features: int, in_features: int, bits: int) -> Storage:
        kind = self.written_type(in_features, bits)
        block = ggml.ggml_type(kind).block_size
        return Storage(kind, block, 8 * ggml.tensor_bytes(kind, out_features, in_features))

    def fake_quantize(self, weight: torch.Tensor, bits: int) -> torch.Tensor:
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

    def describe(self) -> str:
        return f"{self.name} (llama.cpp types: {', '.join(f'{b}={t}' for b, t in TYPES.items())})"
