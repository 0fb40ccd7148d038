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

from nsds import __version__, arch
from nsds.documents import build, plain
from nsds.errors import NsdsError, first_line
from nsds.files import keyed_cache_path, read_document, write_cache, write_json
from nsds.fisher import layerwise_fisher
from nsds.layerwise import LayerwiseModel
from nsds.plan import Module, Width
from nsds.progress import note, stage
from nsds.quantize.bank import WeightBank
from nsds.quantize.base import Quantizer

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
    widths: tuple[Width, ...]
    modules: dict[str, ModuleError]
    schema: str = SCHEMA

    def __post_init__(self) -> None:
        for name, e in self.modules.items():
            lengths = {len(e.relative), len(e.gained), len(e.fisher)} | ({len(e.importance)} if e.importance else set())
            if lengths != {len(self.widths)}:
                raise NsdsError(f"module '{name}' has errors at {len(e.relative)} widths, the table {len(self.widths)}")

    def of(self, name: str, width: float, measure: str) -> float:
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
    widths: Sequence[float],
    gains: Mapping[str, torch.Tensor],
    fisher: Mapping[str, torch.Tensor],
) -> dict[str, ModuleError]:
    """Every module's errors at `widths` (sorted) with the bank's quantizer (each module quantized once per
    width), with the norm gains (arch.input_gains) and the diagonal Fisher information (nsds.fisher) of every
    module, and the importance the bank rounds by, if any."""
    table: dict[str, ModuleError] = {}
    for m in modules:
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
    return table


def layerwise_errors(
    lm: LayerwiseModel,
    modules: Sequence[Module],
    quantizer: Quantizer,
    widths: Sequence[float],
    importance: Mapping[str, torch.Tensor],
    tokens: torch.Tensor,
    folder: Path,
) -> ErrorTable:
    """The error table of `quantizer` (rounding by `importance`, module name -> one weight per input column,
    where given) over `modules` at `widths`, one decoder layer at a time: each layer's modules are measured
    while the layer-by-layer Fisher pass on the self-text `tokens` holds that layer (nsds.fisher)."""
    widths = tuple(sorted(set(widths)))
    found: dict[str, ModuleError] = {}

    def each_layer(i: int, fisher: dict[str, torch.Tensor]) -> None:
        own = [m for m in modules if m.name in fisher]
        if own:
            weights = {m.name: importance[m.name] for m in own if m.name in importance}
            bank = WeightBank(lm.model, [m.name for m in own], quantizer, keep=False, importance=weights)
            found.update(measure_errors(bank, own, widths, arch.input_gains(lm.model, own), fisher))

    layerwise_fisher(lm, modules, tokens, folder, each_layer)
    return ErrorTable(quantizer.name, widths, {m.name: found[m.name] for m in modules})


def cached_errors(
    lm: LayerwiseModel,
    modules: Sequence[Module],
    quantizer: Quantizer,
    widths: Sequence[float],
    weights: list[str] | str,
    sample: tuple[dict[str, object], Callable[[], torch.Tensor]],
    folder: Path,
    importance: tuple[Mapping[str, torch.Tensor], str] | None = None,
) -> ErrorTable:
    """layerwise_errors, kept in the nsds cache: the table depends on the weights alone (no text), so a rerun
    with another budget, text or allocator reads it back instead of sampling, differentiating and quantizing
    again. The key: `weights` (weights.weights_identity of the model), the Fisher sample's settings (`sample`:
    fisher.settings and the function that samples, called only when the table is measured), the quantizer,
    the importance matrix it rounds by (`importance`: module weights and the file's SHA-256), the widths and
    the modules."""
    widths = tuple(sorted(set(widths)))
    shapes = [[m.name, m.out_features, m.in_features] for m in modules]
    settings, tokens = sample
    key = {"schema": SCHEMA, "nsds_version": __version__, "weights": weights, "fisher": settings,
           "quantizer": quantizer.describe(), "importance": None if importance is None else importance[1],
           "widths": widths, "modules": hashlib.sha256(json.dumps(shapes).encode()).hexdigest()[:20]}  # fmt: skip
    path = keyed_cache_path("errors", key)
    if path.is_file():
        try:
            stored, table = read_document(path, SCHEMA, "cached error table",
                                          lambda data: (data["key"], build(ErrorTable, data["table"])))  # fmt: skip
            if stored == json.loads(json.dumps(key)):
                stage(f"every module's error at every width ({quantizer.name}): from the nsds cache")
                return table
        except NsdsError as err:  # a damaged cache (any part of it) is only lost work
            note(f"{first_line(err)}; measuring the error table again")
    sampled = tokens()
    stage(f"measuring every module's error at every width ({quantizer.name}), one layer at a time")
    table = layerwise_errors(lm, modules, quantizer, widths, {} if importance is None else importance[0], sampled,
                             folder)  # fmt: skip
    write_cache(path, {"schema": SCHEMA, "key": key, "table": table.to_dict()}, "error cache")
    return table
