"""How many tokens resolve a 2 % difference in mean KL divergence between two quantized models (docs/PROTOCOL.md
§2): two GGUF plans of similar quality (llama.cpp's preset and nsds's default at the preset's size, both rounded
by the model's own importance matrix), evaluated in process on the same windows; the standard error of their
mean KLD's relative difference, from the spread of the per-window differences (windows, not tokens, are the
independent units: tokens of one window share their context).

    python benchmarks/kld_resolution.py --models smollm2,gemma3-270m [--preset Q4_K_M] [--text brown-test] \\
        [--tokens 32768]

Prints, per model, each plan's mean KLD, the relative difference with its standard error, and the tokens at
which two standard errors of a paired difference fall to 2 % of the mean KLD.
"""

import argparse
import math
import os
import sys
import tempfile
from pathlib import Path

if not sys.stderr.isatty():
    os.environ.setdefault("TQDM_DISABLE", "1")  # read when tqdm is imported, so before nsds/transformers are

import numpy as np

from nsds.config import RunConfig
from nsds.evaluate.divergence import ReferenceLogProbs
from nsds.pipeline import log_probs, plans_for_run, prepare_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="smollm2,gemma3-270m")
    parser.add_argument("--preset", default="Q4_K_M")
    parser.add_argument("--text", default="brown-test")
    parser.add_argument("--tokens", type=int, default=32768)
    args = parser.parse_args()
    for model_id in args.models.split(","):
        cfg = RunConfig(model=model_id, quantizer="gguf", budget=args.preset, widths=(2, 3, 4, 5, 6, 8),
                        baselines=(), text=args.text, tokens=args.tokens)  # fmt: skip
        with tempfile.TemporaryDirectory(prefix="nsds-kld-resolution-") as tmp:
            job = prepare_run(cfg, Path(tmp))
            plans = plans_for_run(cfg, job)
            reference = ReferenceLogProbs(Path(tmp))
            reference.record(job.loaded.windows, log_probs(job, None, "reference"))
            found = {}
            for label in ("nsds", args.preset):
                found[label] = reference.compare(job.loaded.windows, log_probs(job, plans[label], label))
            reference.close()
        a, b = (np.array(found[label].window_klds) for label in ("nsds", args.preset))
        windows = a.size
        mean = (a.mean() + b.mean()) / 2
        spread = np.std(a - b, ddof=1)
        relative = (a.mean() - b.mean()) / b.mean()
        stderr = spread / math.sqrt(windows) / mean
        per_window = job.loaded.protocol.window - 1
        needed = math.ceil((2 * spread / (0.02 * mean)) ** 2) * per_window
        print(f"{model_id}: {windows} windows of {per_window} scored tokens on {args.text}; mean KLD nsds "
              f"{a.mean():.4f}, {args.preset} {b.mean():.4f}; difference {100 * relative:+.2f} % +/- "
              f"{100 * stderr:.2f} % (one standard error); a 2 % difference is two standard errors at "
              f"{needed} tokens", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
