"""Command line: argument parsing and printing only; each command calls one pipeline function."""

import argparse
import os
import sys
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

    assets = commands.add_parser("assets", help="fetch or list the offline models and text")
    verbs = assets.add_subparsers(dest="verb", required=True, parser_class=_Parser)
    fetch = verbs.add_parser("fetch", help="download and verify assets into the cache (idempotent)")
    fetch.add_argument("names", nargs="*", help="assets to fetch (default: all)")
    verbs.add_parser("list", help="show the assets and whether they are cached")
    return parser


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
    args = _build_parser().parse_args(argv)
    if args.cache:
        os.environ["NSDS_CACHE"] = str(args.cache)
    try:
        {"score": _score, "assets": _assets}[args.command](args)
    except NsdsError as err:
        print(f"nsds: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("nsds: interrupted", file=sys.stderr)
        return 130
    return 0
