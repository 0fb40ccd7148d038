"""Markdown report and PNG figures of a run, rendered in memory (the pipeline writes them at the end)."""

import io
from typing import Any

from matplotlib.figure import Figure  # the object API: no pyplot state, no display backend
from matplotlib.patches import Patch

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
