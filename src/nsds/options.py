"""The options `nsds run` and `nsds compare` check the same way before anything expensive (one NsdsError naming the
first bad option): the quantizers and their candidate widths, the budgets (bits per weight, or llama.cpp
presets, whose files are quantized to learn their sizes), the text protocol, the output folder and the device,
then from the weights' header alone the planned modules, what their formats can hold and whether the model
fits where the job must hold it whole."""

import contextlib
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from nsds import arch, runtime
from nsds.allocate import Setting, allocation_setting, check_fits
from nsds.compute import Compute
from nsds.config import BudgetCounts, CompareConfig, RunConfig
from nsds.errors import NsdsError
from nsds.evaluate.loading import check_whole_model_fits
from nsds.evaluate.text import check_protocol
from nsds.files import check_output_folder
from nsds.plan import Module
from nsds.quantize import Quantizer, check_expert_formats, make_quantizer
from nsds.quantize.gguf import GGUF
from nsds.runtime import GGUFTarget
from nsds.weights import open_source

Budget = float | str  # bits per weight, or a llama.cpp preset


@dataclass(frozen=True)
class CheckedOptions:
    """A job's shared options, checked and resolved."""

    quantizers: dict[str, Quantizer]
    presets: dict[Budget, str]  # each preset budget as given -> llama.cpp's name for it
    settings: dict[tuple[str, Budget], Setting]  # (quantizer, budget as given): a preset's at its file's size
    targets: dict[Budget, GGUFTarget]  # quantizer gguf: per budget, the base file and the preset's
    modules: list[Module]  # the planned modules, from the weights' header
    model_type: str
    compute: Compute
    window: int  # tokens per evaluation window (the text's default when none was given)


def check_options(
    cfg: RunConfig | CompareConfig,
    quantizers: tuple[str, ...],
    budgets: tuple[Budget, ...],
    work: Path | None,
    *,
    resident: bool,
    budget_counts: BudgetCounts | None = None,
    rounds_by_importance: bool = False,
    writes: tuple[str, ...] = (),
    own_checks: Callable[[], None] = lambda: None,
) -> CheckedOptions:
    """Check the options both jobs take, then the job's `own_checks` (still before any read), then the weights'
    header; with the GGUF quantizer, quantize each preset budget's file into `work` (or a temporary folder)
    to learn its size. `resident`: the job holds the model whole; `rounds_by_importance`: llama.cpp's types
    round by an importance matrix (nsds run's --imatrix); `writes`: the formats it writes besides its results
    (quantize.check_expert_formats)."""
    made = {name: make_quantizer(name, cfg.group_size, cfg.symmetric) for name in quantizers}
    presets: dict[Budget, str] = {}
    for budget in budgets:
        if isinstance(budget, str):
            if set(made) != {"gguf"}:
                raise NsdsError(f"budget '{budget}' is not a number of bits; llama.cpp presets as budgets need "
                                f"--quantizer gguf{' alone' if len(made) > 1 else ''}")  # fmt: skip
            presets[budget] = runtime.preset_name(budget, rounds_by_importance)
    for quantizer in made.values():
        quantizer.check_widths(cfg.widths)
    needing = GGUF.needing_importance(cfg.widths) if "gguf" in made and not rounds_by_importance else []
    if needing:
        raise NsdsError(f"llama.cpp writes {', '.join(needing)} only with an importance matrix, which this job does "
                        "not round by: drop them from --widths, or use nsds run without --imatrix none")  # fmt: skip
    for quantizer in made.values():
        for budget in budgets:
            if budget not in presets:
                allocation_setting(quantizer, cfg.model, budget, cfg.widths, budget_counts)  # fails fast
    own_checks()
    window = check_protocol(cfg.text, cfg.window, cfg.tokens)
    check_output_folder(cfg.out, "--out")
    compute = Compute.choose(cfg.device)
    targets: dict[Budget, GGUFTarget] = {}
    with contextlib.ExitStack() as stack, open_source(cfg.model, cfg.gguf_file) as source:  # the header only
        modules = arch.source_modules(source, fuse=cfg.fuse, per_expert=cfg.per_expert)
        check_expert_formats(modules, list(made), cfg.per_expert, writes)
        if resident:
            check_whole_model_fits(source, compute.memory())
        if "gguf" in made:
            folder = work or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="nsds-gguf-")))
            targets = {b: runtime.gguf_target(source, modules, presets.get(b), folder, rounds_by_importance)
                       for b in budgets}  # fmt: skip
        model_type = source.config.model_type
    sizes = {b: targets[b].budget if b in presets else b for b in budgets}
    settings = {
        (q, b): allocation_setting(quantizer, cfg.model, sizes[b], cfg.widths, budget_counts)
        for q, quantizer in made.items()
        for b in budgets
    }
    for q, quantizer in made.items():
        check_fits(modules, quantizer, [settings[q, b] for b in budgets])
    return CheckedOptions(made, presets, settings, targets, modules, model_type, compute, window)
