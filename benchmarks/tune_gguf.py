"""The study behind the GGUF default's error measure with an importance matrix (docs/METHOD.md §10): at every
llama.cpp preset's size, with every file rounded by the model's own importance matrix, which allocator and
measure give the lowest KL divergence from the reference, in process, on the tuning text only (brown-tune).

    python benchmarks/tune_gguf.py --models smollm2,gemma3-270m [--presets Q2_K,...] [--tokens 8192]

Variants: `error` as shipped (its energy model on the relative weight error), `error` with the energy model on
the importance-weighted error (the module's relative output error on the model's own activations), `fisher`
(the Fisher-weighted error at every budget), HIGGS on either measure, uniform, and the preset's own plan.
Prints each cell's mean KLD per variant and each variant's sum of log KLD over the cells (lower is better).
Never run it on the texts the results are reported on.
"""

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

if not sys.stderr.isatty():
    os.environ.setdefault("TQDM_DISABLE", "1")  # read when tqdm is imported, so before nsds/transformers are

from nsds import arch, importance, runtime
from nsds.allocate import Evidence, allocation_setting, fisher, higgs, least_error, plan_for
from nsds.compute import Compute
from nsds.evaluate.divergence import ReferenceLogProbs
from nsds.evaluate.loading import load_for_evaluation
from nsds.pipeline import module_importance
from nsds.quantize import WeightBank, make_quantizer
from nsds.runtime import GGUFTarget
from nsds.weights import open_source

from allocators import measured_errors

WIDTHS = (2, 3, 4, 5, 6, 8)


def study(model_id: str, presets: list[str], text: str, tokens: int) -> dict[str, dict[str, float]]:
    """Mean KLD of every variant per cell "model preset"."""
    quantizer = make_quantizer("gguf")
    with tempfile.TemporaryDirectory(prefix="nsds-tune-gguf-") as tmp:
        work = Path(tmp)
        with open_source(model_id, None) as source:
            modules = arch.source_modules(source, fuse=True)
            target = runtime.gguf_target(source, modules, None, work, rounds_by_importance=True)
        matrix = importance.self_made(target.base)
        target = GGUFTarget(target.base, target.names, target.base_type, imatrix=matrix.path)
        loaded = load_for_evaluation(model_id, None, text, 512, tokens, Compute.choose("cpu"))
        modules = arch.linear_modules(loaded.lm.model, fuse=True)
        weights = module_importance(matrix, target, modules)
        bank = WeightBank(loaded.lm.model, [m.name for m in modules], quantizer, keep=True, importance=weights)
        errors = measured_errors(quantizer, modules, WIDTHS, loaded, target.base, (weights, matrix.digest))
        reference = ReferenceLogProbs(work)
        reference.record(loaded.windows, loaded.lm.log_probs(loaded.windows))
        found: dict[str, dict[str, float]] = {}
        for preset in presets:
            path = runtime.preset_file(target.base, preset, work, matrix.path)
            budget = runtime.preset_budget(path, target.names, modules)
            setting = allocation_setting(quantizer, model_id, budget, WIDTHS)
            with_preset = GGUFTarget(target.base, target.names, preset, preset, path, budget, matrix.path)
            plans = {
                "error": least_error(modules, errors, setting),
                "error/importance": least_error(modules, errors, setting, measure="importance"),
                "fisher": fisher(modules, errors, setting),
                "higgs": higgs(modules, errors, setting),
                "higgs/importance": higgs(modules, errors, setting, "importance"),
                "uniform": plan_for("uniform", modules, Evidence(errors=errors), setting),
                "preset": runtime.preset_plan(with_preset, modules, quantizer, model_id),
            }
            cell = found.setdefault(f"{model_id} {preset}", {})
            seen: dict[tuple, float] = {}
            for label, plan in plans.items():
                key = tuple(sorted(plan.formats().items()))
                if key not in seen:
                    bank.load_plan(plan)
                    seen[key] = reference.compare(loaded.windows, loaded.lm.log_probs(loaded.windows)).kld
                cell[label] = seen[key]
            print(f"{model_id} {preset}: " + ", ".join(f"{k} {v:.4f}" for k, v in cell.items()), flush=True)
        reference.close()
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="smollm2,gemma3-270m")
    parser.add_argument("--presets", default=",".join(runtime.PRESETS))
    parser.add_argument("--text", default="brown-tune")
    parser.add_argument("--tokens", type=int, default=8192)
    args = parser.parse_args()
    started = time.perf_counter()
    found: dict[str, dict[str, float]] = {}
    for model_id in args.models.split(","):
        found |= study(model_id, args.presets.split(","), args.text, args.tokens)
    labels = list(next(iter(found.values())))
    print(f"sum of log KLD over {len(found)} cells ({args.text}, {args.tokens} tokens):")
    for label in labels:
        print(f"  {label:18s} {sum(math.log(cell[label]) for cell in found.values()):.3f}")
    print(f"{time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
