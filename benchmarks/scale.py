"""Scaling of `nsds score`: streamed in one process, and on Ray with 1 and 2 (or more) local workers.

For each model shape in SHAPES it writes checkpoints with random weights in safetensors (a few decoder
layers of the real geometry, the real vocabulary and an untied head), scores each one in a fresh process
per mode and run, and prints medians over the runs of
- the wall time of scoring (for Ray without `ray.init`, with the workers' start and imports),
- the time per layer: the slope between the two checkpoint sizes, so W_U's readout (a fixed cost,
  overlapped with the first layers) and start-up fall into the intercept,
- peak memory: the scoring process's peak RSS streamed; on Ray, sampled every 0.1 s, the largest single
  process and the sum over the driver, Ray's daemons and the workers,
- PROJECTIONS (computed, not measured) for the full model: intercept + layers x slope on 1 worker, and
  intercept + layers x slope(1 worker) / N for N workers, which assumes perfect scaling beyond what
  was measured.
Adding a shape is one SHAPES entry: the tensors are those of the transformers model built from its config
on the meta device, so any architecture transformers knows can be written (an MoE entry can be added
once nsds scores MoE architectures).

    python benchmarks/scale.py [--shape llama-3.2-1b] [--layers 2 4] [--workers 1 2] [--runs 3]
                               [--dtype float32] [--full-workers 8] [--dir /tmp]
"""

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers as tf
from safetensors.torch import save_file


@dataclass(frozen=True)
class Shape:
    """A real model's geometry: its config for n decoder layers, and its number of layers."""

    config: Callable[[int], tf.PretrainedConfig]
    layers: int


SHAPES = {
    "llama-3.1-8b": Shape(lambda n: tf.LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=n,
                          num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                          tie_word_embeddings=False), 32),
    "llama-3.2-1b": Shape(lambda n: tf.LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=n,
                          num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
                          tie_word_embeddings=False), 16),
    "qwen2.5-0.5b": Shape(lambda n: tf.Qwen2Config(hidden_size=896, intermediate_size=4864, num_hidden_layers=n,
                          num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                          tie_word_embeddings=True), 24),
}  # fmt: skip

RUN = r"""
import json, os, resource, sys, threading, time
import psutil
folder, workers = sys.argv[1], int(sys.argv[2])
me = psutil.Process()
peak = {"largest_mb": 0.0, "total_mb": 0.0}

def sample() -> None:
    while True:
        sizes = []
        for proc in [me, *me.children(recursive=True)]:
            try:
                sizes.append(proc.memory_info().rss / 2**20)
            except psutil.Error:
                pass
        peak["largest_mb"] = max(peak["largest_mb"], max(sizes))
        peak["total_mb"] = max(peak["total_mb"], sum(sizes))
        time.sleep(0.1)

from nsds.scorers.nsds import NsdsParams, score
from nsds.compute import Compute
from nsds.weights import open_source
result = {}
if workers:
    import ray
    from nsds import cluster
    start = time.perf_counter()
    ray.init(num_cpus=workers, include_dashboard=False, logging_level="warning")
    result["ray_init_s"] = time.perf_counter() - start
    threading.Thread(target=sample, daemon=True).start()
    start = time.perf_counter()
    report = cluster.score(folder, None, NsdsParams(), Compute(), workers)
else:
    start = time.perf_counter()
    report = score(open_source(folder))
result["wall_s"] = time.perf_counter() - start
result["read_s"] = report.timing["read_s"]
result["scores"] = report.scores
if workers:
    result |= peak
else:
    result["largest_mb"] = result["total_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps(result))
"""


def write_checkpoint(shape: Shape, layers: int, folder: Path, dtype: torch.dtype) -> int:
    """A safetensors folder of `layers` decoder layers of `shape`, random weights (one shard per layer and
    one per other tensor, as sharded checkpoints are); returns its size in bytes."""
    config = shape.config(layers)
    with torch.device("meta"):
        model = tf.AutoModelForCausalLM.from_config(config)
    folder.mkdir(parents=True)
    config.save_pretrained(folder)
    shards: dict[str, dict[str, tuple[int, ...]]] = {}
    for name, tensor in model.named_parameters():  # a tied head is the embedding, written once
        shard = name.split(".layers.")[1].split(".")[0] if ".layers." in name else name
        shards.setdefault(shard, {})[name] = tuple(tensor.shape)
    generator = torch.Generator().manual_seed(0)
    weight_map = {}
    for shard, tensors in shards.items():
        file = f"{shard}.safetensors"
        save_file({n: (torch.randn(s, generator=generator) * 0.02).to(dtype) for n, s in tensors.items()},
                  folder / file)  # fmt: skip
        weight_map |= dict.fromkeys(tensors, file)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return sum(f.stat().st_size for f in folder.iterdir())


def run(folder: Path, workers: int) -> dict:
    """One scoring run in a fresh process (0 workers: streamed, single process)."""
    done = subprocess.run([sys.executable, "-c", RUN, str(folder), str(workers)], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"scoring failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=SHAPES, default="llama-3.2-1b")
    parser.add_argument("--layers", type=int, nargs=2, default=[2, 4], metavar=("FEW", "MORE"))
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="local Ray workers to try")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--full-workers", type=int, default=8, help="N of the projected N-worker time")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()), help="where checkpoints go")
    args = parser.parse_args()
    shape = SHAPES[args.shape]
    few, more = args.layers
    modes = {"streamed": 0} | {f"ray, {w} worker{'s' * (w > 1)}": w for w in args.workers}
    print(f"{args.shape} shape, {args.dtype}, checkpoints of {few} and {more} layers (the full model has "
          f"{shape.layers}); {args.runs} runs per mode; torch {torch.__version__}, "
          f"{torch.get_num_threads()} CPU threads")  # fmt: skip
    work = Path(tempfile.mkdtemp(prefix="nsds-scale-", dir=args.dir))
    results: dict[str, dict[int, list[dict]]] = {mode: {} for mode in modes}
    try:
        for layers in (few, more):
            folder = work / f"{layers}-layers"
            start = time.perf_counter()
            size = write_checkpoint(shape, layers, folder, getattr(torch, args.dtype))
            print(f"wrote {layers} layers, {size / 1e9:.2f} GB, in {time.perf_counter() - start:.0f} s", flush=True)
            for _ in range(args.runs):  # modes interleaved, so a busy moment of the machine hits all of them
                for mode, workers in modes.items():
                    result = run(folder, workers)
                    results[mode].setdefault(layers, []).append(result)
                    print(f"  {mode}: {result['wall_s']:.1f} s, peak {result['largest_mb']:.0f} MiB", flush=True)
            scores = {json.dumps(r["scores"]) for runs in (results[m][layers] for m in modes) for r in runs}
            print(f"  every mode and run gave the same scores: {len(scores) == 1}")
            shutil.rmtree(folder)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(results, shape, few, more, args.full_workers)


def report(results: dict[str, dict[int, list[dict]]], shape: Shape, few: int, more: int, full_workers: int) -> None:
    def median(mode: str, layers: int, key: str) -> float:
        return statistics.median(r[key] for r in results[mode][layers])

    print(f"\n{'mode':<18} {'wall ' + str(few) + 'L':>9} {'wall ' + str(more) + 'L':>9} {'s/layer':>8} "
          f"{'fixed s':>8} {'peak proc MiB':>13} {'peak all MiB':>12}")  # fmt: skip
    slopes = {}
    for mode in results:
        t_few, t_more = median(mode, few, "wall_s"), median(mode, more, "wall_s")
        slope = (t_more - t_few) / (more - few)
        slopes[mode] = (t_few - few * slope, slope)
        largest = max(median(mode, n, "largest_mb") for n in (few, more))
        total = max(median(mode, n, "total_mb") for n in (few, more))
        print(f"{mode:<18} {t_few:>9.1f} {t_more:>9.1f} {slope:>8.2f} {slopes[mode][0]:>8.1f} {largest:>13.0f} "
              f"{total:>12.0f}")  # fmt: skip
    inits = [r["ray_init_s"] for mode in results for runs in results[mode].values() for r in runs if "ray_init_s" in r]
    if inits:
        print(f"ray.init (not in the wall times): median {statistics.median(inits):.1f} s")
    fixed, slope = slopes["streamed"]
    ray_fixed, ray_slope = slopes[next(m for m in results if m.startswith("ray, 1 "))]
    print(f"\nPROJECTIONS for the full {shape.layers}-layer model (computed from the slopes above, not measured):")
    print(f"  streamed, one process: {fixed + shape.layers * slope:.0f} s")
    print(f"  Ray, 1 worker: {ray_fixed + shape.layers * ray_slope:.0f} s; {full_workers} workers (perfect scaling "
          f"assumed): {ray_fixed + shape.layers * ray_slope / full_workers:.0f} s")  # fmt: skip


if __name__ == "__main__":
    main()
