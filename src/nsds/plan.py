"""The quantization plan: one typed, serialisable object passed from the allocator to every later stage.

It says, for every quantizable linear module, its width, group size, the format it is stored in and what
that storage costs (as the quantizer counts it: for GGUF the ggml type llama.cpp writes after its
fallbacks), and why it got that width; and it accounts for the average bits per weight two ways: weight
bits only, and true storage including every scale and zero point. Token embedding and output head are
outside the budget and the plan says how they are stored.
"""

from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from nsds import __version__
from nsds.documents import build
from nsds.errors import NsdsError
from nsds.files import read_document, write_json

SCHEMA = "nsds.plan/2"
# A width: integer bits (RTN, HQQ, compressed-tensors, GGUF's k-quants), or a GGUF i-quant's bits per weight
# (IQ3_S: 3.4375); documents keep an integer width an integer.
Width = int | float
OUTSIDE_BUDGET = "token embedding and output head keep the checkpoint's precision and are outside the budget"


@dataclass(frozen=True)
class Module:
    """A quantizable linear module of the model (nn.Linear layout: out_features x in_features)."""

    name: str  # e.g. "model.layers.3.self_attn.q_proj"
    layer: int
    role: str  # q, k, v, o, up, gate, down, or a fused qkv / gate_up
    out_features: int
    in_features: int
    group: str  # modules with the same group must share a width (e.g. "3.qkv" when a runtime fuses q/k/v)
    expert: str | None = None  # a MoE layer's expert ("0", "1", ... or "shared"); None outside experts

    @property
    def params(self) -> int:
        return self.out_features * self.in_features


@dataclass(frozen=True)
class ModulePlan:
    name: str
    layer: int
    role: str
    out_features: int
    in_features: int
    bits: Width  # the width the allocator chose
    group_size: int  # weights per quantization group (for GGUF: per block of the written type)
    format: str  # how it is stored, e.g. "int4 g128" or the ggml type "Q5_0"
    storage: int  # bits it takes stored, every scale and zero point included
    reason: dict[str, Any]  # why this width: allocator, layer score, rank

    def __post_init__(self) -> None:
        if min(self.bits, self.group_size, self.out_features, self.in_features, self.storage) < 1 or self.layer < 0:
            raise NsdsError(f"module '{self.name}': bits, group size, features and storage must be positive")

    @property
    def params(self) -> int:
        return self.out_features * self.in_features


@dataclass
class Plan:
    """Widths for every quantizable module, with bits accounting; `to_dict`/`load` give versioned JSON."""

    model: str
    quantizer: str
    allocator: str
    budget: float | None  # average weight bits asked for (None for a fixed uniform width)
    widths: list[Width]
    modules: list[ModulePlan]
    symmetric: bool = False
    embeddings: str = OUTSIDE_BUDGET
    nsds_version: str = __version__
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    schema: str = SCHEMA

    def __post_init__(self) -> None:
        if not self.modules:
            raise NsdsError("a plan must hold at least one module")

    @property
    def params(self) -> int:
        return sum(m.params for m in self.modules)

    @property
    def weight_bits(self) -> float:
        """Average bits per weight over the quantized modules, weights only."""
        return sum(m.params * m.bits for m in self.modules) / self.params

    @property
    def storage_bits(self) -> float:
        """Average bits per weight as stored, every scale and zero point included."""
        return sum(m.storage for m in self.modules) / self.params

    def formats(self) -> dict[str, str]:
        """Module name -> storage format."""
        return {m.name: m.format for m in self.modules}

    def layer_bits(self) -> list[float]:
        """Parameter-weighted average width of each layer."""
        layers = sorted({m.layer for m in self.modules})
        return [
            sum(m.params * m.bits for m in self.modules if m.layer == i)
            / sum(m.params for m in self.modules if m.layer == i)
            for i in layers
        ]

    def to_dict(self) -> dict[str, Any]:
        data = {k: v for k, v in asdict(self).items() if k != "schema"}
        summary = {"params": self.params, "weight_bits": self.weight_bits, "storage_bits": self.storage_bits}
        return {"schema": self.schema} | data | {"summary": summary}

    def save(self, path: Path) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Plan":
        return build(cls, {k: v for k, v in data.items() if k != "summary"})

    @classmethod
    def load(cls, path: Path) -> "Plan":
        return read_document(path, SCHEMA, "plan", cls.from_dict)
