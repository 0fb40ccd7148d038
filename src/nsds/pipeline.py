"""The main job, `nsds run`: check -> own text, importance -> score -> errors -> allocate -> evaluate -> outputs.

Every option is checked before the model is read (a llama.cpp preset budget is resolved then, from the
preset's own file). With the GGUF quantizer every plan is also written as a GGUF file and measured by
llama-perplexity (nsds.runtime), and the model is never held whole: its own text and importance matrix come
from llama.cpp on the GGUF file, and the error table and every plan's evaluation are passes over the decoder
layers, each layer read from the checkpoint when the pass reaches it (nsds.layerwise, docs/DESIGN.md
Memory). With the other quantizers the model is loaded whole once (transformers samples its own text) and
the same passes run over it. Outputs are written only once everything has succeeded, each file atomically.
"""

import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from nsds import arch, ct_export, fisher, ggml, importance, runtime
from nsds.allocate import (
    ALLOCATORS,
    DEFAULT_ALLOCATOR,
    Evidence,
    Setting,
    allocation_setting,
    evidence_needed,
    plan_for,
)
from nsds.compute import Compute
from nsds.config import RunConfig
from nsds.distortion import ErrorTable, cached_errors
from nsds.errors import NsdsError
from nsds.evaluate.divergence import ReferenceLogProbs
from nsds.evaluate.lmeval import require as require_lm_eval
from nsds.evaluate.lmeval import zero_shot
from nsds.evaluate.loading import Loaded, load_for_evaluation
from nsds.evaluate.text import load_text
from nsds.files import check_output_folder, copy_file, publish, staged_folder, write_bytes
from nsds.gguf_tools import TENSOR_TYPES_SUFFIX
from nsds.importance import ImportanceMatrix
from nsds.options import check_options
from nsds.plan import Module, Plan
from nsds.progress import note, stage
from nsds.quantize import QUANTIZERS, Quantizer, WeightBank
from nsds.quantize.bank import quantize_into
from nsds.quantize.gguf import TYPES
from nsds.quantize.hqq import save_hqq_model
from nsds.report import render
from nsds.results import Evaluation, RunResult
from nsds.runtime import GGUFTarget
from nsds.scorers.nsds import score
from nsds.scores import ScoreReport
from nsds.weights import weights_identity

OUTPUTS = ("plan.json", "scores.json", "errors.json", "results.json", "report.md", "scores.png", "ppl.png")
# With --export: quantizer gguf's files (imatrix: when one was used), quantizer ct's Hugging Face folder.
EXPORTS = {"gguf": ("model.gguf", "tensor-types.txt", "imatrix.gguf"), "ct": ("model",)}
# The plans a user would otherwise get, evaluated beside nsds's on the same windows, by allocate.plan_for's
# labels ("paper": the NSDS paper's allocation of its layer scores).
BASELINES = ("uniform", "llama.cpp", "higgs", "paper")
# Every file a run may write into --out: one an earlier run left there that this run does not write is removed.
ALL_OUTPUTS = (*OUTPUTS, *(f"plan-{label}.json" for label in BASELINES), *(n for e in EXPORTS.values() for n in e))


def baseline_names(names: tuple[str, ...]) -> tuple[str, ...]:
    """The baselines asked for, 'all' expanded, in BASELINES order; an unknown name is a one-line error."""
    unknown = [n for n in names if n != "all" and n not in BASELINES]
    if unknown:
        raise NsdsError(f"unknown baseline '{unknown[0]}'; choose from {', '.join(BASELINES)} or all")
    return tuple(n for n in BASELINES if n in names or "all" in names)


def plan_labels(cfg: RunConfig) -> dict[str, str]:
    """The plans a run makes: label -> allocator (allocate.plan_for's labels); 'nsds' is the chosen allocator."""
    allocator = DEFAULT_ALLOCATOR if cfg.allocator == "auto" else cfg.allocator
    return {"nsds": allocator} | {label: label for label in baseline_names(cfg.baselines)}


def measures_errors(cfg: RunConfig) -> bool:
    """Whether any of the run's plans reads the error table (quantizing every module at every width costs
    minutes with HQQ, so it is measured, and errors.json written, only then)."""
    return any(evidence_needed(kind, cfg.widths) == "errors" for kind in plan_labels(cfg).values())


def output_names(cfg: RunConfig) -> tuple[str, ...]:
    """The files `nsds run` writes into --out: OUTPUTS (errors.json when measured), one plan-LABEL.json per
    baseline, the exports."""
    plans = tuple(f"plan-{label}.json" for label in baseline_names(cfg.baselines))
    names = OUTPUTS[:1] + plans + OUTPUTS[1:] + (EXPORTS.get(cfg.quantizer, ()) if cfg.export else ())
    skipped = {"errors.json": not measures_errors(cfg), "imatrix.gguf": imatrix_choice(cfg) == "none"}
    return tuple(n for n in names if not skipped.get(n))


def with_default_widths(cfg: RunConfig) -> RunConfig:
    """The config with its quantizer's candidate widths when none were given (an unknown quantizer is left to
    prepare's one-line error); an i-quant preset's budget takes every GGUF type (the ones it may round)."""
    if cfg.widths is not None or cfg.quantizer not in QUANTIZERS:
        return cfg
    widths = QUANTIZERS[cfg.quantizer].default_widths
    if cfg.quantizer == "gguf" and isinstance(cfg.budget, str) and cfg.budget.strip().upper() in runtime.I_PRESETS:
        rounds = imatrix_choice(cfg) != "none"
        widths = tuple(w for w in sorted(TYPES) if rounds or TYPES[w] not in ggml.NEEDS_IMPORTANCE)
    return replace(cfg, widths=widths)


def imatrix_choice(cfg: RunConfig) -> str:
    """--imatrix resolved: self (the model's own text), none, or a file; the default is the quantizer's (gguf
    rounds by the model's own importance matrix, the others take none)."""
    if cfg.imatrix is None:
        return "self" if cfg.quantizer == "gguf" else "none"
    return cfg.imatrix


@dataclass(frozen=True)
class PreparedRun:
    """A run's options, checked and resolved before anything expensive."""

    quantizer: Quantizer
    setting: Setting
    allocator: str
    compute: Compute
    window: int  # tokens per evaluation window (the text's default when none was given)
    gguf: GGUFTarget | None  # quantizer gguf: the base file, tensor names and the matched preset
    modules: list[Module]  # the planned modules, from the weights' header
    imatrix: ImportanceMatrix | str | None  # a user's matrix (read and checked), "self" (made in the run) or None


def prepare(cfg: RunConfig, work: Path | None = None) -> PreparedRun:
    """Check every option (one NsdsError naming the first bad one) and resolve `auto`s and a preset budget
    (its file is quantized into `work`, or a temporary folder)."""
    cfg = with_default_widths(cfg)
    imatrix: ImportanceMatrix | str | None = None

    def own_checks() -> None:
        nonlocal imatrix
        allocator = plan_labels(cfg)["nsds"]
        if allocator not in ALLOCATORS:
            raise NsdsError(f"unknown allocator '{allocator}'; choose from auto, {', '.join(ALLOCATORS)}")
        if allocator == "topk" and len(set(cfg.widths)) != 2:
            raise NsdsError(f"topk takes exactly two widths (low, high), got {list(cfg.widths)}; use --allocator "
                            "budget")  # fmt: skip
        if cfg.save is not None and cfg.quantizer != "hqq":
            raise NsdsError("--save writes HQQ's format; use it with --quantizer hqq")
        if cfg.export and cfg.quantizer not in EXPORTS:
            raise NsdsError("--export writes a GGUF file for llama.cpp (--quantizer gguf) or a compressed-tensors "
                            "folder for vLLM (--quantizer ct); use it with one of those")  # fmt: skip
        if cfg.tasks:
            require_lm_eval()
        imatrix = _importance_option(cfg)
        if cfg.save is not None:
            check_output_folder(cfg.save, "--save")

    vllm_folder = cfg.export and cfg.quantizer == "ct"
    writes = ("hqq",) * (cfg.save is not None) + ("ct",) * vllm_folder
    checked = check_options(cfg, (cfg.quantizer,), (cfg.budget,), work, resident=resident(cfg),
                            budget_counts=cfg.budget_counts, rounds_by_importance=imatrix_choice(cfg) != "none",
                            writes=writes, own_checks=own_checks)  # fmt: skip
    if vllm_folder:
        ct_export.check_exportable(checked.modules, checked.model_type)
    target = checked.targets.get(cfg.budget)
    if isinstance(imatrix, ImportanceMatrix):
        module_importance(imatrix, target, checked.modules)  # made for this model: checked before any work
    return PreparedRun(checked.quantizers[cfg.quantizer], checked.settings[cfg.quantizer, cfg.budget],
                       plan_labels(cfg)["nsds"], checked.compute, checked.window, target, checked.modules,
                       imatrix)  # fmt: skip


def _importance_option(cfg: RunConfig) -> ImportanceMatrix | str | None:
    choice = imatrix_choice(cfg)
    if choice == "none":
        return None
    if cfg.quantizer != "gguf":
        raise NsdsError(f"--imatrix {choice}: only llama.cpp's types round by an importance matrix; use "
                        "--quantizer gguf or leave --imatrix out")  # fmt: skip
    if choice == "self":
        importance.check_tokens(cfg.imatrix_tokens)
        return "self"
    return importance.read(Path(choice))


def module_importance(matrix: ImportanceMatrix, target: GGUFTarget, modules: list[Module]) -> dict[str, torch.Tensor]:
    """Every planned module's quantization weights from the matrix (one-line error: made for another model)."""
    return matrix.for_modules({m.name: target.names[m.name] for m in modules}, {m.name: m.in_features for m in modules})


def with_importance(cfg: RunConfig, ready: PreparedRun, work: Path) -> tuple[PreparedRun, ImportanceMatrix | None]:
    """The run's importance matrix (the user's, or made from the model's own text, from the nsds cache when
    it was made before), and the run's target and budget with every file quantized by it."""
    if ready.imatrix is None or ready.gguf is None:
        return ready, None
    base = ready.gguf.base
    matrix = importance.self_made(base, cfg.imatrix_tokens) if ready.imatrix == "self" else ready.imatrix
    assert isinstance(matrix, ImportanceMatrix)
    target = runtime.with_importance(ready.gguf, matrix.path, ready.modules, work)
    budget = target.budget if target.preset else cfg.budget
    setting = allocation_setting(ready.quantizer, cfg.model, budget, cfg.widths, cfg.budget_counts)
    return replace(ready, gguf=target, setting=setting), matrix


def run(cfg: RunConfig) -> RunResult:
    """Score, allocate, quantize and evaluate; write OUTPUTS into cfg.out (and the HQQ model into
    cfg.save, the GGUF into cfg.out with --export), only once everything has succeeded."""
    with tempfile.TemporaryDirectory(prefix="nsds-gguf-") as work:
        return _run(with_default_widths(cfg), Path(work))


@dataclass
class Job:
    """A run's model and its evidence: what every plan of the run is made from and evaluated on."""

    ready: PreparedRun
    loaded: Loaded
    scores: ScoreReport
    modules: list[Module]
    importance: dict[str, torch.Tensor]  # module -> the quantization weights it is rounded by (gguf), else empty
    errors: ErrorTable | None
    matrix: ImportanceMatrix | None
    matrix_s: float  # seconds spent making (or reading) the importance matrix
    errors_s: float  # seconds spent measuring (or reading) the error table, the Fisher step included


def resident(cfg: RunConfig) -> bool:
    """Whether the run holds the whole model: for transformers' sampling (the Fisher step of quantizers other
    than gguf, whose runs sample with llama.cpp) and for lm-eval's tasks. Otherwise it holds one layer at a
    time (docs/DESIGN.md, memory)."""
    return cfg.quantizer != "gguf" or bool(cfg.tasks)


def prepare_run(cfg: RunConfig, work: Path) -> Job:
    """Check the options, make the importance matrix (gguf), load the model (whole, or its stem: `resident`),
    score it and measure the error table (when a plan reads it): everything but the plans. `cfg` must have
    its widths (with_default_widths)."""
    ready = prepare(cfg, work)
    started = time.perf_counter()
    ready, matrix = with_importance(cfg, ready, work)
    matrix_s = time.perf_counter() - started
    loaded = load_for_evaluation(cfg.model, cfg.gguf_file, cfg.text, ready.window, cfg.tokens, ready.compute,
                                 resident(cfg))  # fmt: skip
    lm = loaded.lm
    stage("scoring (NSDS)")
    with loaded.source as source:  # the streamed checkpoint's file handles end with the scoring
        scores = score(source, compute=loaded.compute)
    modules = arch.linear_modules(lm.model, fuse=cfg.fuse, per_expert=cfg.per_expert)
    weights = {} if matrix is None or ready.gguf is None else module_importance(matrix, ready.gguf, modules)
    errors, started = None, time.perf_counter()
    if measures_errors(cfg):
        base = None if ready.gguf is None else ready.gguf.base  # gguf: llama.cpp samples from the base file
        sample = (fisher.settings(lm, base), lambda: fisher.own_tokens(lm, loaded.tokenizer, base))
        errors = cached_errors(lm, modules, ready.quantizer, cfg.widths, weights_identity(scores.model), sample,
                               work, None if matrix is None else (weights, matrix.digest))  # fmt: skip
    return Job(ready, loaded, scores, modules, weights, errors, matrix, matrix_s, time.perf_counter() - started)


def plans_for_run(cfg: RunConfig, job: Job) -> dict[str, Plan]:
    """The run's plans by label: nsds's, the baselines', and the preset's when the budget is one."""
    ready, modules = job.ready, job.modules
    evidence = Evidence(scores=job.scores.scores, errors=job.errors)
    plans = {label: plan_for(kind, modules, evidence, ready.setting) for label, kind in plan_labels(cfg).items()}
    target = ready.gguf
    if target is not None:
        plans = {label: replace(plan, embeddings=target.embeddings) for label, plan in plans.items()}
        if target.preset is not None:
            plans[target.preset] = runtime.preset_plan(target, modules, ready.quantizer, job.scores.model["id"])
    return plans


def _run(cfg: RunConfig, work: Path) -> RunResult:
    started = time.perf_counter()
    job = prepare_run(cfg, work)
    ready, loaded, scores, errors, matrix = job.ready, job.loaded, job.scores, job.errors, job.matrix
    target = ready.gguf
    plans = plans_for_run(cfg, job)
    reference = ReferenceLogProbs(work)
    evaluations = [_evaluate(job, "reference", None, cfg, reference)]
    for label, plan in plans.items():
        evaluations.append(_evaluate(job, label, plan, cfg, reference))
    reference.close()
    files: dict[str, Path] = {}
    if target is not None:
        files = runtime.write_files(target, {k: v for k, v in plans.items() if k != target.preset}, work)
        text = runtime.text_file(load_text(cfg.text), cfg.tokens, work)
        measured = runtime.measure_files({e.label: files[e.label] for e in evaluations}, text, ready.window,
                                         cfg.tokens, work)  # fmt: skip
        evaluations = [replace(e, runtime=measured[e.label]) for e in evaluations]

    used = replace(cfg, allocator=ready.allocator, budget_counts=ready.setting.budget_counts,
                   group_size=None if cfg.quantizer == "gguf" else ready.quantizer.group_size,
                   imatrix=imatrix_choice(cfg))  # fmt: skip
    result = RunResult(
        model=scores.model,
        config=used,
        protocol=loaded.protocol,
        evaluations=evaluations,
        timing={
            "load_s": loaded.seconds,
            "imatrix_s": job.matrix_s,
            "score_s": scores.timing["total_s"],
            "errors_s": job.errors_s,
            "total_s": time.perf_counter() - started,
        },
    )
    report, figures = render(result, scores, plans["nsds"])
    if cfg.save is not None:
        stage(f"saving the HQQ model to {cfg.save}")
        save_hqq_model(loaded.lm.model, plans["nsds"], cfg.save)
    # every output is written into a sibling folder first and moved into --out once all are there, so an
    # interrupted or failed run leaves no partial set (nor an empty --out)
    with staged_folder(cfg.out) as out:
        if cfg.export and cfg.quantizer == "ct":
            stage(f"writing {cfg.out / 'model'} (compressed-tensors, for vLLM)")
            (out / "model").mkdir()
            ct_export.write_folder(loaded.lm, loaded.tokenizer, plans["nsds"], ready.quantizer, out / "model")
        elif cfg.export:
            stage(f"writing {cfg.out / 'model.gguf'}")
            copy_file(files["nsds"], out / "model.gguf")
            copy_file(files["nsds"].with_suffix(TENSOR_TYPES_SUFFIX), out / "tensor-types.txt")
            if matrix is not None:
                copy_file(matrix.path, out / "imatrix.gguf")
        for name, png in figures.items():
            write_bytes(out / name, png)
        plans["nsds"].save(out / "plan.json")
        for label in baseline_names(cfg.baselines):
            plans[label].save(out / f"plan-{label}.json")
        scores.save(out / "scores.json")
        if errors is not None:
            errors.save(out / "errors.json")
        result.save(out / "results.json")
        write_bytes(out / "report.md", report.encode())
        removed = publish(out, cfg.out, ALL_OUTPUTS)
    if removed:
        note(f"removed {', '.join(removed)} from {cfg.out}: an earlier run's outputs that this run does not write")
    return result


def _evaluate(job: Job, label: str, plan: Plan | None, cfg: RunConfig, reference: ReferenceLogProbs) -> Evaluation:
    """The reference (plan None: its log-probabilities recorded) or a plan, put into each layer as a pass reaches
    it: perplexity, and the plan's KL divergence from the reference on the same windows."""
    stage(f"evaluating {label}")
    start = time.perf_counter()
    windows, measured = job.loaded.windows, {}
    if plan is None:
        ppl = reference.record(windows, log_probs(job, None, f"perplexity ({label})"))
    else:
        found = reference.compare(windows, log_probs(job, plan, f"perplexity ({label})"))
        ppl = found.ppl
        measured = {"kld": found.kld, "kld_stderr": found.kld_stderr, "kld_p99": found.kld_p99,
                    "same_top": found.same_top}  # fmt: skip
    tasks = _tasks(job, plan, cfg) if cfg.tasks else {}
    bits = {} if plan is None else {"weight_bits": plan.weight_bits, "storage_bits": plan.storage_bits}
    allocator = plan.allocator if plan else None
    return Evaluation(label, allocator, ppl, time.perf_counter() - start, tasks, **bits, **measured)


def log_probs(job: Job, plan: Plan | None, desc: str) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The log-probabilities of the job's windows (as evaluate.divergence reads them) with the plan's formats
    put into each layer as the pass reaches it (None: the checkpoint's weights)."""
    by_layer: dict[int, dict[str, str]] = {}
    for m in plan.modules if plan is not None else ():
        by_layer.setdefault(m.layer, {})[m.name] = m.format

    def put_plan(i: int, model: torch.nn.Module) -> None:
        quantize_into(model, by_layer.get(i, {}), job.ready.quantizer, job.importance)

    return job.loaded.lm.log_probs(job.loaded.windows, put_plan if plan is not None else None, desc=desc)


def _tasks(job: Job, plan: Plan | None, cfg: RunConfig) -> dict:
    """lm-eval's zero-shot tasks on the resident model with the plan in it (then its weights back)."""
    model = job.loaded.lm.model
    bank = WeightBank(model, [m.name for m in job.modules], job.ready.quantizer, keep=False,
                      importance=job.importance)  # fmt: skip
    if plan is not None:
        bank.load_plan(plan)
    try:
        return zero_shot(model, job.loaded.tokenizer, list(cfg.tasks), cfg.task_limit)
    finally:
        bank.restore()
