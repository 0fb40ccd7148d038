"""The NSDS scorer (NSDS.md sections 1-4): roles -> NV and SE per role -> MAD-Sigmoid -> Soft-OR.

Weights stream from the source one layer at a time; the unembedding is read once, for the readout
basis P of the writers' Writing Density. Nothing here knows tensor names: arch.py does.
"""

import math
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone

import numpy as np
import torch

from nsds import __version__, arch
from nsds.aggregate import SoftOrForm, mad_sigmoid, soft_or
from nsds.errors import NsdsError
from nsds.metrics.moments import kurtosis, product_kurtosis
from nsds.metrics.spectra import (
    capacity,
    circuit_specificity,
    energy_rank,
    gram_of_columns,
    input_specificity,
    product_triplets,
    readout_complement,
    triplets,
    writing_density,
)
from nsds.progress import progress
from nsds.scores import LayerScore, RoleScore, ScoreReport, ranking
from nsds.weights.base import WeightSource

ROLES = ("qk", "ov", "up", "gate", "down")


@dataclass(frozen=True)
class NsdsParams:
    """The method's constants; the defaults are the paper's (NSDS.md)."""

    mad_constant: float = 1.4826
    temperature: float = 1.0
    energy: float = 0.99
    soft_or: SoftOrForm = "geometric"
    eps: float = 1e-12

    def __post_init__(self) -> None:
        if not 0 < self.energy <= 1:
            raise NsdsError(f"energy threshold must be in (0, 1], got {self.energy}")
        if self.temperature <= 0 or self.mad_constant <= 0:
            raise NsdsError("temperature and MAD constant must be positive")
        if self.soft_or not in ("geometric", "product"):
            raise NsdsError(f"unknown Soft-OR form '{self.soft_or}' (use geometric or product)")


@dataclass(frozen=True)
class Compute:
    """Where and in what precision the metrics run (float64 is exact to ~1e-12; float32 is for GPUs)."""

    device: str = "cpu"
    dtype: torch.dtype = torch.float64

    @classmethod
    def choose(cls, device: str = "auto", precision: str = "float64") -> "Compute":
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise NsdsError("--device cuda was asked for but torch sees no CUDA GPU; use --device cpu")
        dtypes = {"float64": torch.float64, "float32": torch.float32}
        if precision not in dtypes:
            raise NsdsError(f"unknown precision '{precision}' (use float64 or float32)")
        return cls(device=device, dtype=dtypes[precision])


@dataclass
class RawRole:
    nv: float
    se: float
    kept: float


def _matrix_role(w: torch.Tensor, side: str, weights, energy: float) -> RawRole:
    sigma, vectors = triplets(w, side)
    kept = energy_rank(sigma, energy)
    se = capacity(sigma, weights(vectors), kept)
    return RawRole(nv=float(kurtosis(w)), se=float(se), kept=float(kept))


def _circuit_role(a: torch.Tensor, b: torch.Tensor, group: torch.Tensor, weights, energy: float) -> RawRole:
    sigma, left, right = product_triplets(a, b, group)
    kept = energy_rank(sigma, energy)
    se = capacity(sigma, weights(left, right), kept)
    nv = product_kurtosis(a, b[group])
    return RawRole(nv=float(nv.mean()), se=float(se.mean()), kept=float(kept.double().mean()))


def measure_layer(
    roles: arch.LayerRoles, geo: arch.Geometry, complement: torch.Tensor, energy: float, compute: Compute
) -> dict[str, RawRole]:
    """Raw NV and SE of each role of one layer (circuits: mean over query heads)."""
    heads, kv_heads, dh, d = geo.num_heads, geo.num_kv_heads, geo.head_dim, geo.hidden_size
    group = torch.tensor([geo.kv_group(h) for h in range(heads)], device=compute.device)

    def on_device(t: torch.Tensor) -> torch.Tensor:
        return t.to(device=compute.device, dtype=compute.dtype)

    q = on_device(roles.q).reshape(heads, dh, d)
    k = on_device(roles.k).reshape(kv_heads, dh, d)
    v = on_device(roles.v).reshape(kv_heads, dh, d)
    o = on_device(roles.o).reshape(d, heads, dh).permute(1, 0, 2)

    def density(left: torch.Tensor, right: torch.Tensor | None = None) -> torch.Tensor:
        return writing_density(left, complement)

    def matrix(w: torch.Tensor, side: str, weights) -> RawRole:
        return _matrix_role(on_device(w), side, weights, energy)

    raw = {
        "qk": _circuit_role(q.transpose(1, 2), k, group, circuit_specificity, energy),  # W_Q^h^T W_K^g(h)
        "ov": _circuit_role(o, v, group, density, energy),  # W_O^h W_V^g(h)
        "up": matrix(roles.up, "right", input_specificity),
        "down": matrix(roles.down, "left", density),
    }
    if roles.gate is not None:
        raw["gate"] = matrix(roles.gate, "right", input_specificity)
    return raw


def aggregate(raw: list[dict[str, RawRole]], params: NsdsParams) -> list[LayerScore]:
    """MAD-Sigmoid each role's NV and SE over layers, Soft-OR over roles, then Soft-OR the two aspects.

    A role absent from the architecture, or all zero over layers for an aspect, is left out of that
    aspect's Soft-OR; an aspect with no informative role is neutral (0.5).
    """
    present = [r for r in ROLES if r in raw[0]]
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
                )
                for role in present
            },
            nv=float(fused["nv"][i]),
            se=float(fused["se"][i]),
            score=float(final[i]),
        )
        for i in range(layers)
    ]


def _cpu_workers(geo: arch.Geometry, compute: Compute, budget_bytes: int = 2 << 30) -> int:
    """Layers measured at once. On a CPU, one single-threaded layer per core beats one multi-threaded
    layer (LAPACK's eigh scales poorly across threads), as long as the layers in flight fit the budget."""
    if compute.device != "cpu":
        return 1
    d, mlp = geo.hidden_size, 4 * geo.hidden_size
    layer_bytes = (3 * mlp * d + 4 * d * d) * torch.finfo(compute.dtype).bits // 8
    return max(1, min(torch.get_num_threads(), budget_bytes // layer_bytes))


@contextmanager
def _torch_threads(count: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class _TimedReader:
    """Reads tensors from a source, timing the I/O (and GGUF dequantization) apart from the maths."""

    def __init__(self, source: WeightSource) -> None:
        self.source = source
        self.names = source.names()
        self.seconds = 0.0

    def __call__(self, name: str) -> torch.Tensor:
        if name not in self.names:
            raise NsdsError(f"the weights hold no tensor '{name}': the checkpoint is incomplete")
        start = time.perf_counter()
        tensor = self.source.tensor(name)
        if not tensor.is_floating_point():
            raise NsdsError(f"tensor '{name}' has dtype {tensor.dtype}; nsds scores floating-point weights")
        self.seconds += time.perf_counter() - start
        return tensor


def _reject_non_finite(read: _TimedReader, names: list[str]) -> None:
    """Name the tensor holding NaN/Inf. Called only once a result came out non-finite: a NaN or Inf
    weight always poisons the power sums, so checking results instead of inputs costs nothing."""
    for name in names:
        if not bool(torch.isfinite(read(name)).all()):
            raise NsdsError(f"tensor '{name}' holds NaN or Inf values: the checkpoint is corrupt")


def _finite(raw: dict[str, RawRole]) -> bool:
    return all(math.isfinite(value) for role in raw.values() for value in (role.nv, role.se))


def score(source: WeightSource, params: NsdsParams | None = None, compute: Compute | None = None) -> ScoreReport:
    """Score every decoder layer of the model behind `source`."""
    params = params or NsdsParams()
    compute = compute or Compute()
    start = time.perf_counter()
    family = arch.family_of(source.config.model_type)
    geo = arch.geometry(source.config)
    names = source.names()
    body = arch.find_body(family, names)
    read = _TimedReader(source)

    unembedding_names = [arch.unembedding_name(family, geo, body, names)]
    unembedding = read(unembedding_names[0])
    projection = arch.unembedding_projection_name(family, body, names)
    if projection is not None:
        unembedding_names.append(projection)
        unembedding = unembedding.to(compute.dtype) @ read(projection).to(compute.dtype)
    if unembedding.shape[-1] != geo.hidden_size:
        raise NsdsError(f"unembedding has width {unembedding.shape[-1]}, expected hidden size {geo.hidden_size}")
    gram = gram_of_columns(unembedding.to(compute.device), compute.dtype)
    del unembedding
    if not bool(torch.isfinite(gram.diagonal()).all()):  # the diagonal sums every squared entry
        _reject_non_finite(read, unembedding_names)
    readout, unembedding_rank = readout_complement(gram, params.energy)

    def layer_names(i: int) -> list[str]:
        return [f"{body}{family.layers}.{i}.{rel}" for rel in family.layer_tensors()]

    def layer(i: int) -> arch.LayerRoles:
        prefix = f"{body}{family.layers}.{i}."
        return arch.layer_roles(family, geo, lambda rel: read(prefix + rel))

    def finished(i: int, future: Future) -> dict[str, RawRole]:
        try:
            raw = future.result()
        except torch.linalg.LinAlgError:  # eigh/svd do not converge on NaN input
            _reject_non_finite(read, layer_names(i))
            raise
        if not _finite(raw):
            _reject_non_finite(read, layer_names(i))
            raise NsdsError(f"layer {i} gave non-finite metrics from finite weights (values too large?)")
        return raw

    workers = _cpu_workers(geo, compute)
    with _torch_threads(1 if workers > 1 else torch.get_num_threads()), ThreadPoolExecutor(workers) as pool:
        # The main thread reads layer i+1 while the workers measure earlier layers.
        pending: deque[tuple[int, Future]] = deque()
        raw = []
        for i in progress(range(geo.num_layers), desc="scoring layers", unit="layer"):
            pending.append((i, pool.submit(measure_layer, layer(i), geo, readout, params.energy, compute)))
            if len(pending) > workers:
                raw.append(finished(*pending.popleft()))
        raw.extend(finished(*item) for item in pending)
    layers = aggregate(raw, params)
    total = time.perf_counter() - start
    return ScoreReport(
        scorer="nsds",
        model=source.provenance(),
        geometry={"family": family.name} | asdict(geo),
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
        timing={"read_s": read.seconds, "total_s": total},
        unembedding_rank=unembedding_rank,
    )
