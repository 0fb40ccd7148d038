"""Memory and time of the default GGUF job as the model grows (docs/DESIGN.md, Memory).

For each depth it writes a checkpoint with random weights in bf16 safetensors (scale.SHAPES: the real layer
geometry and vocabulary size, one shard per layer) with SmolLM2's tokenizer (its 49,152 tokens, then plain
added tokens up to the shape's vocabulary), then runs the default GGUF job on it in a fresh process
with an empty nsds cache (the built llama.cpp tools and the texts linked in):

    nsds run CHECKPOINT --quantizer gguf --budget Q4_K_M --export

and prints the job's peak RSS (the nsds process: a child's own peak cannot be told apart from the parent's
image it was forked from; llama.cpp's tools hold little more than the GGUF file they memory-map), the
seconds of each stage, and, between the two largest depths of one shape, the seconds and MiB each layer
adds. PROJECTIONS to the full model are computed from those slopes, not measured, and labelled so.

    python benchmarks/gguf_scale.py [--shape llama-3.1-8b] [--layers 2 6] [--tokens 8192] [--device cpu]
                                    [--dir /tmp]

With `--device cuda` every stage that computes in nsds's process runs on the GPU and the peak GPU memory is
printed too; `--layers 32` runs the full Llama-3.1-8B shape (the GPU figures of the README).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers as tf

from nsds import assets
from nsds.files import cache_dir

from scale import SHAPES, Shape, write_checkpoint

# Llama's layer at a toy width over SmolLM2's vocabulary: the whole job in a minute, for the test.
TINY = Shape(lambda n: tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=n,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=49152,
                                      tie_word_embeddings=False), 4)  # fmt: skip

RUN = r"""
import json, resource, sys, time
from pathlib import Path
from nsds.config import RunConfig
from nsds.pipeline import run
import torch
model, out, text, tokens, device = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5]
start = time.perf_counter()
result = run(RunConfig(model=model, quantizer="gguf", budget="Q4_K_M", widths=(2, 3, 4, 5, 6, 8), export=True,
                       out=out, text=text, tokens=tokens, device=device))
stages = dict(result.timing)
for e in result.evaluations:
    stages[f"evaluate {e.label}_s"] = e.seconds
    if e.runtime is not None:
        stages[f"llama-perplexity {e.label}_s"] = e.runtime.seconds
print(json.dumps({"wall_s": time.perf_counter() - start, "stages": stages,
                  "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "gpu_peak_mib": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
                  "kld": {e.label: e.kld for e in result.evaluations}}))
"""


def add_tokenizer(folder: Path) -> None:
    """SmolLM2's tokenizer (read from its GGUF asset by transformers), its BOS/EOS ids, the model class (llama.cpp's
    converter picks its architecture by that name) and the weights' dtype in the config, as a checkpoint saved
    by transformers declares it (nsds converts a bf16 checkpoint to a bf16 GGUF, an undeclared one to f32)."""
    path = assets.path("smollm2")
    tokenizer = tf.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    config = json.loads((folder / "config.json").read_text())
    # Plain added tokens up to the shape's vocabulary: every id the random model samples is then a token with
    # text that reads back as itself, so its own text keeps its length (the converter would pad with
    # unprintable [PAD] tokens, which vanish from the text: 528 sampled tokens read back as ~185).
    tokenizer.add_tokens([f"<extra_{i}>" for i in range(len(tokenizer), config["vocab_size"])])
    tokenizer.save_pretrained(folder)
    with torch.device("meta"):
        model = tf.AutoModelForCausalLM.from_config(tf.AutoConfig.from_pretrained(folder))
    config |= {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
               "architectures": [type(model).__name__], "dtype": "bfloat16"}  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))


def job(folder: Path, work: Path, text: str, tokens: int, device: str) -> dict:
    """One default GGUF job in a fresh process and a fresh nsds cache (the tools and texts linked in)."""
    cache = work / "cache"
    cache.mkdir()
    for name in ("tools", "text", "models"):
        if (cache_dir() / name).is_dir():
            (cache / name).symlink_to((cache_dir() / name).resolve(), target_is_directory=True)
    env = os.environ | {"NSDS_CACHE": str(cache), "TQDM_DISABLE": "1"}
    command = [sys.executable, "-c", RUN, str(folder), str(work / "out"), text, str(tokens), device]
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True, env=env)  # its progress goes to stderr
    shutil.rmtree(cache, ignore_errors=True)
    shutil.rmtree(work / "out", ignore_errors=True)
    if done.returncode:
        raise SystemExit(f"the job failed (exit {done.returncode}): its messages are above")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=[*SHAPES, "tiny"], default="llama-3.1-8b", help="tiny: for the test")
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 6], help="depths to run (two or more to project)")
    parser.add_argument("--text", default="brown")
    parser.add_argument("--tokens", type=int, default=8192, help="evaluation tokens (the job's default: 8192)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda (every stage that computes runs there)")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()), help="where checkpoints go")
    args = parser.parse_args()
    shape = (SHAPES | {"tiny": TINY})[args.shape]
    print(
        f"{args.shape} shape, bf16, depths {args.layers} (the full model has {shape.layers}); evaluation on "
        f"{args.tokens} tokens of {args.text}; torch {torch.__version__}, {os.cpu_count()} CPUs",
        flush=True,
    )
    found: dict[int, dict] = {}
    for layers in args.layers:
        work = Path(tempfile.mkdtemp(prefix="nsds-gguf-scale-", dir=args.dir))
        try:
            folder = work / "model"
            size = write_checkpoint(shape, layers, folder, torch.bfloat16)
            add_tokenizer(folder)
            start = time.perf_counter()
            found[layers] = job(folder, work, args.text, args.tokens, args.device)
            took = time.perf_counter() - start
        finally:
            shutil.rmtree(work, ignore_errors=True)
        result = found[layers]
        print(
            f"\n{layers} layers ({size / 1e9:.2f} GB): {took:.0f} s, peak RSS {result['peak_mib']:.0f} MiB "
            "(the nsds process; llama.cpp's tools map the GGUF file they read)",
            flush=True,
        )
        for stage, seconds in result["stages"].items():
            print(f"  {stage.removesuffix('_s'):<32} {seconds:8.1f} s")
    if len(found) > 1:  # a single depth (e.g. the full model) has no slope to project from
        report(found, shape.layers, args.shape)


def report(found: dict[int, dict], full: int, name: str) -> None:
    few, more = sorted(found)[-2:]
    span = more - few
    time_slope = (found[more]["wall_s"] - found[few]["wall_s"]) / span
    memory_slope = (found[more]["peak_mib"] - found[few]["peak_mib"]) / span
    growth = found[more]["peak_mib"] / found[few]["peak_mib"] - 1
    print(f"\nfrom {few} to {more} layers: peak RSS {found[few]['peak_mib']:.0f} -> {found[more]['peak_mib']:.0f} MiB "
          f"({100 * growth:+.1f} %, {memory_slope:+.0f} MiB per layer); {time_slope:.0f} s per layer")  # fmt: skip
    per_stage = {k: (found[more]["stages"][k] - found[few]["stages"].get(k, 0.0)) / span for k in found[more]["stages"]}
    print("  seconds per layer by stage: " + ", ".join(f"{k.removesuffix('_s')} {v:.1f}" for k, v in per_stage.items()))
    wall = found[more]["wall_s"] + (full - more) * time_slope
    memory = found[more]["peak_mib"] + (full - more) * memory_slope
    print(f"PROJECTION (computed from the slopes, not measured) for the full {full}-layer {name}: "
          f"{wall / 3600:.1f} h, peak RSS {memory:.0f} MiB")  # fmt: skip


if __name__ == "__main__":
    main()
