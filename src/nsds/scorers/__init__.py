"""Layer scorers behind one interface: a Subject in, one sensitivity per decoder layer out.

Higher means "give this layer more bits". Every allocator consumes these numbers the same way, so a
scorer is compared with NSDS on equal terms. Weight-only scorers read the Subject's source one layer at
a time; LieQ also runs the loaded model on one fixed sentence; MSE quantizes with the Subject's quantizer.
"""

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from nsds import arch
from nsds.errors import NsdsError
from nsds.weights.base import WeightSource

MATRICES = ("q", "k", "v", "o", "up", "gate", "down")


@dataclass
class Subject:
    """What a scorer may look at. `model`/`tokenizer` are needed by LieQ only; `quantizer`, `low_width`
    and `group_size` by MSE only. `memo` lets scorers that share work (NSDS and its ablations) reuse it."""

    source: WeightSource
    model: torch.nn.Module | None = None
    tokenizer: Any = None
    quantizer: Any = None  # nsds.quantize.Quantizer
    low_width: int = 2
    group_size: int = 128
    device: str = "auto"  # where NSDS's metrics run
    memo: dict[str, Any] = field(default_factory=dict)


def layer_matrices(source: WeightSource) -> Iterator[dict[str, torch.Tensor]]:
    """Each decoder layer's linear weights by role (q, k, v, o, up, gate, down; nn.Linear layout),
    fused tensors split, read one layer at a time. `gate` is absent for MLPs without one."""
    family = arch.family_of(source.config.model_type)
    geo = arch.geometry(source.config)
    body = arch.find_body(family, source.names())
    for i in range(geo.num_layers):
        prefix = f"{body}{family.layers}.{i}."
        roles = arch.layer_roles(family, geo, lambda rel, prefix=prefix: source.tensor(prefix + rel))
        yield {name: getattr(roles, name) for name in MATRICES if getattr(roles, name) is not None}


Scorer = Callable[[Subject], np.ndarray]


def scorers() -> dict[str, Scorer]:
    """Every scorer by name: NSDS, its ablations, and the baselines from the literature."""
    from nsds.scorers import ablations, ewq, kurtboost, lieq, mse, zd
    from nsds.scorers.nsds import layer_scores

    return {
        "nsds": layer_scores,
        "zd": zd.score,
        "mse": mse.score,
        "ewq": ewq.score,
        "kurtboost": kurtboost.score,
        "lieq": lieq.score,
        **ablations.ABLATIONS,
    }


def get_scorers(names: list[str]) -> dict[str, Scorer]:
    """Scorers by name; 'all' expands to every one, 'baselines' to the literature's, 'ablations' to NSDS's."""
    from nsds.scorers.ablations import ABLATIONS

    known = scorers()
    groups = {
        "all": list(known),
        "baselines": ["zd", "mse", "ewq", "kurtboost", "lieq"],
        "ablations": list(ABLATIONS),
    }
    chosen: list[str] = []
    for name in names:
        for one in groups.get(name, [name]):
            if one not in known:
                raise NsdsError(f"unknown scorer '{one}'; choose from {', '.join(known)}, all, baselines, ablations")
            if one not in chosen:
                chosen.append(one)
    return {name: known[name] for name in chosen}


def as_float64(w: torch.Tensor) -> torch.Tensor:
    return w.detach().to(device="cpu", dtype=torch.float64)
