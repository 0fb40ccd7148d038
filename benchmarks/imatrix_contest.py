"""The contest users care about: at every llama.cpp preset's file size, on held-out texts of other domains
than any calibration text, the KL divergence of each file's next-token distribution from the source GGUF's
(llama-perplexity --kl-divergence: mean with its standard error, 99th percentile, same top token; PPL beside),
for four files:

- `preset`: llama.cpp's preset without an importance matrix (none for the presets llama-quantize writes only
  with one: IQ1, IQ2);
- `preset+brown`: the preset with an importance matrix from real text (llama-imatrix with its defaults on
  brown-tune, but 128 chunks of 512 tokens, eight times the self-made matrix's text and as many as common
  calibration files hold, instead of all 1,400: what a user with calibration text makes);
- `preset+self`: the preset with nsds's importance matrix of the model's own text (no data);
- `nsds`: nsds's default GGUF job, no data (`nsds run MODEL --quantizer gguf --budget PRESET --export`, its
  model.gguf: no larger than the preset's file; its candidates are the k-quants at a k-quant preset, every
  type, i-quants too, at an i-quant one).

    python benchmarks/imatrix_contest.py --models smollm2,gemma3-270m --texts moby-dick,lodash \\
        [--presets Q2_K,Q3_K_M] [--chunks 16] [--out docs/results/imatrix-contest.json]

Cells already in `--out` with the same settings are kept (a rerun measures only what is missing); `--rows`
measures only those rows again (e.g. `nsds` after a change to the allocator). The brown-tune matrix is
kept in the nsds cache (`contest/`), the self-made one where `nsds run` keeps it.
"""

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

if not sys.stderr.isatty():
    os.environ.setdefault("TQDM_DISABLE", "1")  # read when tqdm is imported, so before nsds/transformers are

from nsds import assets, gguf_tools, importance, runtime
from nsds.config import RunConfig
from nsds.evaluate.text import load_text
from nsds.files import cache_dir, sha256_file, write_bytes, write_json
from nsds.pipeline import run
from nsds.quantize.gguf import GGUF

ROWS = ("preset", "preset+brown", "preset+self", "nsds")
CONTEXT = 512
CALIBRATION_CHUNKS = 128  # all of brown-tune would take ~47 minutes on SmolLM2 on 2 cores
SCHEMA = "nsds.imatrix-contest/1"


def calibration_matrix(base: Path, model_id: str) -> Path:
    """llama-imatrix with its defaults (-c 512) on CALIBRATION_CHUNKS chunks of brown-tune, once per model file."""
    folder = cache_dir() / "contest"
    target = folder / f"{model_id}-{sha256_file(base)[:12]}-brown-tune-{CALIBRATION_CHUNKS}{importance.SUFFIX}"
    if not target.is_file():
        text = folder / "brown-tune.txt"
        if not text.is_file():
            write_bytes(text, load_text("brown-tune").encode("utf-8"))
        print(f"{model_id}: importance matrix of brown-tune (llama-imatrix, {CALIBRATION_CHUNKS} chunks)", flush=True)
        gguf_tools.make_imatrix(base, text, target, CONTEXT, CALIBRATION_CHUNKS)
    return target


def files_of(model_id: str, base: Path, preset: str, rows: tuple[str, ...], folder: Path) -> dict[str, Path]:
    """The contest's files at one preset (only `rows`)."""
    found = {}
    matrices = {"preset": None, "preset+brown": calibration_matrix(base, model_id) if "preset+brown" in rows else None,
                "preset+self": importance.self_made(base).path if "preset+self" in rows else None}  # fmt: skip
    for label in ("preset", "preset+brown", "preset+self"):
        if label in rows and (matrices[label] is not None or preset not in runtime.PRESETS_NEEDING_IMPORTANCE):
            found[label] = folder / f"{label}.gguf"
            gguf_tools.quantize_gguf(base, found[label], preset, imatrix=matrices[label])
    if "nsds" in rows:
        out = folder / "nsds"
        run(RunConfig(model=model_id, quantizer="gguf", budget=preset, baselines=(), tokens=1024, export=True,
                      out=out))  # fmt: skip
        found["nsds"] = out / "model.gguf"
    return found


def measure(model_id: str, texts: list[str], presets: list[str], rows: tuple[str, ...], chunks: int,
            saved: dict[tuple, dict]) -> Iterator[dict]:  # fmt: skip
    """Every cell (text x preset) of one model, each as soon as it is measured; rows not in `rows` kept from
    `saved`."""
    base = assets.path(model_id)
    with tempfile.TemporaryDirectory(prefix="nsds-contest-") as tmp:
        work = Path(tmp)
        logits = {}
        for text in texts:
            (work / text).mkdir()
            source = runtime.text_file(load_text(text), chunks * CONTEXT, work / text)
            logits[text] = work / f"{text}.kld"
            base_ppl = gguf_tools.kld_base(base, source, logits[text], CONTEXT, chunks).ppl
            print(f"{model_id} {text}: source GGUF PPL {base_ppl:.3f}", flush=True)
        for preset in presets:
            todo = tuple(r for r in ROWS if r in rows or any(r not in saved.get((model_id, t, preset), {}).get(
                "rows", {}) for t in texts))  # fmt: skip
            folder = work / preset
            folder.mkdir()
            files = files_of(model_id, base, preset, todo, folder)
            for text in texts:
                kept = saved.get((model_id, text, preset), {}).get("rows", {})
                found = {}
                for label in ROWS:
                    if label in files:
                        d = gguf_tools.kl_divergence(files[label], logits[text], CONTEXT)
                        found[label] = {"kld": d.mean, "kld_stderr": d.mean_stderr, "kld_p99": d.p99,
                                        "same_top": d.same_top, "ppl": d.ppl,
                                        "bytes": files[label].stat().st_size}  # fmt: skip
                    elif label in kept:
                        found[label] = kept[label]
                yield {"model": model_id, "text": text, "preset": preset, "rows": found}
                shown = "  ".join(f"{k} {v['kld']:.4f}" for k, v in found.items())
                print(f"{model_id:12s} {text:10s} {preset:7s} {shown}", flush=True)
            for path in folder.glob("*.gguf"):
                path.unlink()


def summary(cells: list[dict]) -> list[str]:
    """How nsds's default does against the calibrated preset and the plain one, over the distinct cells (two
    presets whose files measure the same on a model, as Q2_K and Q3_K_S on SmolLM2, count once)."""
    cells = list(
        {(c["model"], c["text"], *(round(r["kld"], 6) for r in c["rows"].values())): c for c in cells}.values()
    )
    if not cells:
        return []
    # the preset reproduces the source file (llama-perplexity prints 0, or -0 from rounding)
    exact = [c for c in cells if c["rows"]["preset+brown"]["kld"] <= 0]
    rated = [c for c in cells if c not in exact]
    relative = [c["rows"]["nsds"]["kld"] / c["rows"]["preset+brown"]["kld"] - 1 for c in rated]
    wins = sum(r < 0 for r in relative)
    unweighted = [c for c in cells if "preset" in c["rows"]]  # IQ1/IQ2 presets are only made with an imatrix
    plain = sum(c["rows"]["nsds"]["kld"] < c["rows"]["preset"]["kld"] for c in unweighted)
    own = [c["rows"]["preset+self"]["kld"] / c["rows"]["preset+brown"]["kld"] - 1 for c in rated]
    lines = [
        f"nsds (no data) below the preset with a brown-tune imatrix in {wins} of {len(cells)} distinct cells"
        + (f", mean KLD {100 * sum(relative) / len(relative):+.1f} % ({100 * min(relative):+.1f} .. "
           f"{100 * max(relative):+.1f} %)" if relative else ""),
        *(f"{c['model']} {c['text']} {c['preset']}: the preset reproduces the source file (KLD 0); nsds "
          f"{c['rows']['nsds']['kld']:.4f}" for c in exact),
        f"nsds below the preset without an imatrix in {plain} of {len(unweighted)} cells",
    ]  # fmt: skip
    if own:
        lines.append(
            f"the preset with the self-made imatrix vs with brown-tune's: mean KLD {100 * sum(own) / len(own):+.1f} %"
        )
    groups = {model: [c for c in cells if c["model"] == model] for model in dict.fromkeys(c["model"] for c in cells)}
    groups |= {
        family: [c for c in cells if c["preset"] in presets]
        for family, presets in (("k-quant presets", runtime.K_PRESETS), ("i-quant presets", runtime.I_PRESETS))
    }
    for group, mine in groups.items():
        won = [c["rows"]["nsds"]["kld"] / c["rows"]["preset+brown"]["kld"] - 1 for c in mine if c in rated]
        if won:
            lines.append(f"{group}: nsds below preset+brown in {sum(r < 0 for r in won)} of {len(mine)}, mean KLD "
                         f"{100 * sum(won) / len(won):+.1f} %")  # fmt: skip
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="smollm2,gemma3-270m")
    parser.add_argument("--texts", default="moby-dick,lodash")
    parser.add_argument("--presets", default=",".join(runtime.PRESETS))
    parser.add_argument("--chunks", type=int, default=16, help="chunks of 512 tokens (llama-perplexity scores "
                        "the second half of each)")  # fmt: skip
    parser.add_argument("--rows", default="", help="rows to measure again even when --out holds them")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    started = time.perf_counter()
    texts, presets = args.texts.split(","), args.presets.split(",")
    settings = {"chunks": args.chunks, "context": CONTEXT, "widths": list(GGUF.default_widths),
                "self_tokens": importance.DEFAULT_TOKENS, "calibration_chunks": CALIBRATION_CHUNKS}  # fmt: skip
    saved = json.loads(args.out.read_text()) if args.out and args.out.exists() else {"settings": None, "cells": []}
    kept = {(c["model"], c["text"], c["preset"]): c for c in saved["cells"] if saved["settings"] == settings}
    rows = tuple(r for r in args.rows.split(",") if r)
    found, lines = [], []
    for cell in (
        c for model_id in args.models.split(",") for c in measure(model_id, texts, presets, rows, args.chunks, kept)
    ):
        found.append(cell)
        fresh = {(c["model"], c["text"], c["preset"]) for c in found}
        cells = [c for key, c in kept.items() if key not in fresh] + found
        order = {p: i for i, p in enumerate(runtime.PRESETS)}
        cells.sort(key=lambda c: (c["model"] != "smollm2", c["model"], c["text"], order.get(c["preset"], 99)))
        lines = summary(cells)
        if args.out:  # after every cell: a long run keeps what it measured
            write_json(args.out, {"schema": SCHEMA, "settings": settings, "cells": cells, "summary": lines})
    print("\n".join(lines))
    print(f"{time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
