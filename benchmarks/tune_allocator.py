"""The study that chooses the `error` allocator's constants: a grid of energy exponents, energy weights, edge
weights, llama.cpp-prior weights and Fisher-regime thresholds on the tuning text only (brown-tune), every
model x quantizer x budget, against the `--baselines` (HIGGS and uniform by default).

    python benchmarks/tune_allocator.py --models smollm2,gemma3-270m --quantizers rtn,hqq \\
        --exponents 2,3 --energies 100,10000 --edges 2 --priors 1,1.25,1.5,2 --regimes 0,0.25,0.5,inf \\
        [--budgets 3.5,4.25,5] [--text brown-tune] [--tokens 8192] [--baselines higgs,uniform]

Prints each variant's perplexity per cell and its sum of log perplexities (lower is better), the
criterion docs/METHOD.md §9 uses. Never run it on the texts the results are reported on. Error tables and
plan perplexities are shared with benchmarks/allocators.py's cache.
"""

import argparse
import itertools
import math
import time

from nsds import arch
from nsds.allocate import Evidence, allocation_setting, least_error, plan_for
from nsds.compute import Compute
from nsds.evaluate.loading import load_for_evaluation
from nsds.quantize import WeightBank, make_quantizer

from allocators import Evaluated, measured_errors


def study(model_id: str, quantizers: list[str], budgets: list[float], widths: tuple[int, ...], text: str,
          tokens: int, variants: list[tuple[float, float, float, float, float]], baselines: list[str],
          ) -> dict[str, dict[str, float]]:  # fmt: skip
    """Perplexity of every variant (and of the baselines) per cell "model quantizer budget"."""
    loaded = load_for_evaluation(model_id, None, text, 512, tokens, Compute.choose("cpu"))
    model = loaded.lm.model
    modules = arch.linear_modules(model, fuse=True)
    evaluated = Evaluated(model_id, loaded)
    found: dict[str, dict[str, float]] = {}
    for q in quantizers:
        quantizer = make_quantizer(q)
        bank = WeightBank(model, [m.name for m in modules], quantizer, keep=True)
        errors = measured_errors(quantizer, modules, widths, loaded)
        for budget in budgets:
            setting = allocation_setting(quantizer, model_id, budget, widths)
            plans = {f"R^{k:g}x{g:g} edge={e:g} prior={p:g} fisher<{r:g}":
                     least_error(modules, errors, setting, edge_weight=e, energy_weight=g, energy_exponent=k,
                                 prior_weight=p, fisher_regime=r)
                     for k, g, e, p, r in variants}  # fmt: skip
            evidence = Evidence(errors=errors)
            plans |= {label: plan_for(label, modules, evidence, setting) for label in baselines}
            cell = found.setdefault(f"{model_id} {q} {budget:g}", {})
            for label, plan in plans.items():
                cell[label] = evaluated.ppl(bank, plan, f"{label} {q} {budget:g}")
            print(f"{model_id} {q} {budget:g}: " + ", ".join(f"{k} {v:.2f}" for k, v in cell.items()), flush=True)
        bank.restore()
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="smollm2,gemma3-270m")
    parser.add_argument("--quantizers", default="rtn")
    parser.add_argument("--budgets", default="3.5,4.25,5")
    parser.add_argument("--widths", default="2,3,4,5,6,8")
    parser.add_argument("--exponents", default="2")
    parser.add_argument("--energies", default="0,30,100")
    parser.add_argument("--edges", default="2")
    parser.add_argument("--priors", default="1.25", help="weights of the modules llama.cpp's mixes favour")
    parser.add_argument("--regimes", default="0.5", help="Fisher-model thresholds, nats per token (0: never)")
    parser.add_argument("--baselines", default="higgs,uniform", help="allocators shown beside the variants")
    parser.add_argument("--text", default="brown-tune")
    parser.add_argument("--tokens", type=int, default=8192)
    args = parser.parse_args()
    started = time.perf_counter()
    grid = (args.exponents, args.energies, args.edges, args.priors, args.regimes)
    variants = [tuple(float(v) for v in values) for values in itertools.product(*(g.split(",") for g in grid))]
    found: dict[str, dict[str, float]] = {}
    for model_id in args.models.split(","):
        found |= study(model_id, args.quantizers.split(","), [float(b) for b in args.budgets.split(",")],
                       tuple(int(w) for w in args.widths.split(",")), args.text, args.tokens, variants,
                       [b for b in args.baselines.split(",") if b])  # fmt: skip
    labels = list(next(iter(found.values())))
    print(f"\n{'variant':22s} " + " ".join(f"{c:>22s}" for c in found) + "   sum log PPL")
    for label in labels:
        row = [found[c][label] for c in found]
        print(f"{label:22s} " + " ".join(f"{v:22.2f}" for v in row) + f"   {sum(map(math.log, row)):.4f}")
    print(f"{time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
