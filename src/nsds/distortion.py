"""Every module's quantization error at every candidate width, measured from the weights alone.

Quantize each module with the plans' own quantizer at each width and measure what it lost (docs/METHOD.md
§9). Three measures per module and width:

- relative: ||W - Q_b(W)||_F^2 / ||W||_F^2, HIGGS's relative weight error (arXiv:2411.17525);
- gained:   ||(W - Q_b(W)) diag(g)||_F^2 / ||W diag(g)||_F^2, where g is the gain of the norm the module
  reads (arch.input_gains): the relative error of the module's output for a normalised input with
  uncorrelated unit-variance channels, a data-free proxy of the output error. Equal to `relative` for
  modules fed by no norm (o, down);
- fisher:   sum_i F_ii (W - Q_b(W))_i^2, with F the diagonal Fisher information per token on text the model
  wrote itself (nsds.fisher): twice the second-order estimate of what the module's quantization costs the
  model's predictions, in nats per token;
- importance: ||(W - Q_b(W)) diag(sqrt(I))||_F^2 / ||W diag(sqrt(I))||_F^2, with I the importance matrix the
  bank rounds by (the mean of x_j^2 over the model's own text, nsds.importance): the relative error of the
  module's output on the model's own activations (their channels taken as uncorrelated). None without one.

No data is read: only the weights, the norm gains, the quantizer and the model's own samples.
"""

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nsds import __version__
from nsds.documents import build, plain
from nsds.errors import NsdsError, first_line
from nsds.files import keyed_cache_path, read_document, write_cache, write_json
from nsds.fisher import settings
from nsds.plan import Module
from nsds.progress import note, progress, stage
from nsds.quantize.bank import WeightBank

SCHEMA = "nsds.errors/3"


@dataclass(frozen=True)
class ModuleError:
    """One module's measured error at each of the table's widths (same order)."""

    relative: tuple[float, ...]
    gained: tuple[float, ...]
    fisher: tuple[float, ...]
    importance: tuple[float, ...] | None = None  # only where the bank rounds by an importance matrix


@dataclass
class ErrorTable:
    """Measured errors of every module of a model, for one quantizer at its candidate widths."""

    quantizer: str
    widths: tuple[int, ...]
    modules: dict[str, ModuleError]
    schema: str = SCHEMA

    def __post_init__(self) -> None:
        for name, e in self.modules.items():
            lengths = {len(e.relative), len(e.gained), len(e.fisher)} | ({len(e.importance)} if e.importance else set())
            if lengths != {len(self.widths)}:
                raise NsdsError(f"module '{name}' has errors at {len(e.relative)} widths, the table {len(self.widths)}")

    def of(self, name: str, width: int, measure: str) -> float:
        """Module `name`'s error at `width` by `measure` (relative, gained, fisher or importance)."""
        if name not in self.modules:
            raise NsdsError(f"the error table has no module '{name}': it was measured on another model")
        if width not in self.widths:
            raise NsdsError(f"the error table has no width {width} (it holds {list(self.widths)})")
        values = getattr(self.modules[name], measure)
        if values is None:
            raise NsdsError(f"the error table has no {measure} error: it was measured without an importance matrix")
        return values[self.widths.index(width)]

    def to_dict(self) -> dict[str, Any]:
        return plain(self)

    def save(self, path: Path) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: Path) -> "ErrorTable":
        return read_document(path, SCHEMA, "error table", lambda data: build(cls, data))


def fisher_error(weight: torch.Tensor, quantized: torch.Tensor, fisher: torch.Tensor) -> float:
    """sum_i F_ii (W - Q)_i^2 in float64."""
    difference = weight.double() - quantized.double()
    return float((fisher.double().to(difference.device) * difference.square()).sum())


def output_error(weight: torch.Tensor, quantized: torch.Tensor, gain: torch.Tensor | None = None) -> float:
    """||(W - Q) diag(g)||_F^2 / ||W diag(g)||_F^2 in float64 (g = 1 when None); 0 for an all-zero W."""
    w = weight.double()
    scale = 1.0 if gain is None else gain.double().to(w.device)
    numerator = ((w - quantized.double()) * scale).square().sum()
    denominator = (w * scale).square().sum()
    return float(numerator / denominator) if denominator > 0 else 0.0


def measure_errors(
    bank: WeightBank,
    modules: Sequence[Module],
    widths: Sequence[int],
    gains: Mapping[str, torch.Tensor],
    fisher: Mapping[str, torch.Tensor],
) -> ErrorTable:
    """The error table of the bank's quantizer over `modules` at `widths` (each module quantized once per
    width; with the bank's `keep`, those variants serve the plans' evaluations afterwards), with the norm
    gains (arch.input_gains) and the diagonal Fisher information (fisher.diagonal_fisher) of every module, and
    the importance the bank rounds by, if any."""
    widths = tuple(sorted(set(widths)))
    table: dict[str, ModuleError] = {}
    for m in progress(modules, desc=f"measuring errors ({bank.quantizer.name})", unit="module"):
        weight = bank.linear(m.name)
        scale = bank.importance[m.name].sqrt() if m.name in bank.importance else None
        relative, gained, weighted, important = [], [], [], []
        for bits in widths:
            stored = bank.quantizer.storage(m.out_features, m.in_features, bits).format
            quantized = bank.linear(m.name, stored)
            relative.append(output_error(weight, quantized))
            gained.append(output_error(weight, quantized, gains.get(m.name)))
            weighted.append(fisher_error(weight, quantized, fisher[m.name]))
            if scale is not None:
                important.append(output_error(weight, quantized, scale))
        table[m.name] = ModuleError(tuple(relative), tuple(gained), tuple(weighted),
                                    tuple(important) if scale is not None else None)  # fmt: skip
    return ErrorTable(bank.quantizer.name, widths, table)


def cached_errors(
    bank: WeightBank,
    modules: Sequence[Module],
    widths: Sequence[int],
    gains: Mapping[str, torch.Tensor],
    fisher: Callable[[], Mapping[str, torch.Tensor]],
    weights: list[str] | str,
    importance: str | None = None,
) -> ErrorTable:
    """measure_errors, kept in the nsds cache: the table depends on the weights alone (no text), so a rerun with
    another budget, text or allocator reads it back instead of sampling, differentiating and quantizing again.
    The key: `weights` (weights.weights_identity of the bank's model; `gains` are arch.input_gains of those
    weights), the Fisher settings, the quantizer, the importance matrix the bank rounds by (`importance`: its
    file's SHA-256), the widths and the modules. `fisher` (the bank's model's
    fisher.measure_fisher, while it holds the checkpoint's weights) is called only when the table is measured."""
    widths = tuple(sorted(set(widths)))
    shapes = [[m.name, m.out_features, m.in_features] for m in modules]
    key = {"schema": SCHEMA, "nsds_version": __version__, "weights": weights, "fisher": settings(bank.model),
           "quantizer": bank.quantizer.describe(), "importance": importance, "widths": widths,
           "modules": hashlib.sha256(json.dumps(shapes).encode()).hexdigest()[:20]}  # fmt: skip
    path = keyed_cache_path("errors", key)
    if path.is_file():
        try:
            stored, table = read_document(path, SCHEMA, "cached error table",
                                          lambda data: (data["key"], build(ErrorTable, data["table"])))  # fmt: skip
            if stored == json.loads(json.dumps(key)):
                stage(f"every module's error at every width ({bank.quantizer.name}): from the nsds cache")
                return table
        except NsdsError as err:  # a damaged cache (any part of it) is only lost work: measure again
            note(f"{first_line(err)}; measuring the error table again")
    fisher_of = fisher()
    stage(f"measuring every module's error at every width ({bank.quantizer.name})")
    table = measure_errors(bank, modules, widths, gains, fisher_of)
    write_cache(path, {"schema": SCHEMA, "key": key, "table": table.to_dict()}, "error cache")
    return table
