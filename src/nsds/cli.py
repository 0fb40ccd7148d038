"""Command line: argument parsing and printing only; each command calls one pipeline function."""

import argparse
import os
import sys
from dataclasses import fields
from pathlib import Path

from nsds import __version__
from nsds.errors import NsdsError
from nsds.scores import ScoreReport

DEFAULT_MODEL = "smollm2"


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line on stderr and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="nsds", description="Data-free, layer-wise mixed-precision quantization (NSDS).")
    parser.add_argument("--version", action="version", version=f"nsds {__version__}")
    parser.add_argument("--cache", type=Path, help="asset cache folder (default: $NSDS_CACHE or the user cache)")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    score = commands.add_parser("score", help="score every decoder layer's sensitivity (NSDS)")
    score.add_argument(
        "model",
        nargs="?",
        default=DEFAULT_MODEL,
        help="model folder (safetensors), .gguf file, asset name (smollm2, gemma3-270m) or hub id "
        f"(default: {DEFAULT_MODEL})",
    )
    score.add_argument("--gguf-file", help="GGUF file name inside the MODEL folder or hub repo")
    score.add_argument("-o", "--output", type=Path, default=Path("scores.json"), help="score JSON to write")
    score.add_argument("--device", default="auto", help="cpu, cuda or auto (default: auto)")
    score.add_argument("--precision", default="float64", choices=["float64", "float32"])
    score.add_argument("--mad-constant", type=float, default=1.4826, help="c in the robust z-score")
    score.add_argument("--temperature", type=float, default=1.0, help="T in sigmoid(z / T)")
    score.add_argument("--energy", type=float, default=0.99, help="spectral energy kept by the SE rank rule")
    score.add_argument("--soft-or", default="geometric", choices=["geometric", "product"])
    score.add_argument("--top", type=int, default=10, help="rows of the ranked table to print (0: all)")

    run = commands.add_parser("run", help="score, allocate, quantize and evaluate a model (the main job)")
    run.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=f"as for score (default: {DEFAULT_MODEL})")
    run.add_argument("--gguf-file", help="GGUF file name inside the MODEL folder or hub repo")
    run.add_argument("--budget", type=float, required=True, help="average bits per weight, e.g. 3.5")
    run.add_argument("--widths", type=_int_list, default=(2, 4), help="candidate widths (default: 2,4 as in the paper)")
    run.add_argument("--quantizer", default="rtn", help="rtn or hqq (default: rtn)")
    run.add_argument("--group-size", type=int, default=128, help="weights per quantization group (default: 128)")
    run.add_argument(
        "--allocator",
        default="auto",
        choices=["auto", "topk", "budget"],
        help="topk: the paper's rule (two widths); budget: any widths, exact budget; auto picks",
    )
    run.add_argument("--symmetric", action="store_true", help="symmetric RTN grid (default: asymmetric)")
    run.add_argument("--no-fuse", action="store_true", help="let q/k/v and gate/up take different widths")
    run.add_argument(
        "--budget-counts",
        default="weights",
        choices=["weights", "storage"],
        help="what the budget counts: weight bits (paper) or storage with scales/zeros",
    )
    run.add_argument("--text", default="brown", help="brown (offline), wikitext2, c4, or a text file")
    run.add_argument("--tokens", type=int, default=8192, help="scored tokens for perplexity (default: 8192)")
    run.add_argument("--window", type=int, help="tokens per window (default: 512 offline, 2048 hub texts)")
    run.add_argument("--tasks", type=_str_list, default=(), help="lm-eval zero-shot tasks, e.g. arc_easy,piqa")
    run.add_argument("--task-limit", type=int, help="examples per task (lm-eval --limit)")
    run.add_argument("--out", type=Path, default=Path("nsds-run"), help="output folder (default: nsds-run)")
    run.add_argument("--save", type=Path, help="also save the HQQ-quantized model in HQQ's format here")
    run.add_argument("--device", default="auto", help="cpu, cuda or auto (default: auto)")

    compare = commands.add_parser(
        "compare", help="evaluate NSDS against every baseline scorer and allocator, with the oracle ranking"
    )
    compare.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=f"as for score (default: {DEFAULT_MODEL})")
    compare.add_argument("--gguf-file", help="GGUF file name inside the MODEL folder or hub repo")
    compare.add_argument("--budgets", type=float, nargs="+", default=(2.5, 3.0, 3.5),
                         help="average bits per weight to compare (default: 2.5 3 3.5)")  # fmt: skip
    compare.add_argument("--widths", type=_int_list, default=(2, 4), help="candidate widths (default: 2,4)")
    compare.add_argument("--quantizer", dest="quantizers", type=_str_list, default=("rtn", "hqq"),
                         help="comma-separated quantizers (default: rtn,hqq)")  # fmt: skip
    compare.add_argument("--scorers", type=_str_list, default=("all",),
                         help="comma-separated scorers, or all / baselines / ablations (default: all)")  # fmt: skip
    compare.add_argument("--seeds", type=int, default=5, help="random allocations to average (default: 5)")
    compare.add_argument("--group-size", type=int, default=128, help="weights per quantization group (default: 128)")
    compare.add_argument("--symmetric", action="store_true", help="symmetric RTN grid (default: asymmetric)")
    compare.add_argument("--no-fuse", action="store_true", help="let q/k/v and gate/up take different widths")
    compare.add_argument("--text", default="brown", help="brown (offline), wikitext2, c4, or a text file")
    compare.add_argument("--tokens", type=int, default=2048, help="scored tokens per evaluation (default: 2048)")
    compare.add_argument("--window", type=int, help="tokens per window (default: 512 offline, 2048 hub texts)")
    compare.add_argument("--out", type=Path, default=Path("nsds-compare"), help="output folder (default: nsds-compare)")
    compare.add_argument("--device", default="auto", help="cpu, cuda or auto (default: auto)")

    assets = commands.add_parser("assets", help="fetch or list the offline models and text")
    verbs = assets.add_subparsers(dest="verb", required=True, parser_class=_Parser)
    fetch = verbs.add_parser("fetch", help="download and verify assets into the cache (idempotent)")
    fetch.add_argument("names", nargs="*", help="assets to fetch (default: all)")
    verbs.add_parser("list", help="show the assets and whether they are cached")
    return parser


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got '{text}'") from None


def _str_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _run(args: argparse.Namespace) -> None:
    from nsds.pipeline import RunConfig, run

    names = {f.name for f in fields(RunConfig)} - {"fuse"}
    config = RunConfig(**{name: getattr(args, name) for name in names}, fuse=not args.no_fuse)
    results = run(config)
    print(results["protocol"]["description"])
    print(f"{'plan':<10} {'allocator':<9} {'bits':>6} {'storage':>8} {'PPL':>9} {'time':>7}")
    for e in results["evaluations"]:
        bits = f"{e['weight_bits']:>6.3f} {e['storage_bits']:>8.3f}" if "weight_bits" in e else f"{'-':>6} {'-':>8}"
        print(f"{e['label']:<10} {e['allocator'] or '-':<9} {bits} {e['ppl']:>9.3f} {e['seconds']:>6.1f}s")
        for task, metrics in e["zero_shot"].items():
            print(f"{'':<10} {task}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    print(f"wrote {args.out}/: plan.json, plan-uniform.json, scores.json, results.json, report.md, scores.png, ppl.png")
    if args.save:
        print(f"saved the HQQ model to {args.save}")


def _compare(args: argparse.Namespace) -> None:
    from nsds.compare import CompareConfig, best_allocators, compare

    names = {f.name for f in fields(CompareConfig)} - {"fuse"}
    results = compare(CompareConfig(**{name: getattr(args, name) for name in names}, fuse=not args.no_fuse))
    print(results["protocol"]["description"])
    print(f"reference PPL {results['reference_ppl']:.2f}; lowest PPL per quantizer and budget:")
    for q, by_budget in best_allocators(results).items():
        print(f"  {q}: " + ", ".join(f"{budget} bits -> {label}" for budget, label in by_budget.items()))
    print("rank correlation with the oracle (Spearman rho):")
    for q, data in results["quantizers"].items():
        print(f"  {q}: " + ", ".join(f"{n} {c['spearman']:+.2f}" for n, c in data["correlations"].items()))
    counts = results["counts"]
    print(f"{counts['evaluated']} evaluations, {counts['reused']} reused; {results['timing']['total_s']:.0f} s")
    print(f"wrote {args.out}/: compare.json, compare.md, cells.json and figures")


def _score(args: argparse.Namespace) -> None:
    from nsds.scorers.nsds import Compute, NsdsParams, score
    from nsds.weights import open_source

    params = NsdsParams(
        mad_constant=args.mad_constant, temperature=args.temperature, energy=args.energy, soft_or=args.soft_or
    )
    compute = Compute.choose(args.device, args.precision)
    with open_source(args.model, args.gguf_file) as source:
        report = score(source, params, compute)
    report.save(args.output)
    print(_ranked_table(report, args.top))
    print(f"wrote {args.output} ({len(report.layers)} layers, {report.timing['total_s']:.1f} s)")


def _ranked_table(report: ScoreReport, top: int) -> str:
    geo = report.geometry
    rows = report.ranking if top <= 0 else report.ranking[:top]
    lines = [
        f"{report.model['id']}: {geo['model_type']}, {geo['num_layers']} layers; NSDS scores, most sensitive first",
        f"{'rank':>4} {'layer':>5} {'score':>7} {'P_NV':>6} {'P_SE':>6}  strongest signal",
    ]
    for rank, index in enumerate(rows, start=1):
        layer = report.layers[index]
        signals = [
            (p, f"{role} {aspect}")
            for role, r in layer.roles.items()
            for aspect, p in (("NV", r.nv_p), ("SE", r.se_p))
            if p is not None
        ]
        p, name = max(signals)
        lines.append(f"{rank:>4} {index:>5} {layer.score:>7.4f} {layer.nv:>6.3f} {layer.se:>6.3f}  {name} ({p:.3f})")
    if len(rows) < len(report.ranking):
        lines.append(f"     ... {len(report.ranking) - len(rows)} more layers in the JSON (--top 0 prints all)")
    return "\n".join(lines)


def _assets(args: argparse.Namespace) -> None:
    from nsds import assets

    if args.verb == "fetch":
        for name, path in assets.fetch(args.names or None).items():
            print(f"{name:12s} {path}")
        return
    for name in assets.ASSET_NAMES:
        try:
            where = str(assets.path(name))
        except NsdsError:
            where = "not fetched"
        about = assets.MODELS[name].about if name in assets.MODELS else "Brown corpus, detokenized (text)"
        print(f"{name:12s} {where}\n{'':12s} {about}")


def main(argv: list[str] | None = None) -> int:
    if not sys.stderr.isatty():
        # No progress bars in logs, ours or the libraries' (transformers' GGUF loader uses plain tqdm).
        # tqdm reads this when it is imported, so it is set before any command imports it.
        os.environ.setdefault("TQDM_DISABLE", "1")
    args = _build_parser().parse_args(argv)
    if args.cache:
        os.environ["NSDS_CACHE"] = str(args.cache)
    try:
        {"score": _score, "run": _run, "compare": _compare, "assets": _assets}[args.command](args)
    except NsdsError as err:
        print(f"nsds: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("nsds: interrupted", file=sys.stderr)
        return 130
    return 0
