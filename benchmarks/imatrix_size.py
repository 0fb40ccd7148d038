"""How much of its own text the model must write for its importance matrix (`--imatrix-tokens`): llama.cpp's
preset quantized with the self-made matrix of 2048 ... 32768 tokens, judged by llama-perplexity's KL
divergence from the source GGUF on a held-out text, beside the preset without a matrix.

    python benchmarks/imatrix_size.py --model smollm2 --presets Q3_K_M,Q4_K_M --text moby-dick \\
        [--sizes 2048,8192,32768] [--chunks 16]

Prints one row per preset: the mean KLD (and its standard error) with no matrix and with each size.
The matrices are kept in the nsds cache, where `nsds run` finds them.
"""

import argparse
import tempfile
import time
from pathlib import Path

from nsds import assets, gguf_tools, importance, runtime
from nsds.evaluate.text import load_text

CONTEXT = 512


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--presets", default="Q3_K_M,Q4_K_M")
    parser.add_argument("--text", default="moby-dick")
    parser.add_argument("--sizes", default="2048,8192,32768")
    parser.add_argument("--chunks", type=int, default=16)
    args = parser.parse_args()
    started = time.perf_counter()
    base = assets.path(args.model)
    sizes = [int(s) for s in args.sizes.split(",")]
    matrices = {size: importance.self_made(base, size).path for size in sizes}
    print(f"{args.model}, {args.text}, {args.chunks} chunks of {CONTEXT}; mean KLD +/- standard error")
    print(f"{'preset':8s} {'none':>16s} " + " ".join(f"{size:>16d}" for size in sizes))
    with tempfile.TemporaryDirectory(prefix="nsds-imatrix-size-") as tmp:
        work = Path(tmp)
        text = runtime.text_file(load_text(args.text), args.chunks * CONTEXT, work)
        logits = work / "base.kld"
        gguf_tools.kld_base(base, text, logits, CONTEXT, args.chunks)
        for preset in args.presets.split(","):
            row = []
            for matrix in [None, *matrices.values()]:
                path = work / f"{preset}.gguf"
                gguf_tools.quantize_gguf(base, path, preset, imatrix=matrix)
                found = gguf_tools.kl_divergence(path, logits, CONTEXT)
                row.append(f"{found.mean:.4f} +/- {found.mean_stderr:.4f}")
            print(f"{preset:8s} " + " ".join(f"{cell:>16s}" for cell in row), flush=True)
    print(f"{time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
