"""Regenerate docs/RESULTS.md: `nsds compare` on SmolLM2 and Gemma-3-270M, then the page from its outputs.

    python benchmarks/results.py                 # run (or resume) every comparison, then write the page
    python benchmarks/results.py --page-only     # re-render page, tables and figures from compare.json

Each model is compared with the paper's 2/4 mix (docs/results/<model>/), with 2/3/4-bit widths
(docs/results/<model>-w234/), and with llama.cpp's types against its presets at their own sizes
(docs/results/<model>-gguf/, measured by llama-perplexity too; docs/GGUF.md). Each comparison runs in its
folder (cells.json makes it resumable: a rerun after an interruption, or with more scorers, only evaluates
what is missing). Nothing in the page is typed by hand:
every number and every "NSDS wins / loses" statement is computed here from compare.json.
"""

import argparse
import json
import os
import sys
from pathlib import Path

if not sys.stderr.isatty():
    os.environ.setdefault("TQDM_DISABLE", "1")  # read when tqdm is imported, so before nsds/transformers are

from nsds.compare import compare, write_outputs
from nsds.config import CompareConfig
from nsds.files import write_bytes
from nsds.report import correlation_table, quantizer_section
from nsds.results import CompareResult, SummaryRow, data_free_best
from nsds.scorers.specs import GROUPS

from allocators import summary as contest_summary
from ct_contest import summary as ct_summary
from imatrix_contest import summary as imatrix_summary

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
MODELS = ("smollm2", "gemma3-270m")
WIDTHS = {"": (2, 4), "-w234": (2, 3, 4)}  # folder suffix -> candidate widths
GROUP_SIZE = 64  # at 128, 2-bit HQQ wrecks these small models (single-layer PPL up to ~900): nothing left to rank
# Against the presets only the paper's scorer is run: each further scorer adds a llama-perplexity run per preset
GGUF_SETTINGS = {
    "widths": (2, 3, 4, 5, 6, 8),
    "quantizers": ("gguf",),
    "budgets": ("presets",),
    "scorers": ("nsds",),
    "seeds": 1,
}


def command_line(config: CompareConfig, folder: str) -> str:
    """The `nsds compare` invocation a run's recorded config stands for, writing into docs/results/`folder` (a
    scorer list that is a whole group, as `--scorers all` expands to, is shown by the group's name)."""
    scorers = next((name for name, members in GROUPS.items() if list(config.scorers) == members), None)
    flags = {
        "--quantizer": ",".join(config.quantizers),
        "--budgets": " ".join(b if isinstance(b, str) else f"{b:g}" for b in config.budgets),
        "--widths": ",".join(str(w) for w in config.widths),
        "--scorers": scorers or ",".join(config.scorers),
        "--seeds": config.seeds,
        "--group-size": config.group_size,
        "--out": f"docs/results/{folder}",
    }
    return " ".join([f"nsds compare {config.model}"] + [f"{k} {v}" for k, v in flags.items() if v is not None])


def _nsds_rank(rows: dict[str, SummaryRow]) -> tuple[int, int]:
    """1-based rank of NSDS by PPL among the data-free allocators of one cell (random by its mean; ties
    share the better rank, so a plan identical to the best one ranks first)."""
    free = [row.ppl for label, row in rows.items() if label != "oracle"]
    return 1 + sum(ppl < rows["nsds"].ppl for ppl in free), len(free)


def _verdicts(result: CompareResult) -> list[str]:
    """One line per quantizer x budget: the best data-free allocator, where NSDS stands, and the others."""
    lines = []
    for q in result.quantizers:
        for budget in result.budgets(q):
            by_label = result.rows(q, budget)
            lowest, best = data_free_best(by_label)
            rank, count = _nsds_rank(by_label)
            random = by_label["random"]
            others = [
                f"uniform {by_label['uniform'].ppl:.1f}",
                f"llama.cpp {by_label['llama.cpp'].ppl:.1f}",
                f"random {random.ppl:.1f} ± {random.ppl_std or 0:.1f}",
                f"oracle ranking {by_label['oracle'].ppl:.1f}",
            ]
            standing = f"{by_label['nsds'].ppl:.1f} (rank {rank} of {count})"
            lowest_cell = f"{', '.join(best)} {lowest:.1f}"
            lines.append(f"| {q} | {budget:g} | {lowest_cell} | {standing} | " + ", ".join(others) + " |")
    return lines


def _oracle_note(result: CompareResult) -> str:
    """Where the last invocation's oracle came from: the earlier measurements it resumed, the cache, or measured."""
    seconds = [result.timing.get(f"oracle_{q}_s") for q in result.quantizers]
    if all(s is None for s in seconds):
        return "; the oracle was reused with them."
    if all(s is not None and s < 1 for s in seconds):
        return "; the oracle came from the cache (measured by the 2/4 run)."
    return "."


def tally(runs: dict[str, CompareResult]) -> list[str]:
    """Over every cell: who has the lowest PPL, and how NSDS fares against uniform, llama.cpp and random;
    over every oracle: each scorer's mean rank correlation."""
    cells = over_uniform = over_llama = over_random = 0
    winners: dict[str, int] = {}
    rho: dict[str, dict[tuple[str, str], float]] = {}  # keyed by (model, quantizer): width sets share an oracle
    for result in runs.values():
        for q, data in result.quantizers.items():
            for name, corr in data.correlations.items():
                if corr.spearman is not None:
                    rho.setdefault(name, {})[result.model["id"], q] = corr.spearman
            for budget in result.budgets(q):
                rows = result.rows(q, budget)
                for label in data_free_best(rows)[1]:
                    winners[label] = winners.get(label, 0) + 1
                nsds = rows["nsds"].ppl
                cells += 1
                over_uniform += nsds < rows["uniform"].ppl
                over_llama += nsds < rows["llama.cpp"].ppl
                over_random += nsds < rows["random"].ppl
    ranked = sorted(winners.items(), key=lambda item: -item[1])
    oracles = len(next(iter(rho.values())))
    correlations = sorted(((sum(v.values()) / len(v), name) for name, v in rho.items()), reverse=True)
    return [
        f"- Lowest PPL among the data-free allocators, over all {cells} cells (model x widths x quantizer x "
        "budget; a tie counts for each): " + ", ".join(f"{label} {count}" for label, count in ranked) + ".",
        f"- The NSDS plan beats uniform in {over_uniform} of {cells} cells, llama.cpp's rule in {over_llama}, and "
        f"the mean of the random rankings in {over_random}.",
        f"- Mean Spearman rho with the oracle over the {oracles} model x quantizer oracles: "
        + ", ".join(f"{name} {value:+.2f}" for value, name in correlations)
        + ".",
    ]


def model_section(result: CompareResult, folder: str) -> str:
    model = result.model["id"]
    config = result.config
    command = command_line(config, folder)
    parts = [
        f"## {model}, widths {'/'.join(str(w) for w in config.widths)} ({result.allocator} allocator)",
        "",
        f"`{command}` ({config.tokens} tokens, {config.seeds} random seeds); reference PPL "
        f"{result.reference_ppl:.2f} (dequantized 4-bit GGUF weights). Last "
        f"invocation: {result.counts.evaluated} evaluations in {result.timing['total_s'] / 60:.1f} min "
        f"on the 2-core CPU machine, model load included"
        + (" (resumed: earlier measurements reused)" if result.counts.resumed else "")
        + _oracle_note(result),
        "",
        "| quantizer | budget | lowest PPL (data-free) | NSDS PPL (rank among data-free) | others |",
        "|---|---|---|---|---|",
        *_verdicts(result),
    ]
    for q in result.quantizers:
        parts += ["", quantizer_section(result, q, "###", f"results/{folder}/")]
    parts += ["", "### Rank correlation of each scorer with the oracle", "", correlation_table(result), ""]
    return "\n".join(parts)


def gguf_glance(runs: dict[str, CompareResult]) -> list[str]:
    """Over every model x preset: how NSDS's GGUF file fares against the preset's (llama-perplexity)."""
    pairs = [
        (result.model["id"], row)
        for result in runs.values()
        for budget in result.budgets("gguf")
        for row in [result.rows("gguf", budget)]
    ]
    if not pairs:
        return []
    lines = []
    for label, name in (("error", "nsds's default (`error`)"), ("nsds", "the NSDS paper's allocation")):
        if any(_runtime(rows, label) is None for _, rows in pairs):
            continue  # measured before that allocator existed
        wins = sum(rows[label].runtime_ppl < rows["llama.cpp preset"].runtime_ppl for _, rows in pairs)
        uniform = sum(rows[label].runtime_ppl < rows["uniform"].runtime_ppl for _, rows in pairs)
        excess = [rows[label].runtime_ppl / rows["llama.cpp preset"].runtime_ppl - 1 for _, rows in pairs]
        lines.append(
            f"- GGUF, measured by llama-perplexity at each llama.cpp preset's own size ({len(pairs)} model x preset "
            f"cells): {name} beats the preset in {wins}, uniform in {uniform}; its perplexity differs from the "
            f"preset's by {100 * sum(excess) / len(excess):+.1f} % on average (from {100 * min(excess):+.1f} % to "
            f"{100 * max(excess):+.1f} %; identical plans where every allocator reaches the same types)."
        )
    return lines


def _runtime(rows: dict, label: str) -> float | None:
    """llama-perplexity of a row's GGUF file; None when the row was not measured (an older compare.json)."""
    row = rows.get(label)
    return None if row is None else row.runtime_ppl


def _ppl_cells(ppl: dict[str, float | None], sep: str) -> str:
    """Perplexities joined by `sep`, the lowest in bold, "-" where absent."""
    lowest = min(v for v in ppl.values() if v is not None)
    return sep.join("-" if v is None else f"**{v:.2f}**" if v == lowest else f"{v:.2f}" for v in ppl.values())


def gguf_section(result: CompareResult, folder: str) -> str:
    model = result.model["id"]
    command = command_line(result.config, folder)
    lines = [
        f"## {model}: GGUF against llama.cpp's presets, at each preset's own size",
        "",
        f"`{command}` ({result.config.tokens} tokens); reference PPL {result.reference_ppl:.2f} (the GGUF as "
        f"loaded). Last invocation: {result.counts.evaluated} evaluations in {result.timing['total_s'] / 60:.1f} "
        "min on the 2-core CPU machine"
        + (" (resumed: earlier measurements reused)" if result.counts.resumed else "")
        + ". The budget of each column is the storage bits per weight the preset "
        "spends on the planned modules; token embedding, head and norms are stored as the preset stores them.",
        "",
        "`error` is nsds's default allocator, `nsds` the NSDS paper's allocation of its layer scores.",
        "",
        "| preset | bits | llama.cpp PPL: preset | error (default) | NSDS paper | HIGGS | uniform | llama.cpp rule "
        "| default vs preset |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    labels = ("llama.cpp preset", "error", "nsds", "higgs", "uniform", "llama.cpp")
    for budget in result.budgets("gguf"):
        rows = result.rows("gguf", budget)
        ppl = {label: _runtime(rows, label) for label in labels}
        name = rows["llama.cpp preset"].budget_name
        change = "-" if ppl["error"] is None else f"{100 * (ppl['error'] / ppl['llama.cpp preset'] - 1):+.1f} %"
        lines.append(f"| {name} | {budget:.3f} | {_ppl_cells(ppl, ' | ')} | {change} |")
    lines += ["", quantizer_section(result, "gguf", "###", f"results/{folder}/")]
    return "\n".join(lines)


def allocators_section() -> list[str]:
    """The held-out contest of nsds's default allocator (benchmarks/allocators.py outputs): one table per text
    and length, then the acceptance summary over every text at each length."""
    saved = [
        json.loads(path.read_text()) | {"file": path.name} for path in (DOCS / "results").glob("allocators-*.json")
    ]
    saved.sort(key=lambda s: (s["settings"]["tokens"], s["settings"]["text"]))
    parts = []
    for one in saved:
        settings, cells = one["settings"], one["cells"]
        labels = list(cells[0]["ppl"])
        parts += [
            f"### `{settings['text']}` ({settings['tokens']} tokens, windows of {settings['window']}; widths "
            f"{'/'.join(map(str, settings['widths']))})",
            "",
            f"`python benchmarks/allocators.py --text {settings['text']} --tokens {settings['tokens']} ...` "
            f"({one['file']}). Perplexity at equal bits (weight bits for RTN/HQQ, storage bits for GGUF types); "
            "bold: the lowest per row.",
            "",
            "| model | quantizer | bits | reference | " + " | ".join(labels) + " |",
            "|---|---|---|---|" + "---|" * len(labels),
        ]
        for c in cells:
            best = min(c["ppl"].values())
            shown = [f"**{v:.2f}**" if v == best else f"{v:.2f}" for v in c["ppl"].values()]
            bits = f"{c['budget']:g}" + (" (storage)" if c.get("counts") == "storage" else "")
            parts.append(f"| {c['model']} | {c['quantizer']} | {bits} | {c['reference']:.2f} | "
                         + " | ".join(shown) + " |")  # fmt: skip
        parts += ["", *(f"- {line}" for line in one["summary"]), ""]
    for tokens in dict.fromkeys(one["settings"]["tokens"] for one in saved):
        same = [one for one in saved if one["settings"]["tokens"] == tokens]
        if len(same) > 1:
            texts = " and ".join(f"`{one['settings']['text']}`" for one in same)
            parts += [f"### Every held-out cell at {tokens} tokens ({texts})", ""]
            every = [c for one in same for c in one["cells"]]
            parts += [*(f"- {line}" for line in contest_summary(every)), ""]
    if parts:
        parts = [
            "## nsds's default allocator on held-out text",
            "",
            "The `error` allocator (docs/METHOD.md §9) against every allocator a user could otherwise use, at "
            "usable budgets, on text its constants were not chosen on (they were chosen on `brown-tune`). "
            "`paper` is the NSDS paper's allocation of its layer scores (the knapsack with error S x n x 4^-b for "
            "more than two widths).",
            "",
            *parts,
        ]
    return parts


CONTEST_ROWS = {"preset": "preset, no imatrix", "preset+brown": "preset + brown-tune imatrix",
                "preset+self": "preset + self imatrix", "nsds": "nsds (no data)"}  # fmt: skip


def _contest() -> dict | None:
    path = DOCS / "results" / "imatrix-contest.json"
    return json.loads(path.read_text()) if path.exists() else None


def _kld_cells(rows: dict[str, dict | None], digits: int = 4) -> list[str]:
    """Mean KLD per row, the lowest in bold; "-" for a row the cell has not (a preset only made with an
    importance matrix has no row without one)."""
    klds = [None if r is None else abs(r["kld"]) if r["kld"] == 0 else r["kld"] for r in rows.values()]  # -0 too
    least = min(k for k in klds if k is not None)
    return ["-" if k is None else f"**{k:.{digits}f}**" if k == least else f"{k:.{digits}f}" for k in klds]


def contest_section() -> list[str]:
    """The importance-matrix contest (benchmarks/imatrix_contest.py): per model and held-out text, one table."""
    saved = _contest()
    if saved is None:
        return []
    settings = saved["settings"]
    parts = [
        "## At every preset's size, judged by KL divergence: nsds against the files users download",
        "",
        f"`python benchmarks/imatrix_contest.py` (docs/results/imatrix-contest.json): llama-perplexity "
        f"`--kl-divergence` from the source GGUF on {settings['chunks']} chunks of {settings['context']} tokens of "
        "each held-out text (it scores the second half of each chunk), for llama.cpp's preset without an "
        "importance matrix (`-` for the IQ1/IQ2 presets, which llama.cpp makes only with one), with one from "
        f"real text (llama-imatrix on {settings['calibration_chunks']} chunks of "
        f"brown-tune), with nsds's matrix of the model's own text ({settings['self_tokens']} tokens, no data), and "
        "nsds's default GGUF job (no data) at the preset's file size or below. Mean KLD (nats per token), "
        "bold: the lowest per row; the last columns: nsds's KLD relative to the calibrated preset's, and the "
        "preset's and nsds's 99th percentile and same-top-token rate.",
        "",
    ]
    cells = saved["cells"]
    for model in dict.fromkeys(c["model"] for c in cells):
        for text in dict.fromkeys(c["text"] for c in cells if c["model"] == model):
            parts += [
                f"### {model}, `{text}`",
                "",
                "| preset | MB | " + " | ".join(CONTEST_ROWS.values())
                + " | nsds vs preset + brown | 99% KLD: preset + brown / nsds | same top: preset + brown / nsds "
                "| PPL: preset + brown / nsds |",
                "|---|---|" + "---|" * (len(CONTEST_ROWS) + 4),
            ]  # fmt: skip
            for c in cells:
                if c["model"] != model or c["text"] != text:
                    continue
                rows = {label: c["rows"].get(label) for label in CONTEST_ROWS}
                brown, nsds = rows["preset+brown"], rows["nsds"]
                change = f"{100 * (nsds['kld'] / brown['kld'] - 1):+.1f} %" if brown["kld"] > 0 else "- (exact)"
                parts.append(
                    f"| {c['preset']} | {brown['bytes'] / 1e6:.1f} | " + " | ".join(_kld_cells(rows)) + f" | {change} "
                    f"| {brown['kld_p99']:.3f} / {nsds['kld_p99']:.3f} | {100 * brown['same_top']:.1f} / "
                    f"{100 * nsds['same_top']:.1f} % | {brown['ppl']:.2f} / {nsds['ppl']:.2f} |"
                )
            parts.append("")
    parts += [*(f"- {line}" for line in imatrix_summary(cells)), ""]
    return parts


CT_ROWS = ("nsds", "higgs", "uniform")  # the ct contest's plans, in its tables' column order


def ct_section() -> list[str]:
    """nsds's compressed-tensors plans against the HIGGS-style program (benchmarks/ct_contest.py)."""
    path = DOCS / "results" / "ct-contest.json"
    if not path.exists():
        return []
    saved = json.loads(path.read_text())
    settings, cells = saved["settings"], saved["cells"]
    parts = [
        "## For vLLM: compressed-tensors int4/int8 plans against the HIGGS-style program",
        "",
        f"`python benchmarks/ct_contest.py` (docs/results/ct-contest.json): `nsds run MODEL --quantizer ct "
        f"--widths {','.join(map(str, settings['widths']))} --group-size {settings['group_size']} --budget B "
        "--text TEXT --baselines higgs,uniform` on held-out texts; every plan in compressed-tensors' own numerics "
        f"(what the export writes), evaluated in process on {settings['tokens']} tokens. `higgs` stands for "
        "llm-compressor's data-free peer (an integer program over weight error with a size/depth/type "
        "heuristic; llm-compressor itself pins transformers <= 5.17 and has no allocator in its model-free "
        "path, so it is not run). Mean KLD (nats per token), bold: the lowest per row; then 99th percentile "
        "and same-top-token rate of nsds / higgs. These windows resolve differences of roughly 10 % "
        "(docs/PROTOCOL.md): a margin of a few percent is a tie.",
        "",
    ]
    for model in dict.fromkeys(c["model"] for c in cells):
        for text in dict.fromkeys(c["text"] for c in cells if c["model"] == model):
            parts += [
                f"### {model}, `{text}`",
                "",
                "| bits | nsds | higgs | uniform | nsds vs higgs | 99% KLD: nsds / higgs | same top: nsds / higgs "
                "| PPL: nsds / higgs |",
                "|---|---|---|---|---|---|---|---|",
            ]
            for c in cells:
                if c["model"] != model or c["text"] != text:
                    continue
                nsds, higgs = c["rows"]["nsds"], c["rows"]["higgs"]
                parts.append(
                    f"| {c['budget']:g} | " + " | ".join(_kld_cells({k: c["rows"][k] for k in CT_ROWS})) + " | "
                    f"{100 * (nsds['kld'] / higgs['kld'] - 1):+.1f} % | {nsds['kld_p99']:.3f} / {higgs['kld_p99']:.3f} "
                    f"| {100 * nsds['same_top']:.1f} / {100 * higgs['same_top']:.1f} % | {nsds['ppl']:.2f} / "
                    f"{higgs['ppl']:.2f} |"
                )
            parts.append("")
    parts += [*(f"- {line}" for line in ct_summary(cells)), ""]
    return parts


def readme_kld_table() -> str:
    """The README's table: one row per preset, one column per model x held-out text, each cell the mean KLD of
    the preset without / with a brown-tune / with the self-made importance matrix, and of nsds's file; then
    the contest's summary lines."""
    saved = _contest()
    if saved is None:
        return ""
    names = {"smollm2": "SmolLM2", "gemma3-270m": "Gemma-3"}
    cells = saved["cells"]
    columns = list(dict.fromkeys((c["model"], c["text"]) for c in cells))
    by_key = {(c["model"], c["text"], c["preset"]): c for c in cells}
    rows: dict[tuple[str, ...], list[str]] = {}  # a row's cells -> the presets that give them (same files)
    for preset in dict.fromkeys(c["preset"] for c in cells):
        shown = []
        for model, text in columns:
            cell = by_key.get((model, text, preset))
            shown.append(
                "-" if cell is None else " / ".join(_kld_cells({k: cell["rows"].get(k) for k in CONTEST_ROWS}))
            )
        rows.setdefault(tuple(shown), []).append(preset)
    lines = ["| preset | " + " | ".join(f"{names.get(m, m)}, {t}" for m, t in columns) + " |",
             "|---|" + "---|" * len(columns)]  # fmt: skip
    lines += [f"| {' = '.join(presets)} | " + " | ".join(shown) + " |" for shown, presets in rows.items()]
    return "\n".join([*lines, "", *(f"- {line}" for line in imatrix_summary(cells))])


README_TABLE = (
    "<!-- generated by `python benchmarks/results.py --page-only --readme-table` from "
    "docs/results/imatrix-contest.json -->",
    "<!-- end of the generated table -->",
)


def readme_with_table(readme: str) -> str:
    """The README with the text between its README_TABLE markers replaced by `readme_kld_table()`."""
    start, end = readme.index(README_TABLE[0]) + len(README_TABLE[0]), readme.index(README_TABLE[1])
    return f"{readme[:start]}\n{readme_kld_table()}\n{readme[end:]}"


def module_oracle_section() -> list[str]:
    """Rank correlations with the module-level oracle (benchmarks/module_oracle.py outputs)."""
    parts = []
    for path in sorted((DOCS / "results").glob("module-oracle-*.json")):
        saved = json.loads(path.read_text())
        settings, models = saved["settings"], saved["models"]
        names = list(models[0]["correlations"])
        parts += [
            f"### `{settings['text']}`, {settings['quantizer']} at {settings['bits']} bits ({settings['tokens']} "
            f"tokens; {path.name})",
            "",
            "| model | groups | " + " | ".join(f"{n}: rho / tau" for n in names) + " |",
            "|---|---|" + "---|" * len(names),
        ]
        for found in models:
            cells = [f"{c['spearman']:+.2f} / {c['kendall']:+.2f}" for c in found["correlations"].values()]
            parts.append(f"| {found['model']} | {len(found['groups'])} | " + " | ".join(cells) + " |")
        parts += ["", "Spearman rho within each role (groups of one role across layers):", "",
                  "| model | role | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]  # fmt: skip
        for found in models:
            for role, by_name in found["within_role_spearman"].items():
                parts.append(
                    f"| {found['model']} | {role} | " + " | ".join(f"{v:+.2f}" for v in by_name.values()) + " |"
                )
        parts.append("")
    if parts:
        parts = [
            "## The module-level oracle",
            "",
            "Each width group (a layer's q/k/v, o, gate/up or down) alone at the low width, every other weight "
            "the reference's; the perplexity it gives is that group's measured sensitivity. Ranked against it: "
            "`error`'s predicted loss with only that group at that width (docs/METHOD.md §9), "
            "HIGGS's (relative errors summed), the output-error energy (n x relative error) and, for reference, "
            "the NSDS paper's layer score (every group of a layer shares it: layer-level ranking). "
            "`python benchmarks/module_oracle.py`.",
            "",
            *parts,
        ]
    return parts


def page(runs: dict[str, CompareResult]) -> str:
    first = next(iter(runs.values()))
    protocol = first.protocol
    parts = [
        "# Results: NSDS against the alternatives, measured the same way",
        "",
        "Generated by `python benchmarks/results.py` from `docs/results/<model>/compare.json`; do not edit by hand.",
        "",
        "## Protocol",
        "",
        f"- Text: {protocol.describe()} (the same windows for every plan of a model).",
        "- Reference weights: the models come as 4-bit GGUF files (SmolLM2 Q4_1, Gemma-3 Q4_K_M), loaded by "
        "transformers and dequantized to float32. The 'reference' is those dequantized 4-bit weights, not the "
        "original bf16 checkpoint; every quantized plan re-quantizes them.",
        "- Budgets 2.5 / 3.0 / 3.5 average weight bits, over the paper's 2/4 mix and over 2/3/4 bits; every plan "
        "is at or just below the budget (achieved bits in each cell). Token embedding and output head keep the "
        "checkpoint's precision.",
        "- Quantizers: RTN (asymmetric min/max, group-wise) and HQQ (its own optimiser, data-free); group size "
        f"{first.config.group_size}. q/k/v and gate/up share a width (fused runtimes need it).",
        "- Scored plans use the paper's top-k rule on layer scores with two widths, and the exact knapsack "
        "(parameter-weighted, error ~ score x 4^-bits) with three; `uniform` is one width everywhere when the "
        "budget is a width (3.0 -> all 3-bit) and otherwise high-width layers spread evenly over depth; `llama.cpp` "
        "is llama.cpp's mixture rule (attn_v and ffn_down first, on its `use_more_bits` layers) filled to the budget; "
        "`random` ranks layers at random (seeds 0-4).",
        "- The top-k rule moves whole layers, so its plans land at or just below the budget (2.47 of 2.5 bits on "
        "SmolLM2's 30 layers); llama.cpp's rule moves module groups and lands closer (2.50). Each cell shows the "
        "achieved bits.",
        "- Oracle: the PPL with one layer alone at 2 bits; Spearman's rho and Kendall's tau-b of every scorer's "
        "layer scores against it (positive = the scorer ranks the harmful layers high).",
        "- These are 135M / 270M models: at 2.5-3 bits data-free quantization destroys them (PPL in the "
        "hundreds or thousands). What is measured is the ranking of allocators at equal bits, not usable models.",
        "- Every `error` row is today's default (with its Fisher model): the compare folders were rerun on "
        "2026-12-02 reusing their earlier compare.json, so only the plans the Fisher model changed were "
        "evaluated again (12 of the 17 preset plans; none in the paper-range tables, where the uniform plan's "
        "predicted loss is above the Fisher model's range and the plans are unchanged).",
        "- The GGUF compare folders (`*-gguf`) predate two changes to the GGUF job: its importance matrix "
        "(they round without one) and its Fisher step's text, written by llama-completion since 2026-12-07 "
        "(before, transformers sampled on the loaded model). The contest below is measured with today's job.",
        "",
    ]
    paper = {folder: result for folder, result in runs.items() if "gguf" not in result.quantizers}
    gguf = {folder: result for folder, result in runs.items() if "gguf" in result.quantizers}
    parts += ["## At a glance", "", *tally(paper), *gguf_glance(gguf), ""]
    parts += contest_section()
    parts += ct_section()
    parts += allocators_section()
    parts += module_oracle_section()
    for folder, result in paper.items():
        parts.append(model_section(result, folder))
    for folder, result in gguf.items():
        parts.append(gguf_section(result, folder))
    return "\n".join(parts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--page-only", action="store_true", help="re-render from compare.json, run nothing")
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--group-size", type=int, default=GROUP_SIZE)
    parser.add_argument("--readme-table", action="store_true", help="also write the README's results table")
    args = parser.parse_args()
    runs = {}
    settings_by_suffix = {
        suffix: {"widths": widths, "group_size": args.group_size} for suffix, widths in WIDTHS.items()
    } | {"-gguf": GGUF_SETTINGS}
    for suffix, settings in settings_by_suffix.items():
        for model in args.models:
            out = DOCS / "results" / f"{model}{suffix}"
            if not args.page_only:
                compare(CompareConfig(model=model, out=out, device="cpu", tokens=args.tokens, **settings))
            path = out / "compare.json"
            if not path.exists():
                print(f"results: no {path}; run without --page-only first", file=sys.stderr)
                return 2
            runs[out.name] = CompareResult.load(path)
            if args.page_only:
                write_outputs(runs[out.name], out)
    write_bytes(DOCS / "RESULTS.md", page(runs).encode())
    print(f"wrote {DOCS / 'RESULTS.md'}")
    if args.readme_table:
        write_bytes(ROOT / "README.md", readme_with_table((ROOT / "README.md").read_text()).encode())
        print(f"wrote the results table in {ROOT / 'README.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
