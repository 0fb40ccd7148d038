"""Markdown reports and PNG figures of run and compare results, rendered in memory from the typed
result objects (the commands write them; a saved results file re-renders without torch)."""

import io
from pathlib import Path

from matplotlib.figure import Figure  # the object API: no pyplot state, no display backend
from matplotlib.patches import Patch

from nsds.config import RunConfig
from nsds.evaluate.oracle import average_ranks
from nsds.plan import Plan
from nsds.results import CompareResult, Correlation, RunResult, SummaryRow, data_free_best, display_order, is_ablation
from nsds.scores import ScoreReport

_WIDTH_COLOURS = {1: "#7f0000", 2: "#d7301f", 3: "#fc8d59", 4: "#4575b4", 5: "#74add1", 6: "#1a9850", 8: "#006837"}


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    return buffer.getvalue()


def scores_figure(scores: ScoreReport, plan: Plan) -> bytes:
    """Per-layer NSDS score, each bar coloured by the width the plan gave that layer."""
    layer_bits = plan.layer_bits()
    figure = Figure(figsize=(max(6, 0.28 * len(layer_bits)), 3.2))
    axes = figure.subplots()
    colours = [_WIDTH_COLOURS.get(round(b), "#999999") if b == round(b) else "#999999" for b in layer_bits]
    axes.bar(range(len(layer_bits)), scores.scores, color=colours)
    legend = [
        Patch(color=_WIDTH_COLOURS.get(w, "#999999"), label=f"{w}-bit")
        for w in sorted({round(b) for b in layer_bits if b == round(b)})
    ]
    if any(b != round(b) for b in layer_bits):
        legend.append(Patch(color="#999999", label="mixed widths"))
    axes.set_xlabel("layer")
    axes.set_ylabel("NSDS score")
    axes.set_title(
        f"{scores.model['id']}: sensitivity and assigned width ({plan.allocator}, {plan.weight_bits:.2f} bits)"
    )
    axes.legend(handles=legend, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    return _png(figure)


def _text_name(text: str) -> str:
    """A text's name for titles and labels: a file path shortened to the file's name."""
    return Path(text).name


def ppl_figure(run: RunResult) -> bytes:
    """Perplexity of each evaluated plan, labelled with its bits per weight."""
    evaluations = run.evaluations
    figure = Figure(figsize=(5, 3.2))
    axes = figure.subplots()
    labels = [e.label + (f"\n{e.weight_bits:.2f} b" if e.weight_bits is not None else "") for e in evaluations]
    axes.bar(labels, [e.ppl for e in evaluations], color=["#999999", "#4575b4", "#fc8d59"][: len(evaluations)])
    for i, e in enumerate(evaluations):
        axes.text(i, e.ppl, f"{e.ppl:.1f}", ha="center", va="bottom", fontsize=9)
    axes.set_ylabel("perplexity")
    axes.set_title(_text_name(run.protocol.text) + " perplexity")
    return _png(figure)


def _bits(e) -> str:
    if e.weight_bits is None:
        return "as loaded | as loaded"
    return f"{e.weight_bits:.3f} | {e.storage_bits:.3f}"


def _grid(config) -> str:
    if config.quantizer == "gguf":
        return " (llama.cpp's own types and numerics)"
    group = "default" if config.group_size is None else config.group_size
    return f" ({'symmetric' if config.symmetric else 'asymmetric'}, group size {group})"


def _budget(budget: float | str) -> str:
    return f"{budget} bits/weight" if isinstance(budget, float) else f"the size of llama.cpp's {budget}"


def _formats(plan: Plan) -> str:
    counts: dict[str, int] = {}
    for m in plan.modules:
        counts[m.format] = counts.get(m.format, 0) + 1
    return ", ".join(f"{name} ({count} modules)" for name, count in sorted(counts.items()))


def _kld_cells(kld: float | None, p99: float | None, same_top: float | None) -> str:
    return " - | - | - |" if kld is None else f" {kld:.4f} | {p99:.4f} | {100 * same_top:.1f} % |"


def _runtime_cells(e) -> str:
    if e.runtime is None:
        return ""
    r = e.runtime
    return f"{_kld_cells(r.kld, r.kld_p99, r.same_top)} {r.ppl:.3f} | {r.file_bytes / 1e6:.2f} |"


def _agreement(run: RunResult) -> str:
    """How closely llama-perplexity and nsds agree on each plan's cost (PPL over the reference's)."""
    reference = run.evaluation("reference")
    if reference.runtime is None:
        return ""
    ratios = [
        f"{e.label} {e.ppl / reference.ppl:.3f} vs {e.runtime.ppl / reference.runtime.ppl:.3f}"
        for e in run.evaluations[1:]
        if e.runtime is not None
    ]
    return (
        f"\nllama.cpp PPL: `llama-perplexity` on each plan's GGUF file ({reference.runtime.chunks} chunks of "
        f"{reference.runtime.context} tokens of the same text, each scored on its second half). The cost of each "
        f"plan, PPL over the reference's, by nsds vs by llama.cpp: {'; '.join(ratios)}.\n"
    )


def _importance(config: RunConfig) -> str:
    if config.imatrix in (None, "none"):
        return ""
    made = (f"made by llama-imatrix on {config.imatrix_tokens} tokens of text the model wrote itself (no data)"
            if config.imatrix == "self" else f"'{config.imatrix}'")  # fmt: skip
    return f"\n- Every file and every module is rounded by an importance matrix {made}."


def render(run: RunResult, scores: ScoreReport, plan: Plan) -> tuple[str, dict[str, bytes]]:
    """report.md's text and its figures {file name: PNG bytes}."""
    config = run.config
    rows = "\n".join(
        f"| {e.label} | {e.allocator or '-'} | {_bits(e)} | {e.ppl:.3f} |{_kld_cells(e.kld, e.kld_p99, e.same_top)}"
        f"{_runtime_cells(e)} {e.seconds:.1f} s |"
        for e in run.evaluations
    )
    measured = any(e.runtime for e in run.evaluations)
    runtime_header = " llama.cpp KLD | 99 % | same top | llama.cpp PPL | file MB |" if measured else ""
    high = [i for i, b in enumerate(plan.layer_bits()) if b == max(plan.widths)]
    text = f"""# nsds run: {run.model["id"]}

- Quantizer: **{config.quantizer}**{_grid(config)}; budget **{_budget(config.budget)}** \
({config.budget_counts}) over widths {list(config.widths)}, allocator `{config.allocator}`; {plan.embeddings}.
- nsds's plan stores its modules as {_formats(plan)}; storage bits count every scale and zero \
point.{_importance(config)}
- Perplexity protocol: {run.protocol.describe()}.
- {run.reference_note}.

| plan | allocator | weight bits | storage bits | PPL | KLD | 99 % KLD | same top |{runtime_header} eval time |
|---|---|---|---|---|---|---|---|{"---|---|---|---|---|" if measured else ""}---|
{rows}

KLD: the KL divergence of the plan's next-token distribution from the reference's on the same windows (nats per
token): its mean, 99th percentile, and how often the most likely next token is the reference's.
{_agreement(run)}
Layers entirely at {max(plan.widths)} bits in nsds's plan: {high}.

![NSDS scores and widths](scores.png)

![Perplexity by plan](ppl.png)

Timing: load {run.timing["load_s"]:.1f} s, scoring {run.timing["score_s"]:.1f} s, \
total {run.timing["total_s"]:.1f} s. nsds {run.nsds_version}, {run.created}.
"""
    return text, {"scores.png": scores_figure(scores, plan), "ppl.png": ppl_figure(run)}


# --- nsds compare -------------------------------------------------------------------------------------------


def _rows(result: CompareResult, quantizer: str) -> dict[str, dict[float, SummaryRow]]:
    rows: dict[str, dict[float, SummaryRow]] = {}
    for row in result.summary:
        if row.quantizer == quantizer:
            rows.setdefault(row.label, {})[row.budget] = row
    return {label: rows[label] for label in display_order(list(rows))}


def ppl_vs_budget_figure(result: CompareResult, quantizer: str) -> bytes:
    """PPL against budget for every allocator, and (when any ran) NSDS's ablations in a second panel; log scale."""
    rows = _rows(result, quantizer)
    main, ablations = [r for r in rows if not is_ablation(r)], [r for r in rows if is_ablation(r)]
    panels = [("allocators", main)] + ([("NSDS ablations", [*ablations, "nsds"])] if ablations else [])
    figure = Figure(figsize=(5.5 * len(panels), 4))
    grid = figure.subplots(1, len(panels), sharey=True, squeeze=False)[0]
    for axes, (title, labels) in zip(grid, panels, strict=True):
        for label in labels:
            if label not in rows:
                continue
            budgets = sorted(rows[label])
            ppl = [rows[label][b].ppl for b in budgets]
            style: dict = {"linewidth": 2.5, "color": "black"} if label == "nsds" else {}
            name = label
            if label == "oracle":
                style = {"color": "black", "linestyle": ":"}
            if label == "random":
                low = [rows[label][b].ppl_min for b in budgets]
                high = [rows[label][b].ppl_max for b in budgets]
                axes.fill_between(budgets, low, high, alpha=0.2, color="grey")
                style = {"color": "grey", "linestyle": "--"}
                name = f"random (mean, range of {rows['random'][budgets[0]].n} seeds)"
            axes.plot(budgets, ppl, marker="o", label=name, **style)
        axes.axhline(result.reference_ppl, color="green", linestyle=":", label="reference")
        axes.set_yscale("log")
        axes.set_xlabel(f"budget (average bits per weight, {'storage' if quantizer == 'gguf' else 'weights only'})")
        axes.legend(fontsize=7)
        axes.set_title(f"{result.model['id']} / {quantizer}: {title}" if axes is grid[0] else title)
    grid[0].set_ylabel(f"{_text_name(result.protocol.text)} perplexity")
    return _png(figure)


def _number(value: float | None, spec: str) -> str:
    """A correlation as text; "n/a" where it is undefined (a constant ranking)."""
    return "n/a" if value is None else format(value, spec)


def _correlation_title(name: str, corr: Correlation) -> str:
    return f"{name}: rho {_number(corr.spearman, '.2f')}, tau {_number(corr.kendall, '.2f')}"


def oracle_scatter_figure(result: CompareResult, quantizer: str) -> bytes:
    """Each scorer's layer scores against the oracle's single-layer PPL, with both rank correlations."""
    data = result.quantizers[quantizer]
    oracle = data.oracle.ppl
    names = list(data.scores)
    columns = min(4, len(names))
    rows = -(-len(names) // columns)
    figure = Figure(figsize=(3.2 * columns, 2.8 * rows))
    grid = figure.subplots(rows, columns, squeeze=False, sharey=True)
    for axes, name in zip(grid.flat, names, strict=False):
        # ranks on x: scores differ in scale by orders of magnitude (EWQ varies in its 6th decimal)
        axes.scatter(average_ranks(data.scores[name]), oracle, s=14)
        axes.set_yscale("log")
        axes.set_title(_correlation_title(name, data.correlations[name]), fontsize=9)
        axes.tick_params(labelsize=7, which="both")
    for axes in grid.flat[len(names) :]:
        axes.set_visible(False)
    figure.supylabel(f"PPL with one layer at {data.oracle.low_width} bits ({quantizer})")
    figure.supxlabel("rank of the layer's score (1 = lowest score)")
    return _png(figure)


def compare_figures(result: CompareResult) -> dict[str, bytes]:
    figures = {}
    for q in result.quantizers:
        figures[f"ppl-vs-budget-{q}.png"] = ppl_vs_budget_figure(result, q)
        figures[f"oracle-scatter-{q}.png"] = oracle_scatter_figure(result, q)
    return figures


def _ppl_cell(row: SummaryRow | None, best: bool) -> str:
    if row is None:
        return "-"
    text = f"{row.ppl:.1f}"
    if row.ppl_std is not None:
        text += f" ± {row.ppl_std:.1f} ({row.ppl_min:.1f}-{row.ppl_max:.1f})"
    text = f"**{text}**" if best else text
    return f"{text} <sub>{row.weight_bits:.2f} b</sub>"


def compare_tables(result: CompareResult, quantizer: str) -> str:
    """The PPL table of one quantizer (rows: allocators, columns: budgets; the lowest data-free PPL of each
    budget in bold, every tied allocator bold)."""
    rows = _rows(result, quantizer)
    budgets = sorted({b for by_budget in rows.values() for b in by_budget})
    best = {b: data_free_best(result.rows(quantizer, b))[1] for b in budgets}
    header = "| allocator | kind | " + " | ".join(result.budget_label(quantizer, b) for b in budgets) + " |"
    lines = [header, "|---|---|" + "---|" * len(budgets)]
    for label, by_budget in rows.items():
        kind = next(iter(by_budget.values())).kind
        cells = " | ".join(_ppl_cell(by_budget.get(b), label in best[b]) for b in budgets)
        lines.append(f"| {label} | {kind} | {cells} |")
    return "\n".join(lines)


# the plans nsds compare writes as GGUF files and measures with llama-perplexity
RUNTIME_LABELS = ("error", "nsds", "higgs", "llama.cpp preset", "llama.cpp", "uniform")


def runtime_table(result: CompareResult, quantizer: str) -> str:
    """llama-perplexity of the plans written as GGUF files (rows: allocators, columns: budgets; the lowest
    per budget in bold), or "" when none was measured."""
    rows = {label: {b: r for b, r in by_budget.items() if r.runtime_ppl is not None}
            for label, by_budget in _rows(result, quantizer).items() if label in RUNTIME_LABELS}  # fmt: skip
    rows = {label: by_budget for label, by_budget in rows.items() if by_budget}
    if not rows:
        return ""
    budgets = sorted({b for by_budget in rows.values() for b in by_budget})
    header = "| allocator | " + " | ".join(result.budget_label(quantizer, b) for b in budgets) + " |"
    lines = [header, "|---|" + "---|" * len(budgets)]
    for label, by_budget in rows.items():
        cells = []
        for b in budgets:
            row = by_budget.get(b)
            lowest = min(r[b].runtime_ppl for r in rows.values() if b in r)
            text = "-" if row is None else f"{row.runtime_ppl:.2f}"
            cells.append(f"**{text}**" if row is not None and row.runtime_ppl == lowest else text)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def correlation_table(result: CompareResult) -> str:
    quantizers = list(result.quantizers)
    names = list(next(iter(result.quantizers.values())).scores)
    header = "| scorer | " + " | ".join(f"{q}: Spearman rho | {q}: Kendall tau" for q in quantizers) + " |"
    lines = [header, "|---|" + "---|---|" * len(quantizers)]
    for name in names:
        values = []
        for q in quantizers:
            corr = result.quantizers[q].correlations[name]
            values += [_number(corr.spearman, "+.3f"), _number(corr.kendall, "+.3f")]
        lines.append(f"| {name} | " + " | ".join(values) + " |")
    return "\n".join(lines)


def quantizer_section(result: CompareResult, quantizer: str, heading: str = "##", figures: str = "") -> str:
    """One quantizer's PPL table, its oracle in a line, and its two figures (paths under `figures`)."""
    data = result.quantizers[quantizer]
    oracle = data.oracle.ppl
    worst = sorted(range(len(oracle)), key=lambda i: -oracle[i])[:5]
    model = result.model["id"]
    return "\n".join([
        f"{heading} {quantizer}: perplexity by allocator and budget",
        "",
        compare_tables(result, quantizer),
        "",
        *_runtime_part(result, quantizer),
        f"Oracle ({quantizer}, one layer at {data.oracle.low_width} bits): PPL {min(oracle):.1f} to "
        f"{max(oracle):.1f}; most sensitive layers " + ", ".join(f"{i} ({oracle[i]:.1f})" for i in worst) + ".",
        "",
        f"![{model} {quantizer}: PPL vs budget]({figures}ppl-vs-budget-{quantizer}.png)",
        "",
        f"![{model} {quantizer}: scores vs oracle]({figures}oracle-scatter-{quantizer}.png)",
    ])  # fmt: skip


def _runtime_part(result: CompareResult, quantizer: str) -> list[str]:
    table = runtime_table(result, quantizer)
    if not table:
        return []
    return [
        f"The same plans as GGUF files, measured by llama.cpp's `llama-perplexity` ({quantizer}; chunks of "
        f"{result.protocol.window} tokens over the same text, each scored on its second half; lowest in bold):",
        "",
        table,
        "",
    ]


def _grids(config) -> str:
    parts = []
    if any(q != "gguf" for q in config.quantizers):
        group = config.group_size or "default (128)"
        parts.append(f"group size {group}, {'symmetric' if config.symmetric else 'asymmetric'}")
    if "gguf" in config.quantizers:
        parts.append("gguf: llama.cpp's types (2=Q2_K ... 6=Q6_K, 8=Q8_0) and numerics (docs/GGUF.md)")
    return "; ".join(parts)


def _counts(config) -> str:
    if set(config.quantizers) == {"gguf"}:
        return "budgets count storage bits (block scales included; a preset's is its own size)"
    return "budgets count weight bits" + (" (gguf: storage)" if "gguf" in config.quantizers else "")


def compare_markdown(result: CompareResult, heading: str = "#") -> str:
    """compare.md: settings and protocol, one PPL table per quantizer, the oracle correlations."""
    config = result.config
    parts = [
        f"{heading} nsds compare: {result.model['id']}",
        "",
        f"- Widths {list(config.widths)}, allocator for scored plans `{result.allocator}`; {_grids(config)}; "
        f"{'q/k/v and gate/up share a width' if config.fuse else 'every module free'}; {_counts(config)} (the "
        "small <sub>b</sub> number is each plan's achieved average of weight bits).",
        f"- Perplexity protocol: {result.protocol.describe()}.",
        f"- Reference PPL {result.reference_ppl:.2f}: {result.reference_note}.",
        f"- Random: {config.seeds} seeds, mean ± std (min-max). Bold: lowest PPL per budget among the "
        "data-free allocators.",
        f"- Oracle: PPL with one layer at {min(config.widths)} bits, all others as loaded; the `oracle` row "
        "allocates by that measured ranking (not data-free: the reference a scorer aims at).",
    ]
    for q in result.quantizers:
        parts += ["", quantizer_section(result, q, heading + "#")]
    parts += ["", f"{heading}# Rank correlation with the oracle", "", correlation_table(result), ""]
    timing = result.timing
    parts += [
        "",
        f"Timing: load {timing['load_s']:.0f} s, total {timing['total_s']:.0f} s; "
        f"{result.counts.evaluated} evaluations run, {result.counts.reused} plans reused. "
        f"nsds {result.nsds_version}, {result.created}.",
        "",
    ]
    return "\n".join(parts)
