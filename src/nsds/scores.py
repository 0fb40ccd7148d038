"""The score report: every intermediate of a scorer's run, as versioned JSON (schema in the README)."""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nsds.documents import build, plain
from nsds.errors import NsdsError
from nsds.files import read_document, write_json
from nsds.geometry import Geometry

SCHEMA = "nsds.scores/1"


@dataclass
class ExpertScore:
    """One expert's raw measurement of one role; a MoE layer's role value is their parameter-weighted mean."""

    nv_raw: float
    se_raw: float
    kept: float
    params: int  # the expert's weights in this role's matrix


@dataclass
class RoleScore:
    """One role of one layer: raw aspect values, their MAD-Sigmoid values, and the kept triplet count."""

    nv_raw: float
    se_raw: float
    nv_p: float | None  # None where the role is left out of that aspect (absent or all zero)
    se_p: float | None
    kept: float  # triplets kept by the energy rule (mean over heads for circuits)
    experts: dict[str, ExpertScore] | None = None  # MoE layers' up/gate/down: by expert ("0", ..., "shared")


@dataclass
class LayerScore:
    index: int
    roles: dict[str, RoleScore]
    nv: float  # P_NV: Soft-OR over roles of the NV probabilities
    se: float  # P_SE
    score: float  # S = Soft-OR(P_NV, P_SE)


@dataclass
class ScoreReport:
    """A model's per-layer sensitivity scores with provenance; `ranking` lists layers most sensitive first."""

    scorer: str
    model: dict[str, Any]
    geometry: Geometry
    parameters: dict[str, Any]
    compute: dict[str, Any]
    roles: list[str]
    layers: list[LayerScore]
    ranking: list[int]
    nsds_version: str
    created: str
    timing: dict[str, float]  # seconds: read (I/O + dequantize, overlapped with compute) and total
    unembedding_rank: int | None = None
    schema: str = SCHEMA

    def __post_init__(self) -> None:
        if not self.layers or [layer.index for layer in self.layers] != list(range(len(self.layers))):
            raise NsdsError("a score report holds layers 0, 1, ... in order")
        if sorted(self.ranking) != list(range(len(self.layers))):
            raise NsdsError("a score report's ranking must list every layer once")

    @property
    def scores(self) -> list[float]:
        return [layer.score for layer in self.layers]

    def to_dict(self) -> dict[str, Any]:
        data = {"schema": self.schema} | {k: v for k, v in plain(self).items() if k != "schema"}
        for layer in data["layers"]:  # dense roles have no expert breakdown: leave the key out, not null
            for role in layer["roles"].values():
                if role["experts"] is None:
                    del role["experts"]
        return data

    def save(self, path: Path) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ScoreReport":
        return build(cls, data)

    @classmethod
    def load(cls, path: Path) -> "ScoreReport":
        return read_document(path, SCHEMA, "score", cls.from_dict)


def ranking(scores: list[float]) -> list[int]:
    """Layer indices by score, most sensitive first; ties keep layer order (stable)."""
    return sorted(range(len(scores)), key=lambda i: -scores[i])
