"""nsds's plan for vLLM (compressed-tensors int4/int8) against the data-free allocators a vLLM user has: at the
same average bits per weight, on held-out texts, the KL divergence of each plan's next-token distribution
from the unquantized model's (mean, 99th percentile, same top token; PPL beside), for three plans:

- `nsds`: nsds's default (measured module errors weighted by the Fisher information of the model's own text);
- `higgs`: the HIGGS-style program (llm-compressor's data-free peer: an integer program over weight MSE with a
  size/depth/type importance heuristic; allocate.py), with the same quantizer and fused groups;
- `uniform`: the candidate widths mixed evenly over depth.

Each cell is `nsds run MODEL --quantizer ct --budget B --widths 4,8 --group-size 64 --text TEXT --baselines
higgs,uniform`: every plan is compressed-tensors' own numerics (what `--export` writes for vLLM), evaluated
in process on the same 16 windows of 512 tokens. The error table and its Fisher step come from the nsds cache
after the first cell of a model.

    python benchmarks/ct_contest.py [--models smollm2,gemma3-270m] [--texts moby-dick,lodash]
                                    [--budgets 4.5,5,6] [--out docs/results/ct-contest.json]

Cells already in `--out` with the same settings are kept (a rerun measures only what is missing).
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

if not sys.stderr.isatty():
    os.environ.setdefault("TQDM_DISABLE", "1")  # read when tqdm is imported, so before nsds/transformers are

from nsds.config import RunConfig
from nsds.files import write_json
from nsds.pipeline import run

ROWS = ("nsds", "higgs", "uniform")
WIDTHS = (4, 8)
GROUP_SIZE = 64  # vLLM's kernels take 64 or 128; SmolLM2's rows of 576 take only 64
TOKENS = 8192
SCHEMA = "nsds.ct-contest/1"


def measure(model_id: str, text: str, budget: float) -> dict:
    """One cell: the three plans' divergences from the reference on `text` at `budget` bits per weight."""
    with tempfile.TemporaryDirectory(prefix="nsds-ct-contest-") as out:
        result = run(RunConfig(model=model_id, quantizer="ct", budget=budget, widths=WIDTHS, group_size=GROUP_SIZE,
                               text=text, tokens=TOKENS, baselines=ROWS[1:], out=Path(out)))  # fmt: skip
    rows = {e.label: {"kld": e.kld, "kld_stderr": e.kld_stderr, "kld_p99": e.kld_p99, "same_top": e.same_top,
                      "ppl": e.ppl, "weight_bits": e.weight_bits, "storage_bits": e.storage_bits}
            for e in result.evaluations if e.label in ROWS}  # fmt: skip
    reference_ppl = next(e.ppl for e in result.evaluations if e.label == "reference")
    return {"model": model_id, "text": text, "budget": budget, "reference_ppl": reference_ppl, "rows": rows}


def summary(cells: list[dict]) -> list[str]:
    """How nsds's plan does against the HIGGS-style plan and the uniform one, cell by cell."""
    if not cells:
        return []
    lines = []
    for rival in ROWS[1:]:
        relative = [c["rows"]["nsds"]["kld"] / c["rows"][rival]["kld"] - 1 for c in cells]
        wins = sum(r < 0 for r in relative)
        lines.append(f"nsds below {rival} in {wins} of {len(cells)} cells, mean KLD "
                     f"{100 * sum(relative) / len(relative):+.1f} % ({100 * min(relative):+.1f} .. "
                     f"{100 * max(relative):+.1f} %)")  # fmt: skip
    for c in cells:
        nsds, higgs = c["rows"]["nsds"], c["rows"]["higgs"]
        worse = [what for what, lost in (
            ("mean KLD", nsds["kld"] >= higgs["kld"]), ("99th percentile KLD", nsds["kld_p99"] > higgs["kld_p99"]),
            ("same top token", nsds["same_top"] < higgs["same_top"]), ("PPL", nsds["ppl"] > higgs["ppl"]),
        ) if lost]  # fmt: skip
        if worse:
            lines.append(f"nsds behind higgs on {c['model']} {c['text']} at {c['budget']:g} bits: {', '.join(worse)}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="smollm2,gemma3-270m")
    parser.add_argument("--texts", default="moby-dick,lodash")
    parser.add_argument("--budgets", default="4.5,5,6")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    started = time.perf_counter()
    settings = {"widths": list(WIDTHS), "group_size": GROUP_SIZE, "tokens": TOKENS}
    saved = json.loads(args.out.read_text()) if args.out and args.out.exists() else {"settings": None, "cells": []}
    kept = {(c["model"], c["text"], c["budget"]): c for c in saved["cells"] if saved["settings"] == settings}
    cells = []
    for model_id in args.models.split(","):
        for text in args.texts.split(","):
            for budget in (float(b) for b in args.budgets.split(",")):
                cell = kept.get((model_id, text, budget)) or measure(model_id, text, budget)
                cells.append(cell)
                shown = "  ".join(f"{k} {v['kld']:.4f}" for k, v in cell["rows"].items())
                print(f"{model_id:12s} {text:10s} {budget:4g}  {shown}", flush=True)
                if args.out:  # after every cell: a long run keeps what it measured (and the cells it did not ask for)
                    every = cells + [c for key, c in kept.items() if c not in cells]
                    write_json(args.out, {"schema": SCHEMA, "settings": settings, "cells": every,
                                          "summary": summary(every)})  # fmt: skip
    print("\n".join(summary(cells)))
    print(f"{time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
