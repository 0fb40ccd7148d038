"""`nsds compare`: every scorer, ablation and baseline allocator, measured the same way on one loaded model.

One load, one tokenized text. For each quantizer: the oracle (one evaluation per layer, cached across
runs), every scorer's layer scores and their rank correlation with the oracle, then one plan per
scorer x budget, plus uniform, llama.cpp's mixture rule, seeded random rankings and the oracle's own
ranking (the measured reference a data-free scorer aims at), all evaluated on the same token windows.
Each module is quantized once per width (WeightBank) and plans with identical widths are evaluated
once. Finished cells are saved after each evaluation in `cells.json`, so an interrupted or extended
run redoes nothing; the outputs (compare.json, compare.md, figures) are written at the end. Without
cells.json, an earlier compare.json in the output folder of the same model, settings and text (its
reference perplexity reproduced) lends its perplexities, scores and oracle: after a change to an
allocator only the plans that changed are evaluated.
"""

import hashlib
import json
import math
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from nsds import __version__, arch, fisher, runtime
from nsds.allocate import (
    DEFAULT_ALLOCATOR,
    Evidence,
    Setting,
    allocate,
    paper_allocator,
    plan_for,
    random_scores,
)
from nsds.compute import Compute
from nsds.config import CompareConfig
from nsds.distortion import ErrorTable, cached_errors
from nsds.documents import build, plain
from nsds.errors import NsdsError, first_line
from nsds.evaluate.jobs import Evaluator, Here, PerplexityJob
from nsds.evaluate.loading import Loaded, load_for_evaluation
from nsds.evaluate.oracle import kendall, single_layer_sensitivity, spearman, windows_digest
from nsds.evaluate.protocol import Protocol
from nsds.evaluate.text import load_text
from nsds.files import read_document, write_bytes, write_json
from nsds.gguf_tools import TENSOR_TYPES_SUFFIX
from nsds.options import check_options
from nsds.plan import Module, Plan
from nsds.progress import note, progress, stage
from nsds.quantize import Quantizer, WeightBank
from nsds.report import RUNTIME_LABELS, compare_figures, compare_markdown
from nsds.results import (
    KIND_OF_SCORER,
    Cell,
    CompareResult,
    Correlation,
    Counts,
    Oracle,
    QuantizerResult,
    Shape,
)
from nsds.runtime import GGUFTarget
from nsds.scorers.specs import ScorerSpec, get_scorers
from nsds.scorers.subject import Subject
from nsds.weights import resolve, weights_identity

CELLS_SCHEMA = "nsds.compare-cells/2"
REPRODUCED = 1e-4  # relative: an earlier run's reference PPL must be reproduced this closely to reuse its results


@dataclass
class _Store:
    """What cells.json holds: the reference PPL, layer scores, oracles, PPL per distinct plan, finished cells."""

    fingerprint: dict[str, Any]
    reference: float | None = None
    scores: dict[str, list[float]] = field(default_factory=dict)  # scorer (or scorer@quantizer) -> scores
    oracles: dict[str, list[float]] = field(default_factory=dict)  # quantizer -> PPL per layer alone at the low width
    plans: dict[str, float] = field(default_factory=dict)  # plan digest -> PPL
    runtime: dict[str, float] = field(default_factory=dict)  # plan digest -> llama-perplexity of its GGUF file
    cells: dict[str, Cell] = field(default_factory=dict)  # "quantizer|budget|label" -> cell
    schema: str = CELLS_SCHEMA


class _Cells:
    """The resumable store, saved atomically after every change.

    Its fingerprint (model files, settings, token windows, nsds version) must match the current run;
    otherwise (or when it cannot be read) the run starts afresh and overwrites it."""

    def __init__(self, path: Path, fingerprint: dict[str, Any]) -> None:
        self.path = path
        self.data = _Store(fingerprint)
        self.resumed = False
        if path.exists():
            try:
                saved = read_document(path, CELLS_SCHEMA, "compare cells", lambda data: build(_Store, data))
            except NsdsError as err:
                note(f"{first_line(err)}: starting afresh, it will be overwritten")  # only lost work, but said
                saved = None
            if saved is not None and saved.fingerprint == fingerprint:
                self.data, self.resumed = saved, True

    def save(self) -> None:
        write_json(self.path, plain(self.data))

    def adopt(self, previous: CompareResult, scorers: list[ScorerSpec]) -> None:
        """Take an earlier run's measurements (perplexity per plan digest, scores, oracles) as if resumed."""
        data = self.data
        data.plans |= {c.plan: c.ppl for c in previous.cells}
        data.runtime |= {c.plan: c.runtime_ppl for c in previous.cells if c.runtime_ppl is not None}
        for q, result in previous.quantizers.items():
            data.oracles.setdefault(q, result.oracle.ppl)
            for spec in scorers:
                if spec.name in result.scores:
                    data.scores.setdefault(f"{spec.name}@{q}" if spec.quantizer_dependent else spec.name,
                                           result.scores[spec.name])  # fmt: skip
        self.resumed = True
        self.save()


def _previous(path: Path, fingerprint: dict[str, Any], protocol: Protocol) -> CompareResult | None:
    """The compare.json at `path` when it measured the same model files with the same settings, text windows
    and nsds version (the caller checks that its reference perplexity is reproduced); else None."""
    try:
        previous = CompareResult.load(path) if path.is_file() else None
    except NsdsError as err:
        note(f"{first_line(err)}: nothing of it is reused, and it will be overwritten")
        return None
    if previous is None:
        return None
    settings = _settings(previous.config, previous.model, previous.nsds_version)
    same = all(fingerprint[k] == v for k, v in settings.items()) and previous.protocol == protocol
    return previous if same else None


def _settings(cfg: CompareConfig, provenance: dict[str, Any], version: str) -> dict[str, Any]:
    """What a run's measurements depend on besides its token windows: the weights, the quantizers' settings,
    how modules are grouped, and the nsds version."""
    return {
        "model": weights_identity(provenance),
        "widths": sorted(cfg.widths),
        "group_size": Quantizer.default_group_size if cfg.group_size is None else cfg.group_size,
        "symmetric": cfg.symmetric,
        "fuse": cfg.fuse,
        "per_expert": cfg.per_expert,
        "nsds_version": version,
    }


def _plan_digest(quantizer: str, plan: Plan) -> str:
    formats = sorted(plan.formats().items())
    return hashlib.sha256(json.dumps([quantizer, formats]).encode()).hexdigest()[:20]


@dataclass(frozen=True)
class _Row:
    label: str
    kind: str
    seed: int | None
    plan: Plan


def _plans(modules: list[Module], setting: Setting, allocator: str, scores: dict[str, list[float]],
           kinds: dict[str, str], oracle: list[float], seeds: int, errors: ErrorTable) -> list[_Row]:  # fmt: skip
    """Every allocator's plan at one budget: nsds's default, the baselines, every scorer's layer ranking
    allocated by the paper's rule, the oracle ranking, random rankings."""
    layers = len(oracle)

    def ranked(layer_scores: list[float]) -> Plan:
        return allocate(allocator, modules, Evidence(scores=layer_scores), setting)

    measured = Evidence(errors=errors)
    return [
        _Row(DEFAULT_ALLOCATOR, "nsds allocator", None, allocate(DEFAULT_ALLOCATOR, modules, measured, setting)),
        _Row("uniform", "baseline allocator", None, plan_for("uniform", modules, Evidence(), setting)),
        _Row("llama.cpp", "baseline allocator", None, allocate("llama.cpp", modules, Evidence(), setting)),
        _Row("higgs", "baseline allocator", None, allocate("higgs", modules, measured, setting)),
        *(_Row(name, kinds[name], None, ranked(s)) for name, s in scores.items()),
        _Row("oracle", "measured ranking", None, ranked(oracle)),
        *(_Row(f"random-{seed}", "random", seed, ranked(random_scores(layers, seed))) for seed in range(seeds)),
    ]


@dataclass(frozen=True)
class PreparedComparison:
    """A comparison's options, checked and resolved before anything expensive."""

    quantizers: dict[str, Quantizer]
    budgets: tuple[float | str, ...]  # as given, "presets" expanded
    settings: dict[tuple[str, float | str], Setting]  # (quantizer, budget as given): a preset's at its size
    targets: dict[float | str, GGUFTarget]  # quantizer gguf: per budget, the base file and the preset's
    budget_names: dict[float | str, str]  # a preset budget's name ("Q2_K = Q3_K_S" when they are the same size)
    scorers: list[ScorerSpec]
    allocator: str
    compute: Compute
    window: int  # tokens per evaluation window (the text's default when none was given)


def prepare(cfg: CompareConfig, work: Path | None = None) -> PreparedComparison:
    """Check every option (one NsdsError naming the first bad one); with the GGUF quantizer, quantize each
    preset named as a budget into `work` (or a temporary folder) to learn its size."""
    if not cfg.quantizers:
        raise NsdsError("give at least one quantizer, e.g. --quantizer rtn,hqq")
    if not cfg.budgets:
        raise NsdsError("give at least one budget, e.g. --budgets 2.5,3,3.5")
    budgets = tuple(dict.fromkeys(
        p for b in cfg.budgets
        for p in (runtime.K_PRESETS if isinstance(b, str) and b.lower() == "presets" else [b])
    ))  # fmt: skip
    scorers = get_scorers(list(cfg.scorers))
    if cfg.seeds < 0:
        raise NsdsError(f"--seeds must not be negative, got {cfg.seeds}")
    checked = check_options(cfg, cfg.quantizers, budgets, work, resident=True)
    budgets, names = _distinct_presets(budgets, checked.presets, checked.targets)
    return PreparedComparison(checked.quantizers, budgets, checked.settings, checked.targets, names, scorers,
                              paper_allocator(cfg.widths), checked.compute, checked.window)  # fmt: skip


def _distinct_presets(
    budgets: tuple[float | str, ...], presets: dict[float | str, str], targets: dict[float | str, GGUFTarget]
) -> tuple[tuple[float | str, ...], dict[float | str, str]]:
    """The budgets without presets that spend exactly what an earlier one spends on this model (on small
    models llama.cpp's fallbacks make some presets identical), and each kept preset's name with its twins."""
    sizes = {b: targets[b].budget for b in budgets if b in presets}
    first: dict[float | None, float | str] = {}
    names: dict[float | str, list[str]] = {}
    for b, size in sizes.items():
        names.setdefault(first.setdefault(size, b), []).append(presets[b])
    kept = tuple(b for b in budgets if b not in sizes or first[sizes[b]] == b)
    return kept, {b: " = ".join(n) for b, n in names.items()}


def compare(cfg: CompareConfig, ray: str | None = None, workers: int | None = None) -> CompareResult:
    """Run the comparison; write compare.json, compare.md and the figures into cfg.out.

    With `ray` (an address, or "" for a local Ray), the evaluations run on `workers` copies of the model
    (default: one per GPU of the cluster, else one per CPU); the results are the same."""
    with tempfile.TemporaryDirectory(prefix="nsds-gguf-") as work:
        return _compare(cfg, Path(work), ray, workers)


def _evaluator(cfg: CompareConfig, loaded: Loaded, ray: str | None, workers: int | None) -> Evaluator:
    """Where the evaluations run: here, or on Ray model copies (connected only once the options are checked)."""
    if ray is None:
        return Here(loaded.lm.model, loaded.windows)
    from nsds import cluster

    cluster.connect(ray)
    compute = cluster.compute_for(cfg.device, "float64")
    path = str(resolve(cfg.model, cfg.gguf_file))
    return cluster.EvaluationPool(path, loaded.windows, cfg, compute, cluster.workers_for(compute, workers))


@dataclass
class _Session:
    """What the phases of one comparison share: the options, the loaded model and its modules, the saved cells,
    where evaluations run, and the counts and timings for the result."""

    cfg: CompareConfig
    ready: PreparedComparison
    loaded: Loaded
    evaluator: Evaluator
    modules: list[Module]
    layers: int
    provenance: dict[str, Any]  # the model's identity (results.json's `model`)
    fingerprint: dict[str, Any]
    store: _Cells
    work: Path
    timing: dict[str, float]
    evaluated: int = 0
    reused: int = 0
    memo: dict[str, Any] = field(default_factory=dict)  # NSDS's run, shared by its ablations across quantizers

    def evaluate(self, bank: WeightBank | None, jobs: list[PerplexityJob]) -> Iterator[tuple[int, float]]:
        """The perplexity of each job (index, PPL), counted."""
        for i, ppl in self.evaluator.run(bank, jobs):
            self.evaluated += 1
            yield i, ppl


def _compare(cfg: CompareConfig, work: Path, ray: str | None, workers: int | None) -> CompareResult:
    started = time.perf_counter()
    ready = prepare(cfg, work)
    loaded = load_for_evaluation(cfg.model, cfg.gguf_file, cfg.text, ready.window, cfg.tokens, ready.compute)
    provenance = loaded.source.provenance()
    fingerprint = _settings(cfg, provenance, __version__) | {"windows": windows_digest(loaded.windows)}
    cfg.out.mkdir(parents=True, exist_ok=True)
    session = _Session(
        cfg, ready, loaded, _evaluator(cfg, loaded, ray, workers),
        arch.linear_modules(loaded.lm.model, fuse=cfg.fuse, per_expert=cfg.per_expert),
        arch.geometry(loaded.lm.model.config).num_layers, provenance, fingerprint,
        _Cells(cfg.out / "cells.json", fingerprint),
        work, {"load_s": loaded.seconds},
    )  # fmt: skip
    _reference(session)
    per_quantizer: dict[str, QuantizerResult] = {}
    cells: list[Cell] = []
    for q, quantizer in ready.quantizers.items():
        bank = WeightBank(loaded.lm.model, [m.name for m in session.modules], quantizer, keep=True)
        oracle = _oracle(session, q, bank)
        bank.restore()  # scorers read the loaded model's weights: the checkpoint's, not the oracle's last layer
        scores = _scores(session, q, quantizer)
        correlations = {name: Correlation.of(spearman(s, oracle), kendall(s, oracle)) for name, s in scores.items()}
        per_quantizer[q] = QuantizerResult(Oracle(min(cfg.widths), oracle), scores, correlations)
        rows = _rows(session, q, bank, scores, oracle)
        start = time.perf_counter()
        _evaluate_plans(session, q, bank, rows)
        cells += _cells(session, q, rows)
        session.timing[f"plans_{q}_s"] = time.perf_counter() - start
        bank.restore()
        del bank  # its pristine copy and quantized variants, before the next quantizer makes its own
    session.timing["total_s"] = time.perf_counter() - started
    result = CompareResult(
        model=provenance,
        geometry=Shape(loaded.lm.model.config.model_type, session.layers),
        config=replace(cfg, scorers=tuple(spec.name for spec in ready.scorers)),
        allocator=ready.allocator,
        protocol=loaded.protocol,
        reference_ppl=session.store.data.reference,
        quantizers=per_quantizer,
        cells=cells,
        counts=Counts(session.evaluated, session.reused, session.store.resumed),
        timing=session.timing,
    )
    write_outputs(result, cfg.out)
    return result


def _reference(session: _Session) -> None:
    """The reference's perplexity; when it reproduces an earlier compare.json's, that run's measurements are
    adopted (only plans that changed are evaluated again)."""
    cfg, store = session.cfg, session.store
    if store.data.reference is not None:
        return
    previous = None if store.resumed else _previous(cfg.out / "compare.json", session.fingerprint,
                                                    session.loaded.protocol)  # fmt: skip
    [(_, store.data.reference)] = session.evaluate(None, [PerplexityJob("perplexity (reference)", {})])
    store.save()
    if previous is not None and math.isclose(store.data.reference, previous.reference_ppl, rel_tol=REPRODUCED):
        stage(f"reusing the measurements of {cfg.out / 'compare.json'} (same model, settings and text)")
        store.adopt(previous, session.ready.scorers)


def _oracle(session: _Session, q: str, bank: WeightBank) -> list[float]:
    """Each layer's perplexity alone at the lowest width (cached across runs: it does not depend on the other
    widths nor on fusing)."""
    store, low = session.store, min(session.cfg.widths)
    if q not in store.data.oracles:
        key = {k: session.fingerprint[k] for k in ("model", "group_size", "symmetric", "windows", "nsds_version")}
        key |= {"quantizer": q, "bits": low}

        def measure(todo: list[int]) -> Iterator[tuple[int, float]]:
            jobs = [PerplexityJob(f"oracle layer {layer}", _alone(session.modules, layer, low, bank.quantizer))
                    for layer in todo]  # fmt: skip
            for i, ppl in session.evaluate(bank, jobs):
                yield todo[i], ppl

        stage(f"oracle ({q}): one layer at {low} bits at a time")
        start = time.perf_counter()
        store.data.oracles[q] = single_layer_sensitivity(session.layers, measure, key)
        session.timing[f"oracle_{q}_s"] = time.perf_counter() - start
        store.save()
    return store.data.oracles[q]


def _scores(session: _Session, q: str, quantizer: Quantizer) -> dict[str, list[float]]:
    """Every scorer's layer scores (a quantizer-dependent one per quantizer), each computed once and saved."""
    store, loaded = session.store, session.loaded
    weights_only = Subject(loaded.source, None, None, quantizer, min(session.cfg.widths), loaded.compute,
                           session.memo)  # fmt: skip
    with_model = replace(weights_only, model=loaded.lm.model, tokenizer=loaded.tokenizer)
    scores: dict[str, list[float]] = {}
    for spec in session.ready.scorers:
        stored = f"{spec.name}@{q}" if spec.quantizer_dependent else spec.name
        if stored not in store.data.scores:
            stage(f"scoring ({spec.name})")
            start = time.perf_counter()
            subject = with_model if spec.needs_model else weights_only
            store.data.scores[stored] = [float(x) for x in spec.load()(subject)]
            session.timing[f"score_{stored}_s"] = time.perf_counter() - start
            store.save()
        scores[spec.name] = store.data.scores[stored]
    return scores


def _rows(session: _Session, q: str, bank: WeightBank, scores: dict[str, list[float]],
          oracle: list[float]) -> list[tuple[float | str, _Row]]:  # fmt: skip
    """Every plan of this quantizer, per budget: each scorer's, the baselines', the oracle's, the random
    rankings' and, at a preset's size, the preset's own."""
    cfg, ready, timing = session.cfg, session.ready, session.timing
    start, loaded = time.perf_counter(), session.loaded
    base = next(iter(ready.targets.values())).base if q == "gguf" and ready.targets else None  # as `nsds run`
    sample = (fisher.settings(loaded.lm, base), lambda: fisher.own_tokens(loaded.lm, loaded.tokenizer, base))
    errors = cached_errors(loaded.lm, session.modules, bank.quantizer, cfg.widths, session.fingerprint["model"],
                           sample, session.work)  # fmt: skip
    timing[f"errors_{q}_s"] = time.perf_counter() - start
    kinds = {spec.name: KIND_OF_SCORER[spec.kind] for spec in ready.scorers}
    rows = []
    for budget in ready.budgets:
        rows += [(budget, row) for row in _plans(session.modules, ready.settings[q, budget], ready.allocator, scores,
                                                 kinds, oracle, cfg.seeds, errors)]  # fmt: skip
        target = ready.targets.get(budget)
        if target is not None and target.preset is not None:
            preset = runtime.preset_plan(target, session.modules, bank.quantizer, session.provenance["id"])
            rows.append((budget, _Row("llama.cpp preset", "baseline allocator", None, preset)))
    return rows


def _evaluate_plans(session: _Session, q: str, bank: WeightBank, rows: list[tuple[float | str, _Row]]) -> None:
    """Each distinct plan's perplexity, once (plans with the same widths, here or in the saved cells, share it)."""
    store = session.store
    jobs: dict[str, PerplexityJob] = {}  # plan digest -> its evaluation
    for budget, row in rows:
        digest = _plan_digest(q, row.plan)
        if digest in store.data.plans or digest in jobs:
            session.reused += 1
        else:
            _check_plan(row.plan, bank.quantizer)
            jobs[digest] = PerplexityJob(f"{row.label} at {_budget_name(budget)} ({q})", row.plan.formats())
    stage(f"evaluating {len(jobs)} distinct plans of {len(rows)} ({q})")
    digests = list(jobs)
    for i, ppl in progress(session.evaluate(bank, list(jobs.values())), f"plans ({q})", len(jobs), "plan"):
        store.data.plans[digests[i]] = ppl
        store.save()


def _cells(session: _Session, q: str, rows: list[tuple[float | str, _Row]]) -> list[Cell]:
    """One cell per row, with llama-perplexity's measure of the GGUF files at a preset's size."""
    cfg, ready, store = session.cfg, session.ready, session.store
    cells = []
    for budget, row in rows:
        cell_id = f"{q}|{_budget_name(budget)}|{row.label}"
        digest = _plan_digest(q, row.plan)
        target = ready.targets.get(budget) if q == "gguf" else None
        if target is not None and row.label in RUNTIME_LABELS and digest not in store.data.runtime:
            store.data.runtime[digest] = _runtime_ppl(row, target, session.work, cfg, ready.window)
        store.data.cells[cell_id] = Cell(
            quantizer=q,
            budget=ready.settings[q, budget].budget,
            label=row.label,
            kind=row.kind,
            seed=row.seed,
            allocator=row.plan.allocator,
            weight_bits=row.plan.weight_bits,
            storage_bits=row.plan.storage_bits,
            high_layers=[i for i, b in enumerate(row.plan.layer_bits()) if b == max(row.plan.widths)],
            plan=digest,
            ppl=store.data.plans[digest],
            budget_name=ready.budget_names.get(budget),
            runtime_ppl=store.data.runtime.get(digest),
        )
        store.save()
        cells.append(store.data.cells[cell_id])
    return cells


def _alone(modules: list[Module], layer: int, bits: float, quantizer: Quantizer) -> dict[str, str]:
    """The storage formats that put one layer alone at `bits` (the oracle's evaluation of that layer)."""
    return {m.name: quantizer.storage(m.out_features, m.in_features, bits).format for m in modules if m.layer == layer}


def _budget_name(budget: float | str) -> str:
    return budget if isinstance(budget, str) else f"{budget:g} bits"


def _check_plan(plan: Plan, quantizer: Quantizer) -> None:
    """A plan evaluated as formats must have been made for this quantizer and its settings."""
    if plan.quantizer != quantizer.name or plan.symmetric != quantizer.symmetric:
        raise NsdsError(f"the plan was made for {plan.quantizer} with other settings than {quantizer.describe()}")


def _runtime_ppl(row: _Row, target: GGUFTarget, work: Path, cfg: CompareConfig, window: int) -> float:
    """llama-perplexity of the row's plan as a GGUF file (the preset's own file for the preset row)."""
    text = work / "text.txt"
    if not text.is_file():
        runtime.text_file(load_text(cfg.text), cfg.tokens, work)
    if row.label == "llama.cpp preset" and target.preset_path is not None:
        return runtime.measure(target.preset_path, text, window, cfg.tokens).ppl
    path = work / "plan.gguf"
    runtime.export(row.plan, target.base, target.base_type, target.names, path)
    try:
        return runtime.measure(path, text, window, cfg.tokens).ppl
    finally:
        path.unlink(missing_ok=True)
        path.with_suffix(TENSOR_TYPES_SUFFIX).unlink(missing_ok=True)


def write_outputs(result: CompareResult, out: Path) -> None:
    """compare.json, compare.md and the figures (also to re-render them from a saved compare.json)."""
    for name, png in compare_figures(result).items():
        write_bytes(out / name, png)
    write_bytes(out / "compare.md", compare_markdown(result).encode())
    result.save(out / "compare.json")
