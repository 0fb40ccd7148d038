"""A GGUF file: one tensor dequantized at a time (by the `gguf` package), under Hugging Face names.

GGUF names are mapped to the Hugging Face names of the architecture with gguf-py's own name table,
and the two layout changes llama.cpp's converter makes are undone exactly as transformers undoes them
when it loads a GGUF: Llama's rotary permutation of q/k rows, and GPT-2's Conv1D transposes.

Mixture-of-experts files keep a layer's routed experts as one 3-D tensor per projection (ffn_gate_exps,
ffn_up_exps, ffn_down_exps: (E, out, in)); they are presented under the stacked names arch.Experts reads
(`mlp.experts.gate_proj.weight`), and `part` dequantizes one expert alone. DeepSeek's kv_b, which the
converter splits into attn_k_b (transposed per head) and attn_v_b, is put back together.

The header is read by nsds.gguf_header (gguf.GGUFReader is far slower on big vocabularies); the config
is built from its scalars.
"""

import struct
from pathlib import Path

import gguf
import numpy as np
import torch
from transformers import AutoConfig, PretrainedConfig

from nsds import arch
from nsds.arch import family_of, geometry
from nsds.errors import NsdsError, first_line
from nsds.gguf_header import GGUFHeader
from nsds.weights.base import WeightSource, build_config

_ARCH_BY_NAME = {name: arch for arch, name in gguf.MODEL_ARCH_NAMES.items()}
# GGUF architectures whose llama.cpp layout nsds knows how to undo, and their transformers model_type.
MODEL_TYPES = {
    "llama": "llama",  # "mixtral" when the file has experts
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma2": "gemma2",
    "gemma3": "gemma3_text",
    "phi3": "phi3",
    "gpt2": "gpt2",
    "qwen2moe": "qwen2_moe",
    "qwen3moe": "qwen3_moe",
    "olmoe": "olmoe",
    "deepseek2": "deepseek_v2",  # "deepseek_v3" with sigmoid expert gating
    "gpt-oss": "gpt_oss",
}
# transformers config attribute <- GGUF metadata key (after "{arch}."), for the MoE and MLA geometry.
_EXPERT_WIDTH = {"mixtral": "intermediate_size", "olmoe": "intermediate_size", "gpt_oss": "intermediate_size"}
_MLA_SETTINGS = {
    "q_lora_rank": "attention.q_lora_rank",  # absent: one q_proj, and the config must say None
    "kv_lora_rank": "attention.kv_lora_rank",
    "qk_rope_head_dim": "rope.dimension_count",
    "v_head_dim": "attention.value_length_mla",
    "first_k_dense_replace": "leading_dense_block_count",
    "n_shared_experts": "expert_shared_count",
}
_SIGMOID_GATING = 2  # llama.cpp's LLAMA_EXPERT_GATING_FUNC_TYPE_SIGMOID (DeepSeek-V3)
_KV_B = "self_attn.kv_b_proj.weight"
_GPT2_CONV1D = ("attn_qkv.weight", "attn_output.weight", "ffn_up.weight", "ffn_down.weight")


def _reverse_rotary_permutation(weights: np.ndarray, heads: int) -> np.ndarray:
    """Undo convert_hf_to_gguf's per-head interleave of Llama q/k rows."""
    half = weights.shape[0] // heads // 2
    return weights.reshape(heads, half, 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def _dequantize_rows(data: np.ndarray, qtype: gguf.GGMLQuantizationType, chunk_bytes: int = 64 << 20) -> np.ndarray:
    """Dequantize to float32 a block of rows at a time: gguf's NumPy kernels build temporaries several
    times their input's size, which for a large embedding would double the peak memory."""
    if data.ndim < 2 or data.nbytes <= chunk_bytes:
        return np.array(gguf.quants.dequantize(data, qtype), dtype=np.float32)
    rows = max(1, data.shape[0] * chunk_bytes // data.nbytes)
    first = np.asarray(gguf.quants.dequantize(data[:rows], qtype), dtype=np.float32)
    out = np.empty((data.shape[0], *first.shape[1:]), dtype=np.float32)
    out[:rows] = first
    for start in range(rows, data.shape[0], rows):
        out[start : start + rows] = gguf.quants.dequantize(data[start : start + rows], qtype)
    return out


class GGUFSource(WeightSource):
    """Tensors of one GGUF file, dequantized to float32 on demand."""

    kind = "gguf"

    def __init__(self, path: Path, model_id: str | None = None) -> None:
        self.path = self.location = Path(path)
        self.files = [self.path]
        try:
            self._header = GGUFHeader(self.path)
        except (OSError, ValueError, struct.error, KeyError, OverflowError, MemoryError) as err:
            # ValueError covers UnicodeDecodeError and unknown enum values
            raise NsdsError(f"cannot read GGUF file '{self.path}': {first_line(err)} (corrupt or truncated?)") from None
        self.arch = str(self._header.metadata.get("general.architecture"))
        self.config = self._config()
        self.family = family_of(self.config.model_type)
        try:
            geometry(self.config)
        except NsdsError as err:
            raise NsdsError(f"{err} (in the metadata of '{self.path}')") from None
        self.model_id = model_id or str(self._header.metadata.get("general.name") or self.path.name)
        self._gguf_name = self._name_map()

    def _config(self) -> PretrainedConfig:
        """A transformers config with the geometry the GGUF metadata states."""
        if self.arch not in MODEL_TYPES:
            raise NsdsError(
                f"unsupported GGUF architecture '{self.arch}' in '{self.path}'; supported: {', '.join(MODEL_TYPES)}"
            )

        def meta(key: str) -> object:
            return self._header.metadata.get(f"{self.arch}.{key}")

        heads, hidden, layers = meta("attention.head_count"), meta("embedding_length"), meta("block_count")
        if not all(isinstance(v, int) and v > 0 for v in (heads, hidden, layers)):
            raise NsdsError(f"'{self.path}' lacks the {self.arch}.block_count/embedding_length/head_count metadata")
        embedding = self._header.tensors.get("token_embd.weight")
        model_type = MODEL_TYPES[self.arch]
        if self.arch == "llama" and meta("expert_count"):
            model_type = "mixtral"
        if self.arch == "deepseek2" and meta("expert_gating_func") == _SIGMOID_GATING:
            model_type = "deepseek_v3"
        settings = {
            "num_hidden_layers": layers,
            "hidden_size": hidden,
            "num_attention_heads": heads,
            "num_key_value_heads": meta("attention.head_count_kv") or heads,
            "head_dim": meta("attention.key_length") or hidden // heads,
            "intermediate_size": meta("feed_forward_length"),
            "vocab_size": meta("vocab_size") or (embedding.shape[0] if embedding else None),
            "max_position_embeddings": meta("context_length"),
            "tie_word_embeddings": "output.weight" not in self._header.tensors,
        }
        settings |= self._moe_settings(model_type, meta)
        settings = {k: v for k, v in settings.items() if v is not None or k == "q_lora_rank"}
        return build_config(
            lambda: AutoConfig.for_model(model_type, **settings),
            f"built from the metadata of '{self.path}'",
        )

    @staticmethod
    def _moe_settings(model_type: str, meta) -> dict[str, object]:
        """The experts' and MLA's config attributes from the metadata llama.cpp's converter writes."""
        family = family_of(model_type)
        if family.experts is None:
            return {}
        width = _EXPERT_WIDTH.get(model_type, "moe_intermediate_size")
        settings = {family.experts.count: meta("expert_count"), "num_experts_per_tok": meta("expert_used_count"),
                    width: meta("expert_feed_forward_length")}  # fmt: skip
        if model_type == "qwen2_moe":
            settings["shared_expert_intermediate_size"] = meta("expert_shared_feed_forward_length")
        if family.mla is not None:  # the converter writes MLA as MQA over the latent: heads from *_mla keys
            settings |= {key: meta(name) for key, name in _MLA_SETTINGS.items()}
            rope, key_length = meta("rope.dimension_count"), meta("attention.key_length_mla")
            settings |= {"qk_nope_head_dim": key_length - rope if isinstance(key_length, int) and rope else None,
                         "num_key_value_heads": meta("attention.head_count"), "head_dim": None,
                         "n_group": 1, "topk_group": 1, "rope_scaling": None}  # fmt: skip
        return settings

    def _name_map(self) -> dict[str, str]:
        """HF name -> GGUF name, for every tensor nsds may ask for."""
        fam, layers = self.family, self.config.num_hidden_layers
        if layers > len(self._header.tensors):  # gguf's name table has entries for every block: bound it
            raise NsdsError(
                f"'{self.path}' states {layers} blocks but holds only {len(self._header.tensors)} tensors "
                "(corrupt metadata?)"
            )
        table = gguf.get_tensor_name_map(_ARCH_BY_NAME[self.arch], layers)
        relative = list(fam.layer_tensors())
        if fam.experts is not None:
            spec = fam.experts
            relative += [*spec.routers, *(f"{spec.module}.{p}.weight" for p in arch.PROJECTIONS)]
            relative += [f"{spec.shared}.{p}.weight" for p in arch.PROJECTIONS] if spec.shared else []
        wanted = [fam.body + fam.embedding, fam.unembedding] + [
            f"{fam.body}{fam.layers}.{i}.{rel}" for i in range(layers) for rel in relative
        ]
        found = {}
        for hf_name in wanted:
            name = table.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if name in self._header.tensors:
                found[hf_name] = name
        if fam.mla is not None:  # kv_b, split by the converter into attn_k_b and attn_v_b
            for i in range(layers):
                hf_name = f"{fam.body}{fam.layers}.{i}.{_KV_B}"
                if hf_name not in found and f"blk.{i}.attn_k_b.weight" in self._header.tensors:
                    found[hf_name] = f"blk.{i}.attn_k_b.weight"
        return found

    def names(self) -> set[str]:
        return set(self._gguf_name)

    def gguf_name(self, name: str) -> str | None:
        """The GGUF tensor holding a Hugging Face tensor name, if this file has it."""
        return self._gguf_name.get(name)

    def shape(self, name: str) -> tuple[int, ...]:
        gguf_name = self._gguf_name[name]
        shape = self._header.tensors[gguf_name].shape
        if gguf_name.endswith("attn_k_b.weight"):  # (H, r, nope) and v_b (H, v, r) -> (H * (nope + v), r)
            v_b = self._header.tensors[gguf_name.replace("attn_k_b", "attn_v_b")].shape
            return shape[0] * (shape[2] + v_b[1]), shape[1]
        return shape[::-1] if self.arch == "gpt2" and gguf_name.endswith(_GPT2_CONV1D) else shape

    def _dequantized(self, gguf_name: str, index: int | None = None) -> np.ndarray:
        entry = self._header.tensors[gguf_name]
        data = self._header.array(entry)
        try:
            return _dequantize_rows(data if index is None else data[index], entry.qtype)
        except (ValueError, NotImplementedError) as err:
            raise NsdsError(f"cannot dequantize '{gguf_name}' ({entry.qtype.name}): {err}") from None

    def part(self, name: str, index: int) -> torch.Tensor:
        gguf_name = self._gguf_name[name]
        if len(self._header.tensors[gguf_name].shape) != 3 or not 0 <= index < self.shape(name)[0]:
            return super().part(name, index)
        return torch.from_numpy(np.ascontiguousarray(self._dequantized(gguf_name, index)))

    def tensor(self, name: str) -> torch.Tensor:
        gguf_name = self._gguf_name[name]
        weights = self._dequantized(gguf_name)
        if gguf_name.endswith("attn_k_b.weight"):
            v_b = self._dequantized(gguf_name.replace("attn_k_b", "attn_v_b"))
            weights = np.concatenate([weights.swapaxes(1, 2), v_b], axis=1).reshape(self.shape(name))
        if self.arch == "llama" and gguf_name.endswith(("attn_q.weight", "attn_k.weight")):
            key = "num_attention_heads" if "attn_q" in gguf_name else "num_key_value_heads"
            heads = getattr(self.config, key)
            if weights.shape[0] % (2 * heads):
                raise NsdsError(
                    f"'{gguf_name}' in '{self.path}' has {weights.shape[0]} rows, which do not split into the "
                    f"{heads} heads its metadata states (corrupt file?)"
                )
            weights = _reverse_rotary_permutation(weights, heads)
        if self.arch == "gpt2" and gguf_name.endswith(_GPT2_CONV1D):
            weights = weights.T
        return torch.from_numpy(np.ascontiguousarray(weights))
