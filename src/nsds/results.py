"""What `nsds run` and `nsds compare` measured: typed results with versioned JSON, and the queries every
reader of them shares (summaries over random seeds, the best data-free allocator of a cell).

Both commands build these objects; report.py, the CLI and benchmarks/results.py only read them. Nothing
here imports torch, so rendering a saved result is cheap.
"""

import math
import statistics
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from nsds import __version__
from nsds.config import CompareConfig, RunConfig
from nsds.documents import build, plain
from nsds.evaluate.protocol import Protocol
from nsds.files import read_document, write_json
from nsds.scorers.specs import SCORERS

RUN_SCHEMA = "nsds.results/1"
COMPARE_SCHEMA = "nsds.compare/1"
REFERENCE_NOTE = "the reference is the checkpoint as loaded (for the GGUF assets: dequantized 4-bit weights)"

# What each row of a comparison is, as stored in its cells.
KIND_OF_SCORER = {"nsds": "scorer", "baseline": "scorer", "ablation": "nsds ablation"}
BASELINE_ALLOCATORS = ("uniform", "llama.cpp", "higgs", "llama.cpp preset")
KINDS = ("nsds allocator", "scorer", "baseline allocator", "random", "measured ranking", "nsds ablation")


def _protocol_fields(data: dict[str, Any]) -> dict[str, Any]:
    """A stored protocol without its description (derived from the fields)."""
    return {k: v for k, v in data.items() if k != "description"}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# --- nsds run -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RuntimeMeasure:
    """The same model as a GGUF file, measured by llama.cpp's llama-perplexity (docs/GGUF.md §4)."""

    file: str
    file_bytes: int
    ppl: float
    ppl_stderr: float
    context: int  # tokens per chunk; llama-perplexity scores the second half of each
    chunks: int
    seconds: float
    # KL divergence of the file's next-token distribution from the reference file's on the same tokens (nats
    # per token; llama-perplexity --kl-divergence): its mean and standard error, 99th percentile, and the
    # share of tokens whose most likely token is unchanged. None for the reference itself.
    kld: float | None = None
    kld_stderr: float | None = None
    kld_p99: float | None = None
    same_top: float | None = None


@dataclass(frozen=True)
class Evaluation:
    """One evaluated model: the checkpoint as loaded ("reference") or a plan (with its bits)."""

    label: str
    allocator: str | None
    ppl: float
    seconds: float
    zero_shot: dict[str, dict[str, float]] = field(default_factory=dict)
    weight_bits: float | None = None  # None for the reference
    storage_bits: float | None = None
    runtime: RuntimeMeasure | None = None  # with --quantizer gguf: the GGUF file, measured by llama.cpp
    # KL divergence of the plan's next-token distribution from the reference's on the same windows, in process
    # (nsds.evaluate.divergence): mean, its standard error, 99th percentile, same top token. None: the reference.
    kld: float | None = None
    kld_stderr: float | None = None
    kld_p99: float | None = None
    same_top: float | None = None

    def to_dict(self) -> dict[str, Any]:
        bits = {} if self.weight_bits is None else {"weight_bits": self.weight_bits, "storage_bits": self.storage_bits}
        runtime = {} if self.runtime is None else {"runtime": plain(self.runtime)}
        divergence = {} if self.kld is None else {"kld": self.kld, "kld_stderr": self.kld_stderr,
                                                  "kld_p99": self.kld_p99, "same_top": self.same_top}  # fmt: skip
        return {"label": self.label, "allocator": self.allocator, **bits, "ppl": self.ppl, **divergence,
                "zero_shot": self.zero_shot, "seconds": self.seconds, **runtime}  # fmt: skip


@dataclass(frozen=True)
class RunResult:
    model: dict[str, Any]  # provenance: id, source, files with SHA-256
    config: RunConfig  # as run: `allocator` is the one used, never "auto"
    protocol: Protocol
    evaluations: list[Evaluation]
    timing: dict[str, float]
    reference_note: str = REFERENCE_NOTE
    nsds_version: str = __version__
    created: str = field(default_factory=_now)
    schema: str = RUN_SCHEMA

    def evaluation(self, label: str) -> Evaluation:
        return next(e for e in self.evaluations if e.label == label)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": self.schema,
            "model": self.model,
            "config": self.config.to_dict(),
            "protocol": self.protocol.to_dict(),
            "reference_note": self.reference_note,
            "evaluations": [e.to_dict() for e in self.evaluations],
            "timing": self.timing,
            "nsds_version": self.nsds_version,
            "created": self.created,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunResult":
        return build(cls, data | {"protocol": _protocol_fields(data["protocol"])})

    def save(self, path: Path) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: Path) -> "RunResult":
        return read_document(path, RUN_SCHEMA, "run results", cls.from_dict)


# --- nsds compare -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Correlation:
    """Rank correlation of a scorer's layer scores with the oracle; None where undefined (a constant side)."""

    spearman: float | None
    kendall: float | None

    @classmethod
    def of(cls, spearman: float, kendall: float) -> "Correlation":
        return cls(*(None if math.isnan(x) else x for x in (spearman, kendall)))


@dataclass(frozen=True)
class Oracle:
    low_width: int
    ppl: list[float]  # per layer: PPL with that layer alone at the low width


@dataclass(frozen=True)
class QuantizerResult:
    oracle: Oracle
    scores: dict[str, list[float]]  # scorer -> layer scores
    correlations: dict[str, Correlation]


@dataclass(frozen=True)
class Cell:
    """One allocator's plan at one quantizer and budget, evaluated."""

    quantizer: str
    budget: float
    label: str
    kind: str  # one of KINDS
    seed: int | None
    allocator: str
    weight_bits: float
    storage_bits: float
    high_layers: list[int]
    plan: str  # digest of the plan's storage formats: identical plans are evaluated once
    ppl: float
    budget_name: str | None = None  # the llama.cpp preset whose size `budget` is
    runtime_ppl: float | None = None  # quantizer gguf: llama-perplexity on the plan's GGUF file

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"cell kind '{self.kind}' is not one of {list(KINDS)}")


@dataclass(frozen=True)
class SummaryRow:
    """One quantizer x budget x allocator; random seeds folded into mean, spread and range."""

    quantizer: str
    budget: float
    label: str
    kind: str
    ppl: float
    ppl_std: float | None
    ppl_min: float
    ppl_max: float
    n: int
    weight_bits: float
    storage_bits: float
    budget_name: str | None = None
    runtime_ppl: float | None = None


@dataclass(frozen=True)
class Counts:
    evaluated: int
    reused: int
    resumed: bool


@dataclass(frozen=True)
class Shape:
    model_type: str
    num_layers: int


@dataclass(frozen=True)
class CompareResult:
    model: dict[str, Any]
    geometry: Shape
    config: CompareConfig  # `scorers` expanded to the names run
    allocator: str  # the allocator of scored plans (stored inside "config" in the JSON)
    protocol: Protocol
    reference_ppl: float
    quantizers: dict[str, QuantizerResult]
    cells: list[Cell]
    counts: Counts
    timing: dict[str, float]
    reference_note: str = REFERENCE_NOTE
    nsds_version: str = __version__
    created: str = field(default_factory=_now)
    schema: str = COMPARE_SCHEMA

    @property
    def summary(self) -> list[SummaryRow]:
        return summarize(self.cells)

    def rows(self, quantizer: str, budget: float) -> dict[str, SummaryRow]:
        """The summary rows of one quantizer and budget, by allocator label (in summary order)."""
        return {r.label: r for r in self.summary if r.quantizer == quantizer and r.budget == budget}

    def best_allocators(self) -> dict[str, dict[float, list[str]]]:
        """Every data-free allocator reaching the lowest PPL, per quantizer and budget (ties all named)."""
        return {q: {b: data_free_best(self.rows(q, b))[1] for b in self.budgets(q)} for q in self.quantizers}

    def budgets(self, quantizer: str) -> list[float]:
        """The budgets of one quantizer in bits (a preset's resolved to its size), ascending."""
        return sorted({c.budget for c in self.cells if c.quantizer == quantizer})

    def budget_label(self, quantizer: str, budget: float) -> str:
        """ "3.5 bits", or the preset a budget came from ("Q4_K_M, 5.53 bits")."""
        name = next((c.budget_name for c in self.cells if c.quantizer == quantizer and c.budget == budget), None)
        return f"{budget:g} bits" if name is None else f"{name}, {budget:.3g} bits"

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": self.schema,
            "model": self.model,
            "geometry": plain(self.geometry),
            "config": self.config.to_dict() | {"allocator": self.allocator},
            "protocol": self.protocol.to_dict(),
            "reference_ppl": self.reference_ppl,
            "reference_note": self.reference_note,
            "quantizers": plain(self.quantizers),
            "cells": plain(self.cells),
            "summary": plain(self.summary),
            "counts": plain(self.counts),
            "timing": self.timing,
            "nsds_version": self.nsds_version,
            "created": self.created,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CompareResult":
        config = dict(data["config"])
        fields = {k: v for k, v in data.items() if k != "summary"}  # derived from the cells
        fields |= {"config": config, "allocator": config.pop("allocator")}
        fields["protocol"] = _protocol_fields(data["protocol"])
        return build(cls, fields)

    def save(self, path: Path) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: Path) -> "CompareResult":
        return read_document(path, COMPARE_SCHEMA, "compare results", cls.from_dict)


def summarize(cells: list[Cell]) -> list[SummaryRow]:
    """One row per quantizer x budget x allocator; the random seeds folded into mean, spread and range."""
    groups: dict[tuple[str, float, str], list[Cell]] = {}
    for cell in cells:
        label = "random" if cell.kind == "random" else cell.label
        groups.setdefault((cell.quantizer, cell.budget, label), []).append(cell)
    rows = []
    for (q, budget, label), group in groups.items():
        ppl = [c.ppl for c in group]
        rows.append(SummaryRow(
            quantizer=q,
            budget=budget,
            label=label,
            kind=group[0].kind,
            ppl=statistics.mean(ppl) if len(ppl) > 1 else ppl[0],
            ppl_std=statistics.stdev(ppl) if len(ppl) > 1 else None,
            ppl_min=min(ppl),
            ppl_max=max(ppl),
            n=len(ppl),
            weight_bits=statistics.mean(c.weight_bits for c in group),
            storage_bits=statistics.mean(c.storage_bits for c in group),
            budget_name=group[0].budget_name,
            runtime_ppl=group[0].runtime_ppl if len(group) == 1 else None,
        ))  # fmt: skip
    return rows


def data_free_best(rows: dict[str, SummaryRow]) -> tuple[float, list[str]]:
    """The lowest PPL among the data-free allocators of one cell (random by its mean; the oracle's
    measured ranking is not data-free and is left out), and every label reaching it."""
    free = {label: row for label, row in rows.items() if row.kind != "measured ranking"}
    lowest = min(row.ppl for row in free.values())
    return lowest, [label for label, row in free.items() if row.ppl == lowest]


def display_order(labels: list[str]) -> list[str]:
    """Tables' row order: NSDS, the baseline allocators, random, the baseline scorers, the oracle ranking,
    then the rest (NSDS's ablations) as they come."""
    scorers = [s.name for s in SCORERS if s.kind == "baseline"]
    main = ["error", "nsds", *BASELINE_ALLOCATORS, "random", *scorers, "oracle"]
    return [label for label in main if label in labels] + [label for label in labels if label not in main]


def is_ablation(label: str) -> bool:
    return any(s.name == label and s.kind == "ablation" for s in SCORERS)
