"""Markdown report and PNG figures of a run, rendered in memory (the pipeline writes them at the end)."""

import io
from typing import Any

from matplotlib.figure import Figure  # the object API: no pyplot state, no display backend
from matplotlib.patches import Patch

from nsds.compare import cell_rows, data_free_best
from nsds.evaluate.oracle import average_ranks
from nsds.plan import Plan
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


def ppl_figure(results: dict[str, Any]) -> bytes:
    """Perplexity of each evaluated plan, labelled with its bits per weight."""
    evaluations = results["evaluations"]
    figure = Figure(figsize=(5, 3.2))
    axes = figure.subplots()
    labels = [e["label"] + (f"\n{e['weight_bits']:.2f} b" if "weight_bits" in e else "") for e in evaluations]
    axes.bar(labels, [e["ppl"] for e in evaluations], color=["#999999", "#4575b4", "#fc8d59"][: len(evaluations)])
    for i, e in enumerate(evaluations):
        axes.text(i, e["ppl"], f"{e['ppl']:.1f}", ha="center", va="bottom", fontsize=9)
    axes.set_ylabel("perplexity")
    axes.set_title(results["protocol"]["text"] + " perplexity")
    return _png(figure)


def render(results: dict[str, Any], scores: ScoreReport, plan: Plan) -> tuple[str, dict[str, bytes]]:
    """report.md's text and its figures {file name: PNG bytes}."""
    config = results["config"]
    rows = "\n".join(
        f"| {e['label']} | {e['allocator'] or '-'} | "
        + (f"{e['weight_bits']:.3f} | {e['storage_bits']:.3f}" if "weight_bits" in e else "16/32 (as loaded) | -")
        + f" | {e['ppl']:.3f} | {e['seconds']:.1f} s |"
        for e in results["evaluations"]
    )
    high = [i for i, b in enumerate(plan.layer_bits()) if b == max(plan.widths)]
    text = f"""# nsds run: {results["model"]["id"]}

- Quantizer: **{config["quantizer"]}** ({"symmetric" if config["symmetric"] else "asymmetric"}), group size \
{config["group_size"]}; budget **{config["budget"]} bits/weight** over widths {list(config["widths"])}, \
allocator `{config["allocator"]}`; {plan.embeddings}.
- Perplexity protocol: {results["protocol"]["description"]}.
- {results["reference_note"]}.
- Storage bits count each group's scale and zero point ({plan.overhead_bits_per_group} bits per group).

| plan | allocator | weight bits | storage bits | PPL | eval time |
|---|---|---|---|---|---|
{rows}

Layers at {max(plan.widths)} bits in the NSDS plan: {high}.

![NSDS scores and widths](scores.png)

![Perplexity by plan](ppl.png)

Timing: load {results["timing"]["load_s"]:.1f} s, scoring {results["timing"]["score_s"]:.1f} s, \
total {results["timing"]["total_s"]:.1f} s. nsds {results["nsds_version"]}, {results["created"]}.
"""
    return text, {"scores.png": scores_figure(scores, plan), "ppl.png": ppl_figure(results)}


# --- nsds compare -------------------------------------------------------------------------------------------

_MAIN = ("nsds", "uniform", "llama.cpp", "random", "zd", "mse", "ewq", "kurtboost", "lieq", "oracle")


def _rows(results: dict[str, Any], quantizer: str) -> dict[str, dict[float, dict[str, Any]]]:
    rows: dict[str, dict[float, dict[str, Any]]] = {}
    for row in results["summary"]:
        if row["quantizer"] == quantizer:
            rows.setdefault(row["label"], {})[row["budget"]] = row
    order = [label for label in _MAIN if label in rows] + [label for label in rows if label not in _MAIN]
    return {label: rows[label] for label in order}


def ppl_vs_budget_figure(results: dict[str, Any], quantizer: str) -> bytes:
    """PPL against budget for every allocator (left) and for NSDS's ablations (right), log scale."""
    rows = _rows(results, quantizer)
    figure = Figure(figsize=(11, 4))
    panels = figure.subplots(1, 2, sharey=True)
    main, ablations = [r for r in rows if r in _MAIN], [r for r in rows if r not in _MAIN]
    for axes, labels in ((panels[0], main), (panels[1], ablations)):
        for label in labels + (["nsds"] if axes is panels[1] and "nsds" in rows else []):
            budgets = sorted(rows[label])
            ppl = [rows[label][b]["ppl"] for b in budgets]
            style = {"linewidth": 2.5, "color": "black"} if label == "nsds" else {}
            if label == "oracle":
                style = {"color": "black", "linestyle": ":"}
            if label == "random":
                low = [rows[label][b]["ppl_min"] for b in budgets]
                high = [rows[label][b]["ppl_max"] for b in budgets]
                axes.fill_between(budgets, low, high, alpha=0.2, color="grey")
                style = {"color": "grey", "linestyle": "--"}
                label = f"random (mean, range of {rows['random'][budgets[0]]['n']} seeds)"
            axes.plot(budgets, ppl, marker="o", label=label, **style)
        axes.axhline(results["reference_ppl"], color="green", linestyle=":", label="reference")
        axes.set_yscale("log")
        axes.set_xlabel("budget (average bits per weight, weights only)")
        axes.legend(fontsize=7)
    panels[0].set_ylabel(f"{results['protocol']['text']} perplexity")
    panels[0].set_title(f"{results['model']['id']} / {quantizer}: allocators")
    panels[1].set_title("NSDS ablations")
    return _png(figure)


def oracle_scatter_figure(results: dict[str, Any], quantizer: str) -> bytes:
    """Each scorer's layer scores against the oracle's single-layer PPL, with both rank correlations."""
    data = results["quantizers"][quantizer]
    oracle = data["oracle"]["ppl"]
    names = list(data["scores"])
    columns = min(4, len(names))
    rows = -(-len(names) // columns)
    figure = Figure(figsize=(3.2 * columns, 2.8 * rows))
    grid = figure.subplots(rows, columns, squeeze=False, sharey=True)
    for axes, name in zip(grid.flat, names, strict=False):
        corr = data["correlations"][name]
        # ranks on x: scores differ in scale by orders of magnitude (EWQ varies in its 6th decimal)
        axes.scatter(average_ranks(data["scores"][name]), oracle, s=14)
        axes.set_yscale("log")
        axes.set_title(f"{name}: rho {corr['spearman']:.2f}, tau {corr['kendall']:.2f}", fontsize=9)
        axes.tick_params(labelsize=7, which="both")
    for axes in grid.flat[len(names) :]:
        axes.set_visible(False)
    figure.supylabel(f"PPL with one layer at {data['oracle']['low_width']} bits ({quantizer})")
    figure.supxlabel("rank of the layer's score (1 = lowest score)")
    return _png(figure)


def compare_figures(results: dict[str, Any]) -> dict[str, bytes]:
    figures = {}
    for q in results["quantizers"]:
        figures[f"ppl-vs-budget-{q}.png"] = ppl_vs_budget_figure(results, q)
        figures[f"oracle-scatter-{q}.png"] = oracle_scatter_figure(results, q)
    return figures


def _ppl_cell(row: dict[str, Any] | None, best: bool) -> str:
    if row is None:
        return "-"
    text = f"{row['ppl']:.1f}"
    if row["ppl_std"] is not None:
        text += f" ± {row['ppl_std']:.1f} ({row['ppl_min']:.1f}-{row['ppl_max']:.1f})"
    text = f"**{text}**" if best else text
    return f"{text} <sub>{row['weight_bits']:.2f} b</sub>"


def compare_tables(results: dict[str, Any], quantizer: str) -> str:
    """The PPL table of one quantizer (rows: allocators, columns: budgets; best per budget in bold)."""
    rows = _rows(results, quantizer)
    budgets = sorted({b for by_budget in rows.values() for b in by_budget})
    best = {b: min(data_free_best(cell_rows(results, quantizer, b))[1]) for b in budgets}  # bold: one per column
    header = "| allocator | kind | " + " | ".join(f"{b:g} bits" for b in budgets) + " |"
    lines = [header, "|---|---|" + "---|" * len(budgets)]
    for label, by_budget in rows.items():
        kind = next(iter(by_budget.values()))["kind"]
        cells = " | ".join(_ppl_cell(by_budget.get(b), best[b] == label) for b in budgets)
        lines.append(f"| {label} | {kind} | {cells} |")
    return "\n".join(lines)


def correlation_table(results: dict[str, Any]) -> str:
    quantizers = list(results["quantizers"])
    names = list(next(iter(results["quantizers"].values()))["scores"])
    header = "| scorer | " + " | ".join(f"{q}: Spearman rho | {q}: Kendall tau" for q in quantizers) + " |"
    lines = [header, "|---|" + "---|---|" * len(quantizers)]
    for name in names:
        values = []
        for q in quantizers:
            corr = results["quantizers"][q]["correlations"][name]
            values += [f"{corr['spearman']:+.3f}", f"{corr['kendall']:+.3f}"]
        lines.append(f"| {name} | " + " | ".join(values) + " |")
    return "\n".join(lines)


def _quantizer_figures(results: dict[str, Any]) -> list[str]:
    return [f"{kind}-{q}.png" for q in results["quantizers"] for kind in ("ppl-vs-budget", "oracle-scatter")]


def quantizer_section(results: dict[str, Any], quantizer: str, heading: str = "##", figures: str = "") -> str:
    """One quantizer's PPL table, its oracle in a line, and its two figures (paths under `figures`)."""
    data = results["quantizers"][quantizer]
    oracle = data["oracle"]["ppl"]
    worst = sorted(range(len(oracle)), key=lambda i: -oracle[i])[:5]
    model = results["model"]["id"]
    return "\n".join([
        f"{heading} {quantizer}: perplexity by allocator and budget",
        "",
        compare_tables(results, quantizer),
        "",
        f"Oracle ({quantizer}, one layer at {data['oracle']['low_width']} bits): PPL {min(oracle):.1f} to "
        f"{max(oracle):.1f}; most sensitive layers " + ", ".join(f"{i} ({oracle[i]:.1f})" for i in worst) + ".",
        "",
        f"![{model} {quantizer}: PPL vs budget]({figures}ppl-vs-budget-{quantizer}.png)",
        "",
        f"![{model} {quantizer}: scores vs oracle]({figures}oracle-scatter-{quantizer}.png)",
    ])  # fmt: skip


def compare_markdown(results: dict[str, Any], figures: list[str], heading: str = "#") -> str:
    """compare.md: settings and protocol, one PPL table per quantizer, the oracle correlations, figures."""
    config = results["config"]
    parts = [
        f"{heading} nsds compare: {results['model']['id']}",
        "",
        f"- Widths {list(config['widths'])}, allocator for scored plans `{config['allocator']}`; group size "
        f"{config['group_size']}, {'symmetric' if config['symmetric'] else 'asymmetric'}; "
        f"{'q/k/v and gate/up share a width' if config['fuse'] else 'every module free'}; budgets count "
        "weight bits (the small <sub>b</sub> number is each plan's achieved average).",
        f"- Perplexity protocol: {results['protocol']['description']}.",
        f"- Reference PPL {results['reference_ppl']:.2f}: {results['reference_note']}.",
        f"- Random: {config['seeds']} seeds, mean ± std (min-max). Bold: lowest PPL per budget among the "
        "data-free allocators.",
        f"- Oracle: PPL with one layer at {min(config['widths'])} bits, all others as loaded; the `oracle` row "
        "allocates by that measured ranking (not data-free: the reference a scorer aims at).",
    ]
    for q in results["quantizers"]:
        parts += ["", quantizer_section(results, q, heading + "#")]
    parts += ["", f"{heading}# Rank correlation with the oracle", "", correlation_table(results), ""]
    parts += [f"![{name}]({name})" for name in figures if name not in _quantizer_figures(results)]
    timing = results["timing"]
    parts += [
        "",
        f"Timing: load {timing['load_s']:.0f} s, total {timing['total_s']:.0f} s; "
        f"{results['counts']['evaluated']} evaluations run, {results['counts']['reused']} plans reused. "
        f"nsds {results['nsds_version']}, {results['created']}.",
        "",
    ]
    return "\n".join(parts)
