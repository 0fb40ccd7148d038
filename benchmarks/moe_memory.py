"""Peak memory while scoring a mixture-of-experts checkpoint: bounded by a few experts, not by the model.

Writes Qwen3-MoE-shaped checkpoints with random bf16 weights (one safetensors shard per layer) at two depths,
in the per-expert layout of Hugging Face files or transformers 5's fused 3-D layout, scores each streamed in
a fresh process, and prints that process's peak memory beside the sizes that could bound it: one expert,
one layer's experts, the whole model. Peak RSS (ru_maxrss) counts the pages of the memory-mapped
safetensors files that were read, which the kernel may drop at any time; the peak of anonymous memory
(RssAnon, sampled every 20 ms) is what the scorer itself holds. A baseline process that imports nsds and
opens the source (no scoring) gives the fixed cost. Anonymous memory that stays flat as layers are added,
and under one layer's experts, is what "bounded" means here.

    python benchmarks/moe_memory.py [--layers 2 8] [--experts 64] [--hidden 1024] [--expert-width 512]
                                    [--layout per_expert fused] [--keep DIR]
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import Qwen3MoeConfig

SCORE = """
import json, resource, sys, threading, time
from nsds.compute import Compute
from nsds.scorers.nsds import score
from nsds.weights import open_source

peak = {"RssAnon": 0, "RssFile": 0}
def sample():  # /proc/self/status every 20 ms: anonymous memory apart from mapped file pages
    while True:
        for line in open("/proc/self/status"):
            key, _, value = line.partition(":")
            if key in peak:
                peak[key] = max(peak[key], int(value.split()[0]) / 1024)
        time.sleep(0.02)
threading.Thread(target=sample, daemon=True).start()
start = time.perf_counter()
source = open_source(sys.argv[1])
if sys.argv[2] == "score":
    report = score(source, compute=Compute.choose("cpu"))
time.sleep(0.05)
print(json.dumps({"wall_s": time.perf_counter() - start, "anon_mb": peak["RssAnon"], "file_mb": peak["RssFile"],
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def write_checkpoint(folder: Path, layers: int, experts: int, d: int, width: int, layout: str) -> dict[str, int]:
    """A Qwen3-MoE-shaped checkpoint with random bf16 weights; returns the byte counts that matter."""
    heads, kv_heads, head_dim, vocab = 16, 4, 64, 4096
    config = Qwen3MoeConfig(hidden_size=d, num_hidden_layers=layers, num_attention_heads=heads,
                            num_key_value_heads=kv_heads, head_dim=head_dim, moe_intermediate_size=width,
                            intermediate_size=4 * width, num_experts=experts, num_experts_per_tok=8,
                            vocab_size=vocab, tie_word_embeddings=False, dtype="bfloat16")  # fmt: skip
    config.save_pretrained(folder)
    generator = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator) * 0.02).to(torch.bfloat16)

    weight_map: dict[str, str] = {}

    def shard(name: str, tensors: dict[str, torch.Tensor]) -> None:
        save_file(tensors, folder / name)
        weight_map.update(dict.fromkeys(tensors, name))

    shard("embed.safetensors", {"model.embed_tokens.weight": rand(vocab, d), "lm_head.weight": rand(vocab, d),
                                "model.norm.weight": torch.ones(d, dtype=torch.bfloat16)})  # fmt: skip
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors = {p + "self_attn.q_proj.weight": rand(heads * head_dim, d),
                   p + "self_attn.k_proj.weight": rand(kv_heads * head_dim, d),
                   p + "self_attn.v_proj.weight": rand(kv_heads * head_dim, d),
                   p + "self_attn.o_proj.weight": rand(d, heads * head_dim),
                   p + "self_attn.q_norm.weight": torch.ones(head_dim, dtype=torch.bfloat16),
                   p + "self_attn.k_norm.weight": torch.ones(head_dim, dtype=torch.bfloat16),
                   p + "input_layernorm.weight": torch.ones(d, dtype=torch.bfloat16),
                   p + "post_attention_layernorm.weight": torch.ones(d, dtype=torch.bfloat16),
                   p + "mlp.gate.weight": rand(experts, d)}  # fmt: skip
        if layout == "fused":  # transformers 5's in-memory layout, saved as is
            tensors[p + "mlp.experts.gate_up_proj"] = rand(experts, 2 * width, d)
            tensors[p + "mlp.experts.down_proj"] = rand(experts, d, width)
        else:
            for j in range(experts):
                tensors[f"{p}mlp.experts.{j}.gate_proj.weight"] = rand(width, d)
                tensors[f"{p}mlp.experts.{j}.up_proj.weight"] = rand(width, d)
                tensors[f"{p}mlp.experts.{j}.down_proj.weight"] = rand(d, width)
        shard(f"layer-{i:03d}.safetensors", tensors)
    index = {"metadata": {}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    expert = 3 * width * d * 2
    return {"expert_mb": expert, "layer_experts_mb": experts * expert,
            "model_mb": sum(f.stat().st_size for f in folder.glob("*.safetensors"))}  # fmt: skip


def run(folder: Path, what: str) -> dict:
    out = subprocess.run([sys.executable, "-c", SCORE, str(folder), what], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 8])
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--expert-width", type=int, default=512)
    parser.add_argument("--layout", nargs="+", default=["per_expert", "fused"], choices=["per_expert", "fused"])
    parser.add_argument("--keep", type=Path, help="write the checkpoints here instead of a temporary folder")
    args = parser.parse_args()
    print(f"Qwen3-MoE shape: d={args.hidden}, {args.experts} experts of width {args.expert_width}, bf16, CPU, "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    print(f"{'layout':<11} {'layers':>6} {'model MB':>9} {'layer experts MB':>17} {'expert MB':>10} "
          f"{'anon base MB':>13} {'anon peak MB':>13} {'anon over base':>15} {'RSS peak MB':>12} "
          f"{'score s':>8}")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="nsds-moe-memory-", dir=args.keep) as work:
        for layout in args.layout:
            for layers in args.layers:
                folder = Path(work) / f"{layout}-{layers}"
                folder.mkdir()
                sizes = {k: v / 2**20 for k, v in write_checkpoint(folder, layers, args.experts, args.hidden,
                                                                    args.expert_width, layout).items()}  # fmt: skip
                base, scored = run(folder, "open"), run(folder, "score")
                over = scored["anon_mb"] - base["anon_mb"]
                print(f"{layout:<11} {layers:>6} {sizes['model_mb']:>9.0f} {sizes['layer_experts_mb']:>17.0f} "
                      f"{sizes['expert_mb']:>10.1f} {base['anon_mb']:>13.0f} {scored['anon_mb']:>13.0f} "
                      f"{over:>15.0f} {scored['peak_rss_mb']:>12.0f} {scored['wall_s']:>8.1f}")  # fmt: skip
                for shard in folder.iterdir():
                    shard.unlink()


if __name__ == "__main__":
    main()
