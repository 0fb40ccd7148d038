"""Every supported family: a tiny randomly initialised transformers model saved to safetensors; the
streamed role tensors must equal the in-memory model's modules (fused tensors split as the model does).
"""

import pytest
import torch
import transformers as tf

from nsds import arch
from nsds.errors import NsdsError
from nsds.weights import SafetensorsSource, open_source

from tiny_models import expected_roles

LLAMA_LIKE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, vocab_size=128)

CONFIGS = {
    "llama": tf.LlamaConfig(**LLAMA_LIKE, num_key_value_heads=2, tie_word_embeddings=False),
    "mistral": tf.MistralConfig(**LLAMA_LIKE, num_key_value_heads=1),
    "qwen2": tf.Qwen2Config(**LLAMA_LIKE, num_key_value_heads=2, tie_word_embeddings=False),
    "qwen3": tf.Qwen3Config(**LLAMA_LIKE, num_key_value_heads=2, head_dim=24),
    "gemma": tf.GemmaConfig(**LLAMA_LIKE, num_key_value_heads=1, head_dim=32),
    "gemma2": tf.Gemma2Config(**LLAMA_LIKE, num_key_value_heads=2, head_dim=40),
    "gemma3_text": tf.Gemma3TextConfig(**LLAMA_LIKE, num_key_value_heads=1, head_dim=48),
    "phi3": tf.Phi3Config(**LLAMA_LIKE, num_key_value_heads=2, pad_token_id=0, tie_word_embeddings=False),
    "gpt2": tf.GPT2Config(n_embd=64, n_layer=3, n_head=4, vocab_size=128, n_positions=64),
    "gpt_neox": tf.GPTNeoXConfig(**LLAMA_LIKE, tie_word_embeddings=False),
    "opt": tf.OPTConfig(hidden_size=64, ffn_dim=96, num_hidden_layers=3, num_attention_heads=4, vocab_size=128,
                        word_embed_proj_dim=32, max_position_embeddings=64),
}  # fmt: skip


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def tiny(request, tmp_path_factory):
    torch.manual_seed(0)
    model_type = request.param
    model = tf.AutoModelForCausalLM.from_config(CONFIGS[model_type]).eval()
    folder = tmp_path_factory.mktemp(model_type)
    # Shard one family so the index path is exercised too.
    model.save_pretrained(folder, max_shard_size="100KB" if model_type == "llama" else "5GB")
    return model_type, model, folder


def test_streamed_roles_equal_module_weights(tiny):
    model_type, model, folder = tiny
    with open_source(str(folder)) as source:
        assert isinstance(source, SafetensorsSource)
        family = arch.family_of(source.config.model_type)
        geo = arch.geometry(source.config)
        names = source.names()
        body = arch.find_body(family, names)
        for i in range(geo.num_layers):
            prefix = f"{body}{family.layers}.{i}."
            roles = arch.layer_roles(family, geo, lambda rel, prefix=prefix: source.tensor(prefix + rel))
            expected = expected_roles(model, model_type, i)
            for role in ("q", "k", "v", "o", "up", "gate", "down"):
                got = getattr(roles, role)
                if role not in expected:
                    assert got is None, role
                    continue
                assert torch.equal(got, expected[role].detach()), (model_type, i, role)
        unembedding = source.tensor(arch.unembedding_name(family, geo, body, names))
        head = model.get_output_embeddings().weight
        assert torch.equal(unembedding, head.detach()), "W_U must be the output head (tied or not)"


def test_geometry_uses_config_head_dim(tiny):
    model_type, model, _ = tiny
    geo = arch.geometry(model.config)
    explicit = getattr(model.config, "head_dim", None)
    assert geo.head_dim == (explicit or geo.hidden_size // geo.num_heads)
    if model_type in ("qwen3", "gemma2", "gemma3_text"):
        assert geo.head_dim != geo.hidden_size // geo.num_heads  # the case the authors' script got wrong


@pytest.mark.parametrize("tiny", ["opt"], indirect=True)
def test_opt_unembedding_goes_through_project_out(tiny):
    _, _, folder = tiny
    with open_source(str(folder)) as source:
        family = arch.family_of("opt")
        body = arch.find_body(family, source.names())
        assert arch.unembedding_projection_name(family, body, source.names()) == "model.decoder.project_out.weight"


def test_multimodal_gemma3_scores_its_language_model(tmp_path):
    """Gemma-3 with a vision tower: the tower's layers match the same names; the text stack must win."""
    torch.manual_seed(0)
    text = dict(LLAMA_LIKE, num_key_value_heads=1, head_dim=48)
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)  # fmt: skip
    model = tf.Gemma3ForConditionalGeneration(tf.Gemma3Config(text_config=text, vision_config=vision))
    model.save_pretrained(tmp_path)
    with open_source(str(tmp_path)) as source:
        family, geo = arch.family_of("gemma3"), arch.geometry(source.config)
        assert (geo.num_layers, geo.head_dim) == (3, 48)
        body = arch.find_body(family, source.names())
        roles = arch.layer_roles(family, geo, lambda rel: source.tensor(f"{body}layers.1.{rel}"))
        language = model.model.language_model.layers[1]
        assert torch.equal(roles.q, language.self_attn.q_proj.weight.detach())
        assert torch.equal(roles.down, language.mlp.down_proj.weight.detach())


def test_unsupported_architecture_is_a_clear_error(tmp_path):
    config = tf.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37)
    config.save_pretrained(tmp_path)
    with pytest.raises(NsdsError, match=r"unsupported architecture 'bert'; supported model types: llama, mistral"):
        open_source(str(tmp_path))
