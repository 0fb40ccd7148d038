"""Tiny real transformers models, and GGUF files written the way llama.cpp's converter writes them."""

import gguf
import numpy as np
import torch
import transformers as tf

_ARCH = {name: arch for arch, name in gguf.MODEL_ARCH_NAMES.items()}
_GPT2_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def permute_like_llama_cpp(weights: np.ndarray, heads: int) -> np.ndarray:
    """convert_hf_to_gguf's rotary interleave of Llama q/k rows (written independently of nsds)."""
    rows = weights.shape[0] // heads // 2
    return weights.reshape(heads, 2, rows, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


# The mixture-of-experts families, each tiny: 4 experts (top 2) of width 32 on a 64-wide stream.
MOE_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "gpt_oss")


def tiny_model(model_type: str, **overrides) -> torch.nn.Module:
    """A small randomly initialised causal LM of the given family (seeded)."""
    torch.manual_seed(0)
    common = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                  vocab_size=96, max_position_embeddings=64)  # fmt: skip
    moe = dict(common, num_experts_per_tok=2, num_key_value_heads=2)
    mla = dict(moe, num_key_value_heads=4, moe_intermediate_size=32, n_routed_experts=4, n_shared_experts=1,
               first_k_dense_replace=1, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12,
               n_group=1, topk_group=1, rope_scaling=None)  # fmt: skip
    configs = {
        "llama": lambda: tf.LlamaConfig(**common, num_key_value_heads=2),
        "qwen2": lambda: tf.Qwen2Config(**common, num_key_value_heads=2, tie_word_embeddings=False),
        "qwen3": lambda: tf.Qwen3Config(
            **common, num_key_value_heads=2, head_dim=128
        ),  # transformers reads no key_length
        "gemma3": lambda: tf.Gemma3TextConfig(**common, num_key_value_heads=1, head_dim=48),
        "phi3": lambda: tf.Phi3Config(**common | {"vocab_size": 32064}, num_key_value_heads=2),  # GGUF pad id 32000
        "gpt2": lambda: tf.GPT2Config(n_embd=64, n_layer=4, n_head=4),  # GGUF vocab/positions: defaults
        "mixtral": lambda: tf.MixtralConfig(**moe | {"intermediate_size": 32}, num_local_experts=4),
        "qwen2_moe": lambda: tf.Qwen2MoeConfig(
            **moe, moe_intermediate_size=32, shared_expert_intermediate_size=48, num_experts=4, mlp_only_layers=[0]
        ),  # a dense first layer
        "qwen3_moe": lambda: tf.Qwen3MoeConfig(**moe, moe_intermediate_size=32, num_experts=4, head_dim=24),
        "olmoe": lambda: tf.OlmoeConfig(**moe | {"intermediate_size": 32}, num_experts=4, eos_token_id=1),
        "deepseek_v2": lambda: tf.DeepseekV2Config(**mla, q_lora_rank=None),  # V2-Lite: one q_proj
        "deepseek_v3": lambda: tf.DeepseekV3Config(**mla, q_lora_rank=24),
        "gpt_oss": lambda: tf.GptOssConfig(**moe | {"intermediate_size": 32}, num_local_experts=4, head_dim=16),
    }
    config = configs[model_type]()
    for key, value in overrides.items():
        setattr(config, key, value)
    return tf.AutoModelForCausalLM.from_config(config).eval()


def write_gguf(model: torch.nn.Module, path, arch: str, nan_in: str | None = None) -> None:
    """Write `model` as llama.cpp would: GGUF names and metadata, permuted Llama q/k, Linear-layout GPT-2.

    `nan_in` names a Hugging Face tensor to poison with one NaN (for error tests).
    """
    cfg = model.config
    layers = cfg.num_hidden_layers
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(getattr(cfg, "intermediate_size", None) or 4 * cfg.hidden_size)
    writer.add_head_count(cfg.num_attention_heads)
    heads_kv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    mla = hasattr(cfg, "kv_lora_rank")  # heads and lengths written by _add_moe_metadata
    if not mla:
        writer.add_head_count_kv(heads_kv)
    if head_dim != cfg.hidden_size // cfg.num_attention_heads and not mla:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if arch == "gpt2":
        writer.add_layer_norm_eps(cfg.layer_norm_epsilon)
    else:
        writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
        if not mla:
            writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(cfg.vocab_size)
    _add_moe_metadata(writer, cfg)
    names = gguf.get_tensor_name_map(_ARCH[arch], layers)
    for name, tensor in _as_converted(model.state_dict(), cfg).items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        target = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if target is None:
            continue
        w = tensor.detach().contiguous().numpy().copy()
        if arch == "llama" and target.endswith(("attn_q.weight", "attn_k.weight")):
            w = permute_like_llama_cpp(w, cfg.num_attention_heads if "attn_q" in target else heads_kv)
        if arch == "gpt2" and name.endswith(_GPT2_CONV1D):
            w = np.ascontiguousarray(w.T)
        if name == nan_in:
            w.flat[7] = np.nan
        writer.add_tensor(target, w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _add_moe_metadata(writer: gguf.GGUFWriter, cfg) -> None:
    """The expert and MLA metadata llama.cpp's converter writes (conversion/{qwen,deepseek,gpt_oss}.py)."""
    experts = next((getattr(cfg, k) for k in ("num_local_experts", "num_experts", "n_routed_experts")
                    if hasattr(cfg, k)), None)  # fmt: skip
    if experts is None:
        return
    writer.add_expert_count(experts)
    writer.add_expert_used_count(cfg.num_experts_per_tok)
    writer.add_expert_feed_forward_length(getattr(cfg, "moe_intermediate_size", None) or cfg.intermediate_size)
    if getattr(cfg, "shared_expert_intermediate_size", None):
        writer.add_expert_shared_feed_forward_length(cfg.shared_expert_intermediate_size)
    if hasattr(cfg, "kv_lora_rank"):  # MLA, written as MQA over the latent
        writer.add_head_count_kv(1)
        writer.add_key_length(cfg.kv_lora_rank + cfg.qk_rope_head_dim)
        writer.add_value_length(cfg.kv_lora_rank)
        writer.add_key_length_mla(cfg.qk_nope_head_dim + cfg.qk_rope_head_dim)
        writer.add_value_length_mla(cfg.v_head_dim)
        writer.add_kv_lora_rank(cfg.kv_lora_rank)
        if cfg.q_lora_rank is not None:
            writer.add_q_lora_rank(cfg.q_lora_rank)
        writer.add_leading_dense_block_count(cfg.first_k_dense_replace)
        writer.add_expert_shared_count(cfg.n_shared_experts)
        writer.add_rope_dimension_count(cfg.qk_rope_head_dim)
        if cfg.model_type == "deepseek_v3":
            writer.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)


def _as_converted(state: dict[str, torch.Tensor], cfg) -> dict[str, torch.Tensor]:
    """transformers 5's in-memory tensors as the converter writes them: fused 3-D experts split into one
    (E, out, in) tensor per projection (gpt-oss: transposed, gate/up de-interleaved), DeepSeek's kv_b
    split into k_b (per head, transposed) and v_b."""
    out = {}
    for name, tensor in state.items():
        prefix = name.rpartition(".")[0]
        if name.endswith("experts.gate_up_proj"):
            if cfg.model_type == "gpt_oss":  # (E, d, 2F), gate/up interleaved
                gate, up = tensor.transpose(1, 2)[:, ::2], tensor.transpose(1, 2)[:, 1::2]
            else:
                gate, up = tensor.chunk(2, dim=1)
            out[f"{prefix}.gate_proj.weight"], out[f"{prefix}.up_proj.weight"] = gate, up
        elif name.endswith("experts.down_proj"):
            out[f"{prefix}.down_proj.weight"] = tensor.transpose(1, 2) if cfg.model_type == "gpt_oss" else tensor
        elif name.endswith("kv_b_proj.weight"):
            heads, nope = cfg.num_attention_heads, cfg.qk_nope_head_dim
            per_head = tensor.view(heads, nope + cfg.v_head_dim, tensor.shape[-1])
            k_b, v_b = per_head.split([nope, cfg.v_head_dim], dim=1)
            out[name.replace("kv_b_proj", "k_b_proj")] = k_b.transpose(1, 2)
            out[name.replace("kv_b_proj", "v_b_proj")] = v_b
        elif "experts.gate_up_proj_bias" in name or "experts.down_proj_bias" in name:
            continue  # biases are not weights nsds reads
        else:
            out[name] = tensor
    return out


def expected_roles(model, model_type: str, i: int) -> dict[str, torch.Tensor]:
    """The roles read straight off the in-memory modules, in nn.Linear layout."""
    cfg = model.config
    if model_type == "gpt2":
        block = model.transformer.h[i]
        q, k, v = block.attn.c_attn.weight.T.split(cfg.n_embd)
        return {"q": q, "k": k, "v": v, "o": block.attn.c_proj.weight.T, "up": block.mlp.c_fc.weight.T,
                "down": block.mlp.c_proj.weight.T}  # fmt: skip
    if model_type == "gpt_neox":
        block = model.gpt_neox.layers[i]
        heads, dh = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
        fused = block.attention.query_key_value.weight.view(heads, 3 * dh, cfg.hidden_size)
        q, k, v = (fused[:, j * dh : (j + 1) * dh].reshape(heads * dh, -1) for j in range(3))
        return {"q": q, "k": k, "v": v, "o": block.attention.dense.weight, "up": block.mlp.dense_h_to_4h.weight,
                "down": block.mlp.dense_4h_to_h.weight}  # fmt: skip
    if model_type == "opt":
        block = model.model.decoder.layers[i]
        att = block.self_attn
        return {"q": att.q_proj.weight, "k": att.k_proj.weight, "v": att.v_proj.weight, "o": att.out_proj.weight,
                "up": block.fc1.weight, "down": block.fc2.weight}  # fmt: skip
    block = model.model.layers[i]
    att, mlp = block.self_attn, block.mlp
    if model_type == "phi3":
        q_rows, kv_rows = cfg.num_attention_heads * att.head_dim, cfg.num_key_value_heads * att.head_dim
        fused = att.qkv_proj.weight
        gate, up = mlp.gate_up_proj.weight.chunk(2)
        return {"q": fused[:q_rows], "k": fused[q_rows : q_rows + kv_rows], "v": fused[q_rows + kv_rows :],
                "o": att.o_proj.weight, "up": up, "gate": gate, "down": mlp.down_proj.weight}  # fmt: skip
    return {"q": att.q_proj.weight, "k": att.k_proj.weight, "v": att.v_proj.weight, "o": att.o_proj.weight,
            "up": mlp.up_proj.weight, "gate": mlp.gate_proj.weight, "down": mlp.down_proj.weight}  # fmt: skip


def save_tiny_tokenizer(
    folder, text: str = "The quick brown fox jumps over the lazy dog. ", vocab_size: int = 300, add_bos: bool = False
) -> None:
    """A byte-level BPE trained on `text`, saved as a transformers tokenizer (no hub needed)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<s>"])  # fmt: skip
    tokenizer.train_from_iterator([text * 20], trainer)
    if add_bos:
        tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="<s>").save_pretrained(folder)


def whole_log_probs(model: torch.nn.Module, windows: torch.Tensor):
    """(window ids, float32 log-probabilities of positions 0..n-2) of a whole loaded model, window by window:
    what LayerwiseModel.log_probs gives, computed the plain way."""
    with torch.inference_mode():
        for window in windows:
            logits = model(input_ids=window.unsqueeze(0)).logits[0, :-1].float()
            yield window, torch.log_softmax(logits, dim=-1)
