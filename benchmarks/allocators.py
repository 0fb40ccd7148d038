"""Every data-free allocator at equal budgets on one text: nsds's default (error) against the plans a user
would otherwise get (uniform, llama.cpp's rule, the HIGGS-style program, the NSDS paper's allocation).

    python benchmarks/allocators.py --models smollm2,gemma3-270m --quantizers rtn --text brown-test \\
        --budgets 3.25,3.5,4.5 [--tokens 2048] [--out docs/results/allocators-brown-test.json] [--allocators error]

Prints one row per model x quantizer x budget (perplexity per allocator, the lowest in brackets) and a
summary over every cell of `--out` (an existing file with the same settings keeps its other cells, so
quantizers can be added one run at a time): cells where `error` is lowest, never worse than uniform,
and each allocator's mean excess perplexity over the reference. The constants of `error` were chosen on
brown-tune (docs/METHOD.md §9); report on brown-test and moby-dick. GGUF budgets count storage bits.
Error tables and every evaluated plan's perplexity are kept under the nsds cache (both deterministic on one
machine), so a rerun evaluates only plans it has not seen. `--allocators` evaluates only those (after a change to one of
them) and takes the others' perplexities from the cells of `--out`, which must hold them at the same settings
(a plan identical to one of those takes its perplexity; so does an `error` plan identical to the plan `error`
makes without its Fisher model, the default the kept `error` perplexities were measured with).
"""

import argparse
import hashlib
import json
import tempfile
import time
from pathlib import Path

from nsds import arch, fisher
from nsds.allocate import Evidence, allocation_setting, least_error, plan_for
from nsds.compute import Compute
from nsds.distortion import ErrorTable, cached_errors
from nsds.evaluate.loading import Loaded, load_for_evaluation
from nsds.evaluate.perplexity import perplexity
from nsds.files import cache_dir, write_json
from nsds.plan import Module, Plan
from nsds.quantize import Quantizer, WeightBank, make_quantizer
from nsds.scorers.nsds import score
from nsds.weights import weights_identity

ALLOCATORS = ("error", "uniform", "llama.cpp", "higgs", "paper")


def cells(model_id: str, quantizers: list[str], budgets: list[float], widths: tuple[int, ...], text: str,
          tokens: int, allocators: tuple[str, ...], saved: dict[tuple, dict]) -> list[dict]:  # fmt: skip
    """One cell per quantizer x budget: every allocator's perplexity, those not in `allocators` from `saved`."""
    loaded = load_for_evaluation(model_id, None, text, 512, tokens, Compute.choose("cpu"))
    model = loaded.lm.model
    modules = arch.linear_modules(model, fuse=True)
    reference = perplexity(model, loaded.windows, desc="reference")
    scores = score(loaded.source, compute=loaded.compute).scores
    evaluated = Evaluated(model_id, loaded)
    found = []
    for q in quantizers:
        quantizer = make_quantizer(q)
        bank = WeightBank(model, [m.name for m in modules], quantizer, keep=True)
        errors = measured_errors(quantizer, modules, widths, loaded)
        evidence = Evidence(scores=scores, errors=errors)
        for budget in budgets:
            setting = allocation_setting(quantizer, model_id, budget, widths)
            kept = saved.get((model_id, q, budget), {}).get("ppl", {})
            plans = {label: plan_for(label, modules, evidence, setting) for label in ALLOCATORS}
            row = {}
            # error's plan without the Fisher model (the default before it) is what the kept "error" measured
            known = {label: plans[label] for label in kept if label not in allocators}
            if "error" in kept:
                known["error"] = least_error(modules, errors, setting, fisher_regime=0.0)
            for label in ALLOCATORS:
                if label in allocators:
                    # a plan identical to a kept one takes its perplexity: one plan, one measurement (evaluations
                    # in other sessions can differ in the fifth digit, which must not rank two identical plans)
                    same = [other for other, plan in known.items() if plan.formats() == plans[label].formats()]
                    desc = f"{label} at {budget:g} ({q})"
                    row[label] = kept[same[0]] if same else evaluated.ppl(bank, plans[label], desc)
                elif label in kept:
                    row[label] = kept[label]
                else:
                    raise SystemExit(
                        f"--out holds no {label} perplexity for {model_id} {q} {budget:g}: "
                        f"evaluate {label} too (leave out --allocators)"
                    )
            found.append({"model": model_id, "quantizer": q, "budget": budget, "counts": setting.budget_counts,
                          "reference": reference, "ppl": row})  # fmt: skip
            best = min(row.values())
            shown = " ".join(f"{k} {'[' if v == best else ''}{v:.2f}{']' if v == best else ''}" for k, v in row.items())
            print(f"{model_id:12s} {q:5s} {budget:5.2f}  ref {reference:.2f}  {shown}", flush=True)
        bank.restore()
    return found


def measured_errors(quantizer: Quantizer, modules: list[Module], widths: tuple[int, ...], loaded: Loaded,
                    base: Path | None = None, importance: tuple[dict, str] | None = None) -> ErrorTable:  # fmt: skip
    """The error table as `nsds run` measures it (the model's own text sampled by llama.cpp from `base`, the
    GGUF file, for llama.cpp's types; rounded by `importance`), through the nsds cache (it does not depend on
    the text; HQQ's and the Fisher information take minutes on a CPU). Call it while the model holds the
    checkpoint's weights."""
    lm = loaded.lm
    sample = (fisher.settings(lm, base), lambda: fisher.own_tokens(lm, loaded.tokenizer, base))
    with tempfile.TemporaryDirectory(prefix="nsds-errors-") as work:
        return cached_errors(lm, modules, quantizer, widths, weights_identity(loaded.source.provenance()), sample,
                             Path(work), importance)  # fmt: skip


class Evaluated:
    """Perplexities of the plans already evaluated on one model x text x length, kept under the nsds cache:
    perplexity is deterministic, so a plan is measured once, whichever allocator (or study) made it."""

    def __init__(self, model_id: str, loaded: Loaded) -> None:
        self.loaded = loaded
        tokens = loaded.protocol.windows * loaded.protocol.window
        self.path = cache_dir() / "ppl" / f"{model_id}-{loaded.protocol.text}-{tokens}.json"
        self.known: dict[str, float] = json.loads(self.path.read_text()) if self.path.exists() else {}

    def ppl(self, bank: WeightBank, plan: Plan, desc: str) -> float:
        """The plan's perplexity, put into the model through `bank` when not known yet."""
        key = hashlib.sha256(json.dumps([bank.quantizer.name, sorted(plan.formats().items())]).encode()).hexdigest()
        if key not in self.known:
            bank.load_plan(plan)
            self.known[key] = perplexity(self.loaded.lm.model, self.loaded.windows, desc=desc)
            write_json(self.path, self.known)
        return self.known[key]


def summary(found: list[dict]) -> list[str]:
    wins = sum(c["ppl"]["error"] <= min(c["ppl"].values()) for c in found)
    never_worse = sum(c["ppl"]["error"] <= c["ppl"]["uniform"] for c in found)
    excess = {a: sum(c["ppl"][a] / c["reference"] - 1 for c in found) / len(found) for a in ALLOCATORS}
    lines = [
        f"error lowest in {wins} of {len(found)} cells; not worse than uniform in {never_worse} of {len(found)}",
        "mean excess PPL over the reference: " + ", ".join(f"{a} {100 * e:.1f} %" for a, e in excess.items()),
    ]
    lines += [f"error's excess vs {a}'s: {100 * (excess['error'] / excess[a] - 1):+.1f} %"
              for a in ALLOCATORS[1:]]  # fmt: skip
    for q in dict.fromkeys(c["quantizer"] for c in found):
        mine = [c for c in found if c["quantizer"] == q]
        wins = sum(c["ppl"]["error"] <= min(c["ppl"].values()) for c in mine)
        lines.append(f"{q}: error lowest in {wins} of {len(mine)} cells")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="smollm2,gemma3-270m")
    parser.add_argument("--quantizers", default="rtn")
    parser.add_argument("--budgets", default="3.25,3.5,4.5")
    parser.add_argument("--widths", default="2,3,4,5,6,8")
    parser.add_argument("--text", default="brown-test")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--allocators", default=",".join(ALLOCATORS), help="those to evaluate; the rest from --out")
    args = parser.parse_args()
    started = time.perf_counter()
    widths = tuple(int(w) for w in args.widths.split(","))
    budgets = [float(b) for b in args.budgets.split(",")]
    settings = {"text": args.text, "tokens": args.tokens, "window": 512, "widths": list(widths)}
    saved = json.loads(args.out.read_text()) if args.out and args.out.exists() else {"settings": None, "cells": []}
    # the same evidence: new cells replace their old selves, others stay
    saved_cells = {(c["model"], c["quantizer"], c["budget"]): c for c in saved["cells"]
                   if saved["settings"] == settings}  # fmt: skip
    found = []
    for model_id in args.models.split(","):
        found += cells(model_id, args.quantizers.split(","), budgets, widths, args.text, args.tokens,
                       tuple(args.allocators.split(",")), saved_cells)  # fmt: skip
    fresh = {(c["model"], c["quantizer"], c["budget"]) for c in found}
    found = [c for key, c in saved_cells.items() if key not in fresh] + found
    order = {"rtn": 0, "hqq": 1, "gguf": 2}
    found.sort(key=lambda c: (c["model"] != "smollm2", c["model"], order.get(c["quantizer"], 3), c["budget"]))
    lines = summary(found)
    print("\n".join(lines))
    print(f"{time.perf_counter() - started:.0f} s")
    if args.out:
        write_json(args.out, {"settings": settings, "cells": found, "summary": lines})


if __name__ == "__main__":
    main()
