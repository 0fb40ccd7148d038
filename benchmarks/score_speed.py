"""Scoring speed and memory: nsds's fast path against the naive implementation of the same equations.

For each real model in the asset cache (SmolLM2-135M, Gemma-3-270M) this prints
- streamed scoring from the GGUF file, end to end (read + dequantize + score), in a fresh process,
  with that process's peak RSS against the target 1.5 GB + the largest tensor;
- scoring after load (the transformers-loaded model in memory), median of --runs runs;
- the naive implementation (nsds.reference: every head circuit formed d x d and fully SVD'd, every
  matrix fully SVD'd, whole model in memory) once, in the same process, and the speed ratio;
- the largest score difference between the two, and what float32 instead of float64 changes.
With a CUDA GPU (or --llama8b-shape tiny, a CPU smoke test of the same code), it also writes a
Llama-3.1-8B-shaped model with random weights to a safetensors folder and scores it end to end.

    python benchmarks/score_speed.py [--runs 5] [--models smollm2 gemma3-270m] [--llama8b-shape full|tiny|off]
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from nsds import arch, assets, reference
from nsds.compute import Compute
from nsds.scorers.nsds import NsdsParams, RawRole, aggregate, score
from nsds.weights import ModuleSource, SafetensorsSource

LLAMA_8B = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                intermediate_size=14336, vocab_size=128256)  # fmt: skip
LLAMA_TINY = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                  intermediate_size=512, vocab_size=1000)  # fmt: skip

STREAMED = """
import json, resource, sys, time
from nsds.compute import Compute
from nsds.scorers.nsds import score
from nsds.weights import open_source
start = time.perf_counter()
report = score(open_source(sys.argv[1]), compute=Compute.choose(sys.argv[2]))
print(json.dumps({"wall_s": time.perf_counter() - start, "timing": report.timing,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def streamed_run(model: str, device: str = "cpu") -> dict:
    """Score in a fresh process so its peak RSS is the scorer's own."""
    out = subprocess.run([sys.executable, "-c", STREAMED, model, device], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def largest_tensor_mb(path: Path) -> float:
    import gguf

    reader = gguf.GGUFReader(path)
    return max(int(np.prod(t.shape)) for t in reader.tensors) * 4 / 2**20  # dequantized to float32


def naive_scores(model: torch.nn.Module, params: NsdsParams) -> tuple[list[float], float]:
    """NSDS by the plain equations: whole model in memory, full SVD of every head circuit and matrix."""
    start = time.perf_counter()
    source = ModuleSource(model)
    family, geo = arch.family_of(model.config.model_type), arch.geometry(model.config)
    names = source.names()
    body = arch.find_body(family, names)
    basis = reference.readout_basis(source.tensor(arch.unembedding_name(family, geo, body, names)), params.energy)
    raw = []
    for i in range(geo.num_layers):
        prefix = f"{body}{family.layers}.{i}."
        roles = arch.layer_roles(family, geo, lambda rel, prefix=prefix: source.tensor(prefix + rel))
        metrics = reference.layer_metrics(roles, geo, basis, params.energy)
        raw.append({role: RawRole(nv, se, kept) for role, (nv, se, kept) in metrics.items()})
    return [layer.score for layer in aggregate(raw, params)], time.perf_counter() - start


def bench_model(name: str, runs: int) -> None:
    from transformers import AutoModelForCausalLM

    path = assets.path(name)
    streamed = [streamed_run(name) for _ in range(runs)]
    wall = statistics.median(r["wall_s"] for r in streamed)
    rss = max(r["peak_rss_mb"] for r in streamed)
    budget = 1536 + largest_tensor_mb(path)
    print(f"\n== {name} ({path.name})")
    print(f"streamed from GGUF, end to end (fresh process): median {wall:.2f} s over {runs} runs; "
          f"read+dequantize {statistics.median(r['timing']['read_s'] for r in streamed):.2f} s")  # fmt: skip
    print(f"peak RSS while scoring: {rss:.0f} MB (target < 1.5 GB + largest tensor = {budget:.0f} MB): "
          f"{'OK' if rss < budget else 'OVER'}")  # fmt: skip

    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    print(f"transformers load: {time.perf_counter() - start:.1f} s")
    source = ModuleSource(model)
    times, report = [], None
    for _ in range(runs):
        report = score(source)
        times.append(report.timing["total_s"])
    fast = statistics.median(times)
    print(f"nsds after load: median {fast:.2f} s over {runs} runs (min {min(times):.2f}, max {max(times):.2f}), "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    single = score(source, compute=Compute.choose("cpu", "float32"))
    drift = max(abs(a - b) for a, b in zip(single.scores, report.scores, strict=True))
    print(f"float32 instead of float64: {single.timing['total_s']:.2f} s, largest |score difference| {drift:.1e}, "
          f"same ranking: {single.ranking == report.ranking}")  # fmt: skip
    naive, naive_s = naive_scores(model, NsdsParams())
    diff = max(abs(a - b) for a, b in zip(naive, report.scores, strict=True))
    print(f"naive (full SVDs, whole model in memory): {naive_s:.1f} s  ->  nsds is {naive_s / fast:.1f}x faster")
    print(f"largest |score difference| nsds vs naive: {diff:.2e}")


def bench_llama8b(shape: dict, device: str) -> None:
    """Write a Llama-3.1-8B-shaped model with random bf16 weights to safetensors, then score it end to end."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    config = LlamaConfig(**shape, tie_word_embeddings=False, torch_dtype="bfloat16")
    d, f, heads, kv = (
        shape["hidden_size"],
        shape["intermediate_size"],
        shape["num_attention_heads"],
        shape["num_key_value_heads"],
    )
    dh = d // heads
    gen = torch.Generator().manual_seed(0)

    def rand(*size: int) -> torch.Tensor:
        return (torch.randn(*size, generator=gen) * 0.02).to(torch.bfloat16)

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        start = time.perf_counter()
        config.save_pretrained(folder)
        weight_map = {}
        save_file({"model.embed_tokens.weight": rand(shape["vocab_size"], d), "lm_head.weight":
                   rand(shape["vocab_size"], d)}, folder / "embeddings.safetensors")  # fmt: skip
        weight_map |= dict.fromkeys(["model.embed_tokens.weight", "lm_head.weight"], "embeddings.safetensors")
        shapes = {
            "self_attn.q_proj.weight": (heads * dh, d),
            "self_attn.k_proj.weight": (kv * dh, d),
            "self_attn.v_proj.weight": (kv * dh, d),
            "self_attn.o_proj.weight": (d, heads * dh),
            "mlp.up_proj.weight": (f, d),
            "mlp.gate_proj.weight": (f, d),
            "mlp.down_proj.weight": (d, f),
        }
        for i in range(shape["num_hidden_layers"]):
            tensors = {f"model.layers.{i}.{name}": rand(*size) for name, size in shapes.items()}
            shard = f"layer-{i:03d}.safetensors"
            save_file(tensors, folder / shard)
            weight_map |= dict.fromkeys(tensors, shard)
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
        print(f"\n== Llama-3.1-8B-shaped random model {shape}: written in {time.perf_counter() - start:.0f} s")
        for precision in ("float64", "float32"):
            start = time.perf_counter()
            report = score(SafetensorsSource(folder), compute=Compute.choose(device, precision))
            name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
            print(f"{name}, {precision}: end to end {time.perf_counter() - start:.1f} s "
                  f"(reading {report.timing['read_s']:.1f} s), peak RSS "
                  f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--models", nargs="*", default=["smollm2", "gemma3-270m"])
    parser.add_argument("--llama8b-shape", choices=["full", "tiny", "off"], default="full")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CUDA: {torch.cuda.is_available()}")
    for name in args.models:
        bench_model(name, args.runs)
    if args.llama8b_shape == "tiny":
        bench_llama8b(LLAMA_TINY, "cuda" if torch.cuda.is_available() else "cpu")
    elif args.llama8b_shape == "full":
        if torch.cuda.is_available():
            bench_llama8b(LLAMA_8B, "cuda")
        else:
            print("\n== Llama-3.1-8B-shaped model: skipped (no CUDA GPU; --llama8b-shape tiny runs the code on CPU)")


if __name__ == "__main__":
    main()
