"""The NSDS scorer, top to bottom (docs/METHOD.md §1-§4).

For every decoder layer: split it into its five operational roles (arch.py), measure each role's
Numerical Vulnerability (kurtosis) and Structural Expressiveness (role-reweighted spectral capacity),
then over all layers: MAD-Sigmoid each role's raw values, Soft-OR them over roles per aspect, and Soft-OR
the two aspects into one score per layer. Weights stream from the source one layer at a time; W_U is
read once, a block of rows at a time, for the readout subspace the writers' Writing Density needs.
Nothing here knows tensor names (arch.py does) or threads (streaming.py does).
"""

import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from functools import partial

import numpy as np
import torch

from nsds import __version__, arch
from nsds.aggregate import SoftOrForm, mad_sigmoid, soft_or
from nsds.compute import Compute
from nsds.errors import NsdsError
from nsds.metrics.moments import kurtosis, product_kurtosis
from nsds.metrics.spectra import (
    capacity,
    circuit_specificity,
    energy_rank,
    gram_block_rows,
    gram_of_blocks,
    input_specificity,
    product_triplets,
    readout_complement,
    triplets,
    writing_density,
)
from nsds.scorers.streaming import TimedReader, Workers, measure_layers
from nsds.scorers.subject import Subject
from nsds.scores import ExpertScore, LayerScore, RoleScore, ScoreReport, ranking
from nsds.weights.base import WeightSource

ROLES = ("qk", "ov", "up", "gate", "down")


@dataclass(frozen=True)
class NsdsParams:
    """The method's constants; the defaults are the paper's (docs/METHOD.md §4)."""

    mad_constant: float = 1.4826
    temperature: float = 1.0
    energy: float = 0.99
    soft_or: SoftOrForm = "geometric"
    eps: float = 1e-12

    def __post_init__(self) -> None:
        if not 0 < self.energy <= 1:  # also false for NaN
            raise NsdsError(f"energy threshold must be in (0, 1], got {self.energy}")
        for name in ("temperature", "mad_constant"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise NsdsError(f"{name.replace('_', ' ')} must be a positive finite number, got {value}")
        if self.soft_or not in ("geometric", "product"):
            raise NsdsError(f"unknown Soft-OR form '{self.soft_or}' (use geometric or product)")


@dataclass
class RawRole:
    nv: float
    se: float
    kept: float
    params: int = 0  # weights measured (set for experts, whose means are weighted by it)
    experts: dict[str, "RawRole"] | None = None  # a MoE layer's role: each expert's own measurement


def _matrix_role(w: torch.Tensor, side: str, weights, energy: float, compute: Compute) -> RawRole:
    """An up/gate/down role: kurtosis of its entries (§2), role-weighted capacity of its spectrum (§3, §8.3)."""
    w = w.to(device=compute.device, dtype=compute.dtype)
    sigma, vectors = triplets(w, side)
    kept = energy_rank(sigma, energy)
    se = capacity(sigma, weights(vectors), kept)
    return RawRole(nv=float(kurtosis(w)), se=float(se), kept=float(kept))


def _circuit_role(
    a: torch.Tensor, b: torch.Tensor, group: torch.Tensor, weights, energy: float, right: bool
) -> RawRole:
    """A QK or OV circuit role, per head (§1): NV from power sums of the low-rank product (§2, §8.2), SE from
    the thin-QR core SVD (§3, §8.1); `weights` takes (U, V) when `right`, else U alone (writers: V is never
    formed)."""
    sigma, left, right_vectors = product_triplets(a, b, group, right=right)
    kept = energy_rank(sigma, energy)
    se = capacity(sigma, weights(left, right_vectors) if right else weights(left), kept)
    nv = product_kurtosis(a, b[group])
    return RawRole(nv=float(nv.mean()), se=float(se.mean()), kept=float(kept.double().mean()))


def _heads(roles: arch.LayerRoles, geo: arch.Geometry, compute: Compute, left: str, right: str):
    """Per-head factors (H, d, dh) of `left` and per-group factors (G, dh, d) of `right`, plus g(h).

    left/right: q/k (the QK circuit), o/v (OV), or q_rope/k_rope (MLA's rotary circuit: one key for all
    heads). MLA's q/k/v are Products of their latent factors, formed here on the compute device."""
    heads, kv_heads, d = geo.num_heads, geo.num_kv_heads, geo.hidden_size
    dh = {"q": geo.head_dim, "o": geo.value_dim, "q_rope": geo.rope_head_dim}[left]
    if left == "q_rope":
        kv_heads = 1
    group = torch.tensor([geo.kv_group(h) if kv_heads > 1 else 0 for h in range(heads)], device=compute.device)
    on_device = {name: getattr(roles, name).to(device=compute.device, dtype=compute.dtype) for name in (left, right)}
    if left == "o":
        a = on_device["o"].reshape(d, heads, dh).permute(1, 0, 2)  # W_O^h
    else:
        a = on_device[left].reshape(heads, dh, d).transpose(1, 2)  # W_Q^h^T
    return a, on_device[right].reshape(kv_heads, dh, d), group


def _experts_role(experts: list[arch.Expert], role: str, side: str, weights, energy: float,
                  compute: Compute) -> RawRole:  # fmt: skip
    """One role (up, gate or down) of a MoE layer: each expert measured as a matrix of its own (read only
    now, so one expert at a time is in memory), then their parameter-weighted mean (docs/METHOD.md §10)."""
    parts = {}
    for expert in experts:
        w = getattr(expert, role)()
        part = _matrix_role(w, side, weights, energy, compute)
        parts[expert.name] = RawRole(part.nv, part.se, part.kept, params=w.numel())
        del w
    total = sum(p.params for p in parts.values())

    def mean(aspect: str) -> float:
        return sum(getattr(p, aspect) * p.params for p in parts.values()) / total

    return RawRole(nv=mean("nv"), se=mean("se"), kept=mean("kept"), params=total, experts=parts)


def _mlp_role(roles: arch.LayerRoles, role: str, side: str, weights, energy: float, compute: Compute) -> RawRole:
    """A dense layer's up/gate/down, or the experts' mean in a MoE layer."""
    if roles.experts:
        return _experts_role(roles.experts, role, side, weights, energy, compute)
    return _matrix_role(getattr(roles, role), side, weights, energy, compute)


def measure_detectors(
    roles: arch.LayerRoles, geo: arch.Geometry, energy: float, compute: Compute
) -> dict[str, RawRole]:
    """Raw NV and SE of the roles that read the residual stream: QK circuits (mean over heads; MLA's rotary
    circuit as qk_rope), up, gate."""
    raw = {"qk": _circuit_role(*_heads(roles, geo, compute, "q", "k"), circuit_specificity, energy, right=True)}
    if roles.q_rope is not None:
        rope = _heads(roles, geo, compute, "q_rope", "k_rope")
        raw["qk_rope"] = _circuit_role(*rope, circuit_specificity, energy, right=True)
    raw["up"] = _mlp_role(roles, "up", "right", input_specificity, energy, compute)
    if roles.gate is not None or roles.experts:
        raw["gate"] = _mlp_role(roles, "gate", "right", input_specificity, energy, compute)
    return raw


def measure_writers(
    roles: arch.LayerRoles, geo: arch.Geometry, complement: torch.Tensor, energy: float, compute: Compute
) -> dict[str, RawRole]:
    """Raw NV and SE of the roles that write to the residual stream: OV circuits and down.

    Their Writing Density needs the readout complement Q from W_U (see readout_complement)."""

    def density(left: torch.Tensor) -> torch.Tensor:
        return writing_density(left, complement)

    return {
        "ov": _circuit_role(*_heads(roles, geo, compute, "o", "v"), density, energy, right=False),
        "down": _mlp_role(roles, "down", "left", density, energy, compute),
    }


def measure_layer(
    roles: arch.LayerRoles, geo: arch.Geometry, complement: torch.Tensor, energy: float, compute: Compute
) -> dict[str, RawRole]:
    """Raw NV and SE of every role of one layer."""
    return measure_detectors(roles, geo, energy, compute) | measure_writers(roles, geo, complement, energy, compute)


def _readout(
    unembedding: Iterable[torch.Tensor], width: int, energy: float, compute: Compute
) -> tuple[torch.Tensor, int] | None:
    """The readout complement and k_U of W_U, given as blocks of rows, or None if W_U holds NaN/Inf (its
    Gram diagonal sums every squared entry, so checking it costs nothing)."""
    gram = gram_of_blocks(unembedding, width, compute.dtype, compute.device)
    if not bool(torch.isfinite(gram.diagonal()).all()):
        return None
    return readout_complement(gram, energy)


def aggregate(raw: list[dict[str, RawRole]], params: NsdsParams) -> list[LayerScore]:
    """MAD-Sigmoid each role's NV and SE over layers, Soft-OR over roles, then Soft-OR the two aspects (§4).

    The roles are whatever `raw` holds (the five NSDS roles, or plain matrices for the ablation that
    collapses roles), listed in NSDS order first.

    A role absent from the architecture, or all zero over layers for an aspect, is left out of that
    aspect's Soft-OR; an aspect with no informative role is neutral (0.5).
    """
    present = sorted(raw[0], key=lambda r: ROLES.index(r) if r in ROLES else len(ROLES))
    layers = len(raw)
    probs: dict[str, dict[str, np.ndarray | None]] = {"nv": {}, "se": {}}
    for aspect in probs:
        for role in present:
            r = np.array([getattr(raw[i][role], aspect) for i in range(layers)])
            informative = bool(np.any(r != 0))
            probs[aspect][role] = (
                mad_sigmoid(r, params.mad_constant, params.temperature, params.eps) if informative else None
            )
    fused = {}
    for aspect, per_role in probs.items():
        used = [p for p in per_role.values() if p is not None]
        fused[aspect] = soft_or(np.stack(used), params.soft_or, params.eps) if used else np.full(layers, 0.5)
    final = soft_or(np.stack([fused["nv"], fused["se"]]), params.soft_or, eps=0.0)

    def prob(aspect: str, role: str, i: int) -> float | None:
        p = probs[aspect][role]
        return None if p is None else float(p[i])

    return [
        LayerScore(
            index=i,
            roles={
                role: RoleScore(
                    nv_raw=raw[i][role].nv,
                    se_raw=raw[i][role].se,
                    nv_p=prob("nv", role, i),
                    se_p=prob("se", role, i),
                    kept=raw[i][role].kept,
                    experts=_expert_scores(raw[i][role]),
                )
                for role in present
            },
            nv=float(fused["nv"][i]),
            se=float(fused["se"][i]),
            score=float(final[i]),
        )
        for i in range(layers)
    ]


def _expert_scores(raw: RawRole) -> dict[str, ExpertScore] | None:
    if raw.experts is None:
        return None
    return {name: ExpertScore(e.nv, e.se, e.kept, e.params) for name, e in raw.experts.items()}


def _finite(raw: dict[str, RawRole]) -> bool:
    return all(math.isfinite(value) for role in raw.values() for value in (role.nv, role.se))


@dataclass(frozen=True)
class Layout:
    """Which tensors scoring reads: the family, geometry, decoder body and W_U's names (then OPT's
    project_out when it has one). Built from a source's config and names, and picklable, so a Ray task
    builds the same one from the source it opens itself."""

    family: arch.Family
    geo: arch.Geometry
    body: str
    unembedding: list[str]

    @classmethod
    def of(cls, source: WeightSource) -> "Layout":
        family, geo, names = arch.family_of(source.config.model_type), arch.geometry(source.config), source.names()
        body = arch.find_body(family, names)
        projection = arch.unembedding_projection_name(family, body, names)
        unembedding = [arch.unembedding_name(family, geo, body, names)] + ([projection] if projection else [])
        return cls(family, geo, body, unembedding)

    def layer_names(self, read: TimedReader, i: int) -> list[str]:
        """Layer i's tensors to search for NaN/Inf: its role tensors, then (MoE) everything else it holds."""
        prefix = f"{self.body}{self.family.layers}.{i}."
        roles = [prefix + rel for rel in self.family.layer_tensors() if prefix + rel in read.names]
        others = (
            []
            if self.family.experts is None
            else sorted(n for n in read.names if n.startswith(prefix) and n not in roles)
        )
        return roles + others

    def roles(self, read: TimedReader, i: int) -> arch.LayerRoles:
        """Layer i's roles, its tensors (and MoE experts, one at a time) read through `read`."""
        view = arch.LayerView(f"{self.body}{self.family.layers}.{i}.", read.names, read, read.shape, read.part)
        return arch.layer_roles(self.family, self.geo, view)


def score(source: WeightSource, params: NsdsParams | None = None, compute: Compute | None = None) -> ScoreReport:
    """Score every decoder layer of the model behind `source` (docs/METHOD.md §1-§4).

    W_U's readout basis is computed once, alongside the first layers' detector roles; each layer's
    writer roles need it. The scheduling is streaming.measure_layers (or, on a cluster, nsds.cluster);
    the method is the three measure_* functions and `aggregate`.
    """
    params = params or NsdsParams()
    compute = compute or Compute()
    start = time.perf_counter()
    layout = Layout.of(source)
    geo, read = layout.geo, TimedReader(source)
    d = geo.hidden_size
    layer_bytes = (3 * 4 * d * d + 4 * d * d) * torch.finfo(compute.dtype).bits // 8  # 4d MLP, q/k/v/o
    raw, readout = measure_layers(
        geo.num_layers,
        read=partial(layout.roles, read),
        first=lambda roles: measure_detectors(roles, geo, params.energy, compute),
        shared=partial(_readout, _unembedding(read, layout.unembedding, geo, compute), d, params.energy, compute),
        accept=partial(check_readout, read, layout),
        second=lambda roles, readout: measure_writers(roles, geo, readout[0], params.energy, compute),
        merge=lambda i, parts: checked_layer(read, layout, i, [part.result for part in parts]),
        workers=Workers.for_layers(layer_bytes, compute),
    )
    return score_report(source, geo, params, compute, raw, readout[1], read.seconds, start)


def measure_readout(read: TimedReader, layout: Layout, energy: float, compute: Compute) -> tuple[torch.Tensor, int]:
    """W_U's readout complement and k_U, read and checked in one go (what a Ray task does)."""
    blocks = _unembedding(read, layout.unembedding, layout.geo, compute)
    found = _readout(blocks, layout.geo.hidden_size, energy, compute)
    check_readout(read, layout, found)
    return found


def check_readout(read: TimedReader, layout: Layout, readout: tuple[torch.Tensor, int] | None) -> None:
    """Name the W_U tensor holding NaN/Inf when the readout came out non-finite."""
    if readout is None:
        _reject_non_finite(read, layout.unembedding)
        raise NsdsError("the unembedding gave a non-finite Gram matrix (values too large?)")


def checked_layer(
    read: TimedReader, layout: Layout, i: int, parts: list[Callable[[], dict[str, RawRole]]]
) -> dict[str, RawRole]:
    """Layer i's raw metrics, merged from its parts (each computed or awaited when called); a non-finite
    result is traced back to the tensor holding NaN/Inf."""
    try:
        raw = {role: metrics for part in parts for role, metrics in part().items()}
    except torch.linalg.LinAlgError:  # eigh/svd do not converge on NaN input
        _reject_non_finite(read, layout.layer_names(read, i))
        raise
    if not _finite(raw):
        _reject_non_finite(read, layout.layer_names(read, i))
        raise NsdsError(f"layer {i} gave non-finite metrics from finite weights (values too large?)")
    return raw


def score_report(
    source: WeightSource,
    geo: arch.Geometry,
    params: NsdsParams,
    compute: Compute,
    raw: list[dict[str, RawRole]],
    unembedding_rank: int,
    read_s: float,
    start: float,
) -> ScoreReport:
    """The score report of every layer's raw metrics, aggregated (`start`: perf_counter when scoring began)."""
    layers = aggregate(raw, params)
    return ScoreReport(
        scorer="nsds",
        model=source.provenance(),
        geometry=geo,
        parameters=asdict(params),
        compute={
            "device": compute.device,
            "dtype": str(compute.dtype).removeprefix("torch."),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
        roles=list(layers[0].roles),
        layers=layers,
        ranking=ranking([layer.score for layer in layers]),
        nsds_version=__version__,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        timing={"read_s": read_s, "total_s": time.perf_counter() - start},
        unembedding_rank=unembedding_rank,
    )


def _unembedding(read: TimedReader, names: list[str], geo: arch.Geometry, compute: Compute) -> Iterator[torch.Tensor]:
    """W_U (d columns) in blocks of gram_block_rows rows: the output head or tied embedding, through OPT's
    project_out when it has one. Its width is checked now; the blocks are read as they are consumed, so
    W_U is never whole in memory (the blocks are those gram_of_columns takes: the same Gram, bit for bit)."""
    width = read.shape(names[-1])[-1]
    if width != geo.hidden_size:
        raise NsdsError(f"unembedding has width {width}, expected hidden size {geo.hidden_size}")
    rows = gram_block_rows(width, compute.dtype)

    def blocks() -> Iterator[torch.Tensor]:
        projection = read(names[1]).to(compute.dtype) if len(names) > 1 else None
        for block in read.row_blocks(names[0], rows):
            yield block if projection is None else block.to(compute.dtype) @ projection

    return blocks()


def _reject_non_finite(read: TimedReader, names: list[str]) -> None:
    """Name the tensor holding NaN/Inf. Called only once a result came out non-finite: a NaN or Inf
    weight always poisons the power sums, so checking results instead of inputs costs nothing."""
    for name in names:
        if not bool(torch.isfinite(read(name)).all()):
            raise NsdsError(f"tensor '{name}' holds NaN or Inf values: the checkpoint is corrupt")


def report_of(subject: Subject) -> ScoreReport:
    """The NSDS report of a Subject, computed once and shared with the ablations."""
    if "nsds" not in subject.memo:
        subject.memo["nsds"] = score(subject.source, compute=subject.compute)
    return subject.memo["nsds"]


def layer_scores(subject: Subject) -> np.ndarray:
    """NSDS behind the common scorer interface (paper defaults, float64)."""
    return np.array(report_of(subject).scores)


def raw_roles(report: ScoreReport) -> list[dict[str, RawRole]]:
    """The raw per-role measurements a report holds, ready to be aggregated again with other parameters."""
    return [{role: _raw(r) for role, r in layer.roles.items()} for layer in report.layers]


def _raw(role: RoleScore) -> RawRole:
    experts = None
    if role.experts is not None:
        experts = {name: RawRole(e.nv_raw, e.se_raw, e.kept, e.params) for name, e in role.experts.items()}
    params = sum(e.params for e in experts.values()) if experts else 0
    return RawRole(nv=role.nv_raw, se=role.se_raw, kept=role.kept, params=params, experts=experts)
