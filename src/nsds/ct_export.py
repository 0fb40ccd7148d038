"""A plan written as a Hugging Face folder in compressed-tensors' format, which vLLM (and transformers with
compressed-tensors) loads: every planned module's weight packed by compressed-tensors' own compressor
(`pack-quantized`: int32 words, a bfloat16 scale per group, the weight's shape), one config group per width
naming its modules, every other tensor in bfloat16, the config and tokenizer beside them.

The folder is written one decoder layer at a time (one safetensors file per layer, one for the stem), so it
costs no more memory than a layer-by-layer pass. Its weights are exactly the ones nsds evaluated: the same
compressed-tensors functions make both (nsds.quantize.ct).
"""

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file

from nsds import arch
from nsds.errors import NsdsError
from nsds.files import write_bytes
from nsds.layerwise import LayerwiseModel
from nsds.plan import Module, Plan
from nsds.progress import progress
from nsds.quantize.ct import DTYPE, CompressedTensors, quantization_parameters, scheme, weight_args

if TYPE_CHECKING:  # compressed-tensors takes seconds to import: only runs that export pay for it
    from compressed_tensors.quantization import QuantizationConfig

FORMAT = "pack-quantized"  # compressed-tensors' CompressionFormat.pack_quantized
INDEX = "model.safetensors.index.json"


def check_exportable(modules: list[Module], model_type: str) -> None:
    """Refuse, before any work, a plan vLLM cannot load: q/k/v or gate/up at different widths (one fused
    matmul each) and GPT-2's transposed Conv1D (MoE experts: quantize.check_expert_formats)."""
    fused: dict[tuple, set[str]] = {}
    for m in modules:
        if m.role in arch.FUSED_BY_RUNTIMES:
            fused.setdefault((m.layer, m.expert, arch.FUSED_BY_RUNTIMES[m.role]), set()).add(m.group)
    if any(len(groups) > 1 for groups in fused.values()):
        raise NsdsError("vLLM runs q/k/v and gate/up as one fused matmul of one scheme, so they must share a width; "
                        "drop --no-fuse")  # fmt: skip
    if arch.family_of(model_type).conv1d:
        raise NsdsError(f"{model_type} stores its projections transposed (Conv1D), which compressed-tensors does not "
                        "pack; drop --export")  # fmt: skip


def quantization_config(plan: Plan, group_size: int) -> "QuantizationConfig":
    """One config group per width (its modules by full name), the head left unquantized."""
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus

    by_bits: dict[int, list[str]] = {}
    for m in plan.modules:
        by_bits.setdefault(m.bits, []).append(m.name)
    groups = {f"group_{i}": scheme(bits, group_size, names) for i, (bits, names) in enumerate(sorted(by_bits.items()))}
    return QuantizationConfig(config_groups=groups, format=FORMAT, quantization_status=QuantizationStatus.COMPRESSED,
                              ignore=["lm_head"])  # fmt: skip


def compressed(weight: torch.Tensor, bits: int, group_size: int) -> dict[str, torch.Tensor]:
    """One weight as compressed-tensors stores it: weight_packed, weight_scale, weight_shape."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor

    args = weight_args(bits, group_size)
    scale, zero = quantization_parameters(weight, args)
    state = {"weight": weight.to(DTYPE), "weight_scale": scale, "weight_zero_point": zero}
    return PackedQuantizationCompressor.compress(state, scheme(bits, group_size, []))


def write_folder(lm: LayerwiseModel, tokenizer, plan: Plan, quantizer: CompressedTensors, target: Path) -> None:
    """The folder at `target` (which must exist, empty): weights, index, config, tokenizer. The planned modules'
    packed weights and scales take exactly the bits the plan counts as their storage."""
    from compressed_tensors import ModelCompressor

    bits = {m.name: m.bits for m in plan.modules}
    weight_map: dict[str, str] = {}
    total = 0

    def save(state: dict[str, torch.Tensor], file: str) -> None:
        nonlocal total
        save_file(state, str(target / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(state, file))
        total += sum(t.numel() * t.element_size() for t in state.values())

    for i in progress(range(lm.num_layers), desc="compressed-tensors export", unit="layer"):
        state: dict[str, torch.Tensor] = {}
        with lm.layer(i) as layer, torch.no_grad():
            for name, parameter in layer.named_parameters():
                full = f"{lm.prefix}{i}.{name}"
                module, _, kind = full.rpartition(".")
                if module in bits and kind == "weight":
                    packed = compressed(parameter, bits[module], quantizer.group_size)
                    state |= {f"{module}.{k}": v.contiguous() for k, v in packed.items()}
                else:
                    state[full] = parameter.detach().to(DTYPE).contiguous()
        save(state, f"model-layer-{i:05d}.safetensors")
    # the stem's parameters (tied ones are named once)
    stem = {name: p.detach().to(DTYPE).contiguous() for name, p in lm.model.named_parameters()
            if not name.startswith(lm.prefix)}  # fmt: skip
    save(stem, "model-stem.safetensors")
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    write_bytes(target / INDEX, json.dumps(index, indent=2).encode())
    config = json.loads(lm.model.config.to_json_string(use_diff=False))  # a GGUF's config names no class:
    config |= {"dtype": "bfloat16", "architectures": [type(lm.model).__name__]}  # vLLM picks its model by it
    config.pop("quantization_config", None)
    write_bytes(target / "config.json", json.dumps(config, indent=2, sort_keys=True).encode())
    ModelCompressor(quantization_config=quantization_config(plan, quantizer.group_size)).update_config(str(target))
    tokenizer.save_pretrained(target)
