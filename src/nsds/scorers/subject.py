"""What a layer scorer may look at, and the one way scorers read a layer's matrices."""

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from nsds import arch
from nsds.compute import Compute
from nsds.quantize.base import Quantizer
from nsds.weights.base import WeightSource

MATRICES = ("q", "k", "v", "o", "up", "gate", "down")


@dataclass
class Subject:
    """The model to score. `model`/`tokenizer` are needed by scorers that run the model (LieQ);
    `quantizer` (configured as the plans will be evaluated) and `low_width` by those that quantize (MSE).
    `memo` lets scorers that share work (NSDS and its ablations) reuse it."""

    source: WeightSource
    model: torch.nn.Module | None = None
    tokenizer: Any = None
    quantizer: Quantizer | None = None
    low_width: int = 2
    compute: Compute = field(default_factory=Compute)  # where NSDS's metrics run
    memo: dict[str, Any] = field(default_factory=dict)


def layer_matrices(source: WeightSource) -> Iterator[dict[str, torch.Tensor]]:
    """Each decoder layer's linear weights by role (q, k, v, o, up, gate, down; nn.Linear layout),
    fused tensors split, read one layer at a time. `gate` is absent for MLPs without one. A MoE layer has
    each expert's instead of up/gate/down ("up.0", ..., "down.shared"); MLA's q/k/v are formed from their
    latent factors."""
    family = arch.family_of(source.config.model_type)
    geo = arch.geometry(source.config)
    body = arch.find_body(family, source.names())
    for i in range(geo.num_layers):
        roles = arch.layer_roles(family, geo, arch.source_layer(source, family, body, i))
        matrices = {name: getattr(roles, name) for name in MATRICES if getattr(roles, name) is not None}
        matrices = {
            name: w.to(dtype=torch.float64) if isinstance(w, arch.Product) else w for name, w in matrices.items()
        }
        for expert in roles.experts:
            matrices |= {f"{role}.{expert.name}": getattr(expert, role)() for role in ("up", "gate", "down")}
        yield matrices


def as_float64(w: torch.Tensor) -> torch.Tensor:
    return w.detach().to(device="cpu", dtype=torch.float64)
