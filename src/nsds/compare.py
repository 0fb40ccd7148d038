"""`nsds compare`: every scorer, ablation and baseline allocator, measured the same way on one loaded model.

One load, one tokenized text. For each quantizer: the oracle (one evaluation per layer, cached across
runs), every scorer's layer scores and their rank correlation with the oracle, then one plan per
scorer x budget, plus uniform, llama.cpp's mixture rule, seeded random rankings and the oracle's own
ranking (the measured reference a data-free scorer aims at), all evaluated on the same token windows.
Each module is quantized once per width (WeightBank) and plans with identical widths are evaluated
once. Finished cells are saved after each evaluation in `cells.json`, so an interrupted or extended
run redoes nothing; the outputs (compare.json, compare.md, figures) are written at the end.
"""

import hashlib
import json
import statistics
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from nsds import __version__, arch
from nsds.allocate import Setting, allocate, check_setting, default_allocator, random_scores
from nsds.errors import NsdsError
from nsds.evaluate.oracle import kendall, single_layer_sensitivity, spearman
from nsds.evaluate.perplexity import perplexity
from nsds.files import read_document, write_bytes, write_json
from nsds.pipeline import allocation_setting, load_for_evaluation, uniform_setting
from nsds.plan import Module, Plan
from nsds.progress import progress
from nsds.quantize import Pristine, Quantizer, WeightBank, get_quantizer
from nsds.scorers import Subject, get_scorers
from nsds.scorers.ablations import ABLATIONS

SCHEMA = "nsds.compare/1"
CELLS_SCHEMA = "nsds.compare-cells/1"
QUANTIZER_DEPENDENT = ("mse",)  # scorers whose scores depend on the quantizer


@dataclass
class CompareConfig:
    model: str = "smollm2"
    gguf_file: str | None = None
    budgets: tuple[float, ...] = (2.5, 3.0, 3.5)
    widths: tuple[int, ...] = (2, 4)
    quantizers: tuple[str, ...] = ("rtn", "hqq")
    scorers: tuple[str, ...] = ("all",)
    seeds: int = 5
    group_size: int = 128
    symmetric: bool = False
    fuse: bool = True
    text: str = "brown"
    tokens: int = 2048
    window: int | None = None
    out: Path = Path("nsds-compare")
    device: str = "auto"


def _kind(label: str) -> str:
    if label.startswith("random-"):
        return "random"
    if label in ("uniform", "llama.cpp"):
        return "baseline allocator"
    if label == "oracle":
        return "measured ranking"
    if label in ABLATIONS:
        return "nsds ablation"
    return "scorer"


class _Cells:
    """The resumable store: finished cells and layer scores, saved atomically after every change.

    Its fingerprint (model files, settings, token windows, nsds version) must match the current run;
    otherwise the run starts afresh and overwrites it."""

    def __init__(self, path: Path, fingerprint: dict[str, Any]) -> None:
        self.path, self.fingerprint = path, fingerprint
        self.data: dict[str, Any] = {"cells": {}, "plans": {}, "scores": {}, "reference": None}
        self.resumed = False
        if path.exists():
            try:
                saved = read_document(path, CELLS_SCHEMA, "compare cells", lambda data: data)
            except NsdsError:
                saved = None
            if saved is not None and saved.get("fingerprint") == fingerprint:
                self.data = {key: saved[key] for key in self.data}
                self.resumed = True

    def save(self) -> None:
        write_json(self.path, {"schema": CELLS_SCHEMA, "fingerprint": self.fingerprint} | self.data)


def _plan_digest(quantizer: str, plan: Plan) -> str:
    widths = sorted((m.name, m.bits) for m in plan.modules)
    return hashlib.sha256(json.dumps([quantizer, widths]).encode()).hexdigest()[:20]


def _windows_digest(windows: torch.Tensor) -> str:
    return hashlib.sha256(windows.to(torch.int64).numpy().tobytes()).hexdigest()[:20]


def _plans(
    modules: list[Module],
    setting: Setting,
    quantizer: Quantizer,
    allocator: str,
    scores: dict[str, list[float]],
    oracle: list[float],
    seeds: int,
) -> list[tuple[str, float, int | None, Plan]]:
    """(label, budget, seed, plan) of every allocator at one budget: baselines, scorers, oracle, random."""
    layers = len(oracle)
    plans = [
        ("uniform", allocate("uniform", modules, None, uniform_setting(setting, quantizer)), None),
        ("llama.cpp", allocate("llama.cpp", modules, None, setting), None),
        *((name, allocate(allocator, modules, s, setting), None) for name, s in scores.items()),
        ("oracle", allocate(allocator, modules, oracle, setting), None),
        *(
            (f"random-{seed}", allocate(allocator, modules, random_scores(layers, seed), setting), seed)
            for seed in range(seeds)
        ),
    ]
    return [(label, setting.budget, seed, plan) for label, plan, seed in plans]


def compare(cfg: CompareConfig) -> dict[str, Any]:
    """Run the comparison; write compare.json, compare.md and the figures into cfg.out."""
    started = time.perf_counter()
    quantizers = {name: get_quantizer(name) for name in cfg.quantizers}
    for quantizer in quantizers.values():
        quantizer.check(list(cfg.widths), cfg.symmetric)
    if not cfg.budgets:
        raise NsdsError("give at least one budget, e.g. --budgets 2.5 3 3.5")
    settings = {
        (q, b): allocation_setting(quantizer, cfg.model, b, cfg.widths, cfg.group_size, cfg.symmetric)
        for q, quantizer in quantizers.items()
        for b in cfg.budgets
    }
    for setting in settings.values():
        check_setting(setting)
    scorers = get_scorers(list(cfg.scorers))
    if cfg.tokens < 1 or cfg.seeds < 0:
        raise NsdsError("--tokens must be positive and --seeds not negative")
    low = min(cfg.widths)
    allocator = default_allocator(cfg.widths)
    loaded = load_for_evaluation(cfg.model, cfg.gguf_file, cfg.text, cfg.window, cfg.tokens, cfg.device)
    model, tokenizer, windows, protocol = loaded.model, loaded.tokenizer, loaded.windows, loaded.protocol
    weights = loaded.source
    provenance = weights.provenance()
    modules = arch.linear_modules(model, fuse=cfg.fuse)
    layers = arch.geometry(model.config).num_layers
    pristine = Pristine(model, [m.name for m in modules])
    fingerprint = {
        "model": [f["sha256"] for f in provenance["files"]] or provenance["id"],
        "widths": sorted(cfg.widths),
        "group_size": cfg.group_size,
        "symmetric": cfg.symmetric,
        "fuse": cfg.fuse,
        "windows": _windows_digest(windows),
        "nsds_version": __version__,
    }
    cfg.out.mkdir(parents=True, exist_ok=True)
    store = _Cells(cfg.out / "cells.json", fingerprint)
    counts = {"evaluated": 0, "reused": 0}

    def evaluate(desc: str) -> float:
        counts["evaluated"] += 1
        return perplexity(model, windows, desc=desc)

    if store.data["reference"] is None:
        pristine.restore(model)
        store.data["reference"] = evaluate("perplexity (reference)")
        store.save()

    subject_memo: dict[str, Any] = {}
    timing: dict[str, float] = {"load_s": loaded.seconds}
    per_quantizer: dict[str, Any] = {}
    cells: list[dict[str, Any]] = []
    for q, quantizer in quantizers.items():
        bank = WeightBank(model, pristine, quantizer, cfg.group_size, cfg.symmetric)
        # the oracle does not depend on the other widths nor on fusing, so it is shared across those settings
        key = {k: fingerprint[k] for k in ("model", "group_size", "symmetric", "windows", "nsds_version")}
        key |= {"quantizer": q, "bits": low}

        def measure(layer: int, bank: WeightBank = bank) -> float:
            bank.load({m.name: low for m in modules if m.layer == layer})
            return evaluate(f"oracle layer {layer}")

        start = time.perf_counter()
        oracle = single_layer_sensitivity(layers, measure, key)
        timing[f"oracle_{q}_s"] = time.perf_counter() - start

        device = loaded.compute.device
        subject = Subject(weights, model, tokenizer, quantizer, low, cfg.group_size, device, subject_memo)
        scores: dict[str, list[float]] = {}
        for name, scorer in scorers.items():
            stored = f"{name}@{q}" if name in QUANTIZER_DEPENDENT else name
            if stored not in store.data["scores"]:
                pristine.restore(model)  # LieQ runs the checkpoint's weights
                start = time.perf_counter()
                store.data["scores"][stored] = [float(x) for x in scorer(subject)]
                timing[f"score_{stored}_s"] = time.perf_counter() - start
                store.save()
            scores[name] = store.data["scores"][stored]
        correlations = {
            name: {"spearman": spearman(s, oracle), "kendall": kendall(s, oracle)} for name, s in scores.items()
        }
        per_quantizer[q] = {"oracle": {"low_width": low, "ppl": oracle}, "scores": scores, "correlations": correlations}

        plans = [
            plan
            for budget in cfg.budgets
            for plan in _plans(modules, settings[q, budget], quantizer, allocator, scores, oracle, cfg.seeds)
        ]
        start = time.perf_counter()
        for label, budget, seed, plan in progress(plans, desc=f"plans ({q})", unit="plan"):
            cell_id = f"{q}|{budget:g}|{label}"
            digest = _plan_digest(q, plan)
            if digest not in store.data["plans"]:
                bank.load({m.name: m.bits for m in plan.modules})
                store.data["plans"][digest] = evaluate(f"{label} at {budget:g} bits ({q})")
            else:
                counts["reused"] += 1
            store.data["cells"][cell_id] = {
                "quantizer": q,
                "budget": budget,
                "label": label,
                "kind": _kind(label),
                "seed": seed,
                "allocator": plan.allocator,
                "weight_bits": plan.weight_bits,
                "storage_bits": plan.storage_bits,
                "high_layers": [i for i, b in enumerate(plan.layer_bits()) if b == max(plan.widths)],
                "plan": digest,
                "ppl": store.data["plans"][digest],
            }
            store.save()
            cells.append(store.data["cells"][cell_id])
        timing[f"plans_{q}_s"] = time.perf_counter() - start
    pristine.restore(model)

    timing["total_s"] = time.perf_counter() - started
    results = {
        "schema": SCHEMA,
        "model": provenance,
        "geometry": {"model_type": model.config.model_type, "num_layers": layers},
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}
        | {"allocator": allocator, "scorers": list(scorers)},
        "protocol": protocol.to_dict() | {"description": protocol.describe()},
        "reference_ppl": store.data["reference"],
        "reference_note": "the reference is the checkpoint as loaded (for the GGUF assets: dequantized 4-bit weights)",
        "quantizers": per_quantizer,
        "cells": cells,
        "summary": summarize(cells),
        "counts": counts | {"resumed": store.resumed},
        "timing": timing,
        "nsds_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    write_outputs(results, cfg.out)
    return results


def write_outputs(results: dict[str, Any], out: Path) -> None:
    """compare.json, compare.md and the figures (also to re-render them from a saved compare.json)."""
    from nsds.report import compare_figures, compare_markdown

    figures = compare_figures(results)
    for name, png in figures.items():
        write_bytes(out / name, png)
    write_bytes(out / "compare.md", compare_markdown(results, list(figures)).encode())
    write_json(out / "compare.json", results)


def summarize(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per quantizer x budget x allocator; the random seeds folded into mean, spread and range."""
    groups: dict[tuple[str, float, str], list[dict[str, Any]]] = {}
    for cell in cells:
        label = "random" if cell["kind"] == "random" else cell["label"]
        groups.setdefault((cell["quantizer"], cell["budget"], label), []).append(cell)
    rows = []
    for (q, budget, label), group in groups.items():
        ppl = [c["ppl"] for c in group]
        rows.append({
            "quantizer": q,
            "budget": budget,
            "label": label,
            "kind": group[0]["kind"],
            "ppl": statistics.mean(ppl) if len(ppl) > 1 else ppl[0],
            "ppl_std": statistics.stdev(ppl) if len(ppl) > 1 else None,
            "ppl_min": min(ppl),
            "ppl_max": max(ppl),
            "n": len(ppl),
            "weight_bits": statistics.mean(c["weight_bits"] for c in group),
            "storage_bits": statistics.mean(c["storage_bits"] for c in group),
        })  # fmt: skip
    return rows


def cell_rows(results: dict[str, Any], quantizer: str, budget: float) -> dict[str, dict[str, Any]]:
    """The summary rows of one quantizer and budget, by allocator label (in summary order)."""
    return {r["label"]: r for r in results["summary"] if r["quantizer"] == quantizer and r["budget"] == budget}


def data_free_best(rows: dict[str, dict[str, Any]]) -> tuple[float, list[str]]:
    """The lowest PPL among the data-free allocators of one cell (random by its mean; the oracle's
    measured ranking is not data-free and is left out), and every label reaching it."""
    free = {label: row for label, row in rows.items() if label != "oracle"}
    lowest = min(row["ppl"] for row in free.values())
    return lowest, [label for label, row in free.items() if row["ppl"] == lowest]


def best_allocators(results: dict[str, Any]) -> dict[str, dict[str, str]]:
    """The data-free allocator with the lowest PPL for each quantizer and budget (the first one on a tie)."""
    return {
        q: {f"{b:g}": data_free_best(cell_rows(results, q, b))[1][0] for b in results["config"]["budgets"]}
        for q in results["quantizers"]
    }
