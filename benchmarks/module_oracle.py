"""The module-level oracle: each width group (a layer's q/k/v, o, gate/up or down) alone at a low width,
and how well each data-free sensitivity ranks the groups by it.

    python benchmarks/module_oracle.py --models smollm2,gemma3-270m --quantizer rtn --bits 3 \\
        --text brown-test [--tokens 2048] [--out docs/results/module-oracle-brown-test.json]

For every group g: the oracle is the perplexity with only g quantized to `--bits` (cached per unit in the
nsds cache, so an interrupted run resumes). The sensitivities ranked against it (Spearman rho, Kendall
tau-b): nsds's `error` objective at that width (its PredictedLoss with only g quantized), the Fisher-weighted
error on the model's own samples (error's model where the noise is small), HIGGS's (sum of
r_m(b)), the output-error energy (sum of n * r_m(b)), and the NSDS paper's layer score of g's layer (the
layer-level ranking, for reference: every group of a layer shares it).
"""

import argparse
import time
from collections.abc import Iterator
from pathlib import Path

from nsds import arch
from nsds.allocate import PredictedLoss
from nsds.compute import Compute
from nsds.evaluate.loading import load_for_evaluation
from nsds.evaluate.oracle import kendall, spearman, unit_sensitivity, windows_digest
from nsds.evaluate.perplexity import perplexity
from nsds.files import write_json
from nsds.quantize import WeightBank, make_quantizer
from nsds.scorers.nsds import score

from allocators import measured_errors


def study(model_id: str, quantizer_name: str, bits: int, text: str, tokens: int) -> dict:
    loaded = load_for_evaluation(model_id, None, text, 512, tokens, Compute.choose("cpu"))
    model = loaded.lm.model
    modules = arch.linear_modules(model, fuse=True)
    reference = perplexity(model, loaded.windows, desc="reference")
    layer_scores = score(loaded.source, compute=loaded.compute).scores
    quantizer = make_quantizer(quantizer_name)
    bank = WeightBank(model, [m.name for m in modules], quantizer, keep=True)
    errors = measured_errors(quantizer, modules, (bits,), loaded)
    groups = list(dict.fromkeys(m.group for m in modules))
    members = {g: [m for m in modules if m.group == g] for g in groups}
    provenance = loaded.source.provenance()
    key = {
        "model": [f["sha256"] for f in provenance["files"]] or provenance["id"],
        "quantizer": quantizer_name,
        "group_size": quantizer.group_size,
        "bits": bits,
        "units": "fused width groups",
        "windows": windows_digest(loaded.windows),
    }

    def measure(todo: list[str]) -> Iterator[tuple[str, float]]:
        for group in todo:
            bank.load({m.name: bits for m in members[group]}, desc=f"oracle {group}")
            yield group, perplexity(model, loaded.windows, desc=f"oracle {group}")

    oracle = unit_sensitivity(groups, measure, key, desc="oracle (one width group at a time)")
    bank.restore()

    predicted = PredictedLoss(modules, errors)  # the group alone at the low width, every other module unquantized

    def total(weight) -> list[float]:
        return [sum(weight(m) * errors.of(m.name, bits, "relative") for m in members[g]) for g in groups]

    sensitivities = {
        "error (nsds default)": [predicted({m.name: bits for m in members[g]}) for g in groups],
        "fisher (sum F d^2)": [sum(errors.of(m.name, bits, "fisher") for m in members[g]) for g in groups],
        "higgs (sum r)": total(lambda m: 1.0),
        "energy (sum n r)": total(lambda m: m.params),
        "NSDS paper layer score": [layer_scores[members[g][0].layer] for g in groups],
    }
    correlations = {name: {"spearman": spearman(s, oracle), "kendall": kendall(s, oracle)}
                    for name, s in sensitivities.items()}  # fmt: skip
    by_role: dict[str, dict[str, float]] = {}
    for role in dict.fromkeys(g.split(".", 1)[1] for g in groups):
        picked = [i for i, g in enumerate(groups) if g.endswith("." + role)]
        by_role[role] = {name: spearman([s[i] for i in picked], [oracle[i] for i in picked])
                         for name, s in sensitivities.items()}  # fmt: skip
    for name, c in correlations.items():
        print(f"{model_id} {quantizer_name} {bits}: {name:24s} rho {c['spearman']:+.3f} tau {c['kendall']:+.3f}")
    return {"model": model_id, "quantizer": quantizer_name, "bits": bits, "reference": reference,
            "groups": groups, "oracle": oracle, "sensitivities": sensitivities, "correlations": correlations,
            "within_role_spearman": by_role}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="smollm2,gemma3-270m")
    parser.add_argument("--quantizer", default="rtn")
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--text", default="brown-test")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    started = time.perf_counter()
    found = [study(m, args.quantizer, args.bits, args.text, args.tokens) for m in args.models.split(",")]
    print(f"{time.perf_counter() - started:.0f} s")
    if args.out:
        settings = {"text": args.text, "tokens": args.tokens, "window": 512, "quantizer": args.quantizer,
                    "bits": args.bits}  # fmt: skip
        write_json(args.out, {"settings": settings, "models": found})


if __name__ == "__main__":
    main()
