"""The main job, `nsds run`: load once -> score -> allocate -> quantize -> evaluate -> report.

The model is loaded once; its planned modules' weights are kept pristine, and every plan (the NSDS
plan, the uniform baseline at the same budget) is applied to a fresh copy of them, so comparing plans
costs one load.
"""

import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from nsds import __version__, arch
from nsds.allocate import Setting, allocate, check_setting, default_allocator
from nsds.errors import NsdsError, first_line
from nsds.evaluate.lmeval import require as require_lm_eval
from nsds.evaluate.perplexity import perplexity
from nsds.evaluate.text import Protocol, default_window, load_text, token_windows
from nsds.files import write_bytes, write_json
from nsds.plan import Plan
from nsds.quantize import Pristine, Quantizer, apply_plan, get_quantizer
from nsds.scorers.nsds import Compute, score
from nsds.weights import ModuleSource, open_source

RESULTS_SCHEMA = "nsds.results/1"


@dataclass
class RunConfig:
    model: str = "smollm2"
    gguf_file: str | None = None
    budget: float = 3.0
    widths: tuple[int, ...] = (2, 4)
    quantizer: str = "rtn"
    group_size: int = 128
    allocator: str = "auto"  # topk for two widths, budget otherwise
    symmetric: bool = False
    fuse: bool = True  # q/k/v and gate/up share a width, as fused runtimes need
    budget_counts: str = "weights"
    text: str = "brown"
    tokens: int = 8192
    window: int | None = None
    tasks: tuple[str, ...] = ()
    task_limit: int | None = None
    out: Path = Path("nsds-run")
    save: Path | None = None
    device: str = "auto"


@dataclass
class Evaluation:
    label: str
    plan: Plan | None
    ppl: float
    seconds: float
    zero_shot: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        bits = (
            {} if self.plan is None else {"weight_bits": self.plan.weight_bits, "storage_bits": self.plan.storage_bits}
        )
        return {
            "label": self.label,
            "allocator": self.plan.allocator if self.plan else None,
            **bits,
            "ppl": self.ppl,
            "zero_shot": self.zero_shot,
            "seconds": self.seconds,
        }


def _pretrained(loader, path: Path, what: str):
    """transformers' from_pretrained on a folder or a GGUF file, with its errors as one line."""
    folder, extra = (path.parent, {"gguf_file": path.name}) if path.is_file() else (path, {})
    try:
        return loader(folder, **extra)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise NsdsError(f"transformers cannot load the {what} in '{path}': {first_line(err)}") from None


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return _pretrained(AutoTokenizer.from_pretrained, path, "tokenizer")


def load_model(path: Path, device: str) -> torch.nn.Module:
    """The transformers model in float32 (a GGUF file is dequantized)."""
    from transformers import AutoModelForCausalLM

    def loader(folder, **extra):
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **extra)

    return _pretrained(loader, path, "model").eval().to(device)


@dataclass
class Loaded:
    """A model loaded once for evaluation, with its tokenizer and the token windows every plan is scored on."""

    model: torch.nn.Module
    tokenizer: Any
    windows: torch.Tensor
    protocol: Protocol
    source: ModuleSource  # the loaded model's weights, with the files they came from
    compute: Compute
    seconds: float  # tokenizer + tokenization + model load


def load_for_evaluation(
    model_id: str, gguf_file: str | None, text_name: str, window: int | None, tokens: int, device: str
) -> Loaded:
    """Read the text, check the architecture from the weights' header (cheap, before the long load), then
    load the tokenizer, cut the token windows and load the model on the scorer's device."""
    text = load_text(text_name)
    compute = Compute.choose(device)  # the scorer's device is the model's
    with open_source(model_id, gguf_file) as source:
        path, files = source.location, source.files
    start = time.perf_counter()
    tokenizer = load_tokenizer(path)
    windows, protocol = token_windows(tokenizer, text, text_name, window or default_window(text_name), tokens)
    model = load_model(path, compute.device)
    seconds = time.perf_counter() - start
    return Loaded(model, tokenizer, windows, protocol, ModuleSource(model, model_id, files), compute, seconds)


def allocation_setting(
    quantizer: Quantizer,
    model_id: str,
    budget: float,
    widths: tuple[int, ...],
    group_size: int,
    symmetric: bool = False,
    budget_counts: str = "weights",
) -> Setting:
    """What the allocators need to know about the quantizer and the budget."""
    return Setting(
        budget=budget,
        widths=tuple(widths),
        group_size=group_size,
        overhead_bits_per_group=quantizer.overhead_bits_per_group(symmetric),
        quantizer=quantizer.name,
        model=model_id,
        symmetric=symmetric,
        budget_counts=budget_counts,
        grouping=quantizer.grouping,
    )


def uniform_setting(setting: Setting, quantizer: Quantizer) -> Setting:
    """The baseline's widths: the budget itself when it is a width the quantizer has (3.0 -> 3-bit
    everywhere), else the candidate widths, mixed evenly over depth."""
    budget = setting.budget
    if setting.budget_counts == "weights" and budget == int(budget) and int(budget) in quantizer.widths:
        return replace(setting, widths=(int(budget),))
    return setting


def run(cfg: RunConfig) -> dict[str, Any]:
    """Score, allocate, quantize and evaluate; write plan.json, plan-uniform.json, scores.json,
    results.json and report.md (+ figures) into cfg.out, only once everything has succeeded."""
    from nsds.report import render

    started = time.perf_counter()
    quantizer = get_quantizer(cfg.quantizer)
    quantizer.check(list(cfg.widths), cfg.symmetric)
    setting = allocation_setting(
        quantizer, cfg.model, cfg.budget, cfg.widths, cfg.group_size, cfg.symmetric, cfg.budget_counts
    )
    check_setting(setting)
    allocator = cfg.allocator if cfg.allocator != "auto" else default_allocator(cfg.widths)
    if cfg.tokens < 1:
        raise NsdsError(f"--tokens must be positive, got {cfg.tokens}")
    if cfg.save is not None and cfg.quantizer != "hqq":
        raise NsdsError("--save writes HQQ's format; use it with --quantizer hqq")
    if cfg.tasks:
        require_lm_eval()
    loaded = load_for_evaluation(cfg.model, cfg.gguf_file, cfg.text, cfg.window, cfg.tokens, cfg.device)
    model, tokenizer, windows, protocol = loaded.model, loaded.tokenizer, loaded.windows, loaded.protocol
    scores = score(loaded.source, compute=loaded.compute)
    modules = arch.linear_modules(model, fuse=cfg.fuse)
    plans = {
        "nsds": allocate(allocator, modules, scores.scores, setting),
        "uniform": allocate("uniform", modules, None, uniform_setting(setting, quantizer)),
    }

    pristine = Pristine(model, [m.name for m in modules])
    evaluations = [_evaluate(model, tokenizer, None, "reference", windows, cfg)]
    for label, plan in plans.items():
        apply_plan(model, plan, pristine, quantizer)
        evaluations.append(_evaluate(model, tokenizer, plan, label, windows, cfg))
        pristine.restore(model)

    results = {
        "schema": RESULTS_SCHEMA,
        "model": scores.model,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}
        | {"allocator": allocator},
        "protocol": protocol.to_dict() | {"description": protocol.describe()},
        "reference_note": "the reference is the checkpoint as loaded (for the GGUF assets: dequantized 4-bit weights)",
        "evaluations": [e.summary() for e in evaluations],
        "timing": {
            "load_s": loaded.seconds,
            "score_s": scores.timing["total_s"],
            "total_s": time.perf_counter() - started,
        },
        "nsds_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    report, figures = render(results, scores, plans["nsds"])
    if cfg.save is not None:
        _save_hqq(model, plans["nsds"], pristine, cfg.save)
    cfg.out.mkdir(parents=True, exist_ok=True)
    for name, png in figures.items():
        write_bytes(cfg.out / name, png)
    plans["nsds"].save(cfg.out / "plan.json")
    plans["uniform"].save(cfg.out / "plan-uniform.json")
    scores.save(cfg.out / "scores.json")
    write_json(cfg.out / "results.json", results)
    write_bytes(cfg.out / "report.md", report.encode())
    return results


def _evaluate(model, tokenizer, plan: Plan | None, label: str, windows: torch.Tensor, cfg: RunConfig) -> Evaluation:
    from nsds.evaluate.lmeval import zero_shot

    start = time.perf_counter()
    ppl = perplexity(model, windows, desc=f"perplexity ({label})")
    tasks = zero_shot(model, tokenizer, list(cfg.tasks), cfg.task_limit) if cfg.tasks else {}
    return Evaluation(label, plan, ppl, time.perf_counter() - start, tasks)


def _save_hqq(model: torch.nn.Module, plan: Plan, pristine: Pristine, target: Path) -> None:
    """Quantize the model with HQQ by the plan and save it in HQQ's format (reload with
    hqq.models.hf.base.AutoHQQHFModel.from_quantized). Written to a temporary folder, then renamed."""
    import shutil
    import tempfile

    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear
    from hqq.models.hf.base import AutoHQQHFModel

    pristine.restore(model)
    device = str(next(model.parameters()).device)
    for module in plan.modules:
        parent, _, child = module.name.rpartition(".")
        config = BaseQuantizeConfig(nbits=module.bits, group_size=module.group_size, axis=1)
        linear = model.get_submodule(module.name)
        setattr(
            model.get_submodule(parent), child, HQQLinear(linear, config, compute_dtype=torch.float32, device=device)
        )
    model.hqq_quantized = True
    model.base_class = AutoHQQHFModel
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        AutoHQQHFModel.save_quantized(model, str(staging))
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
