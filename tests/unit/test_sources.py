"""Weight sources: GGUF names and llama.cpp's q/k permutation undone, the same scores from every
source of the same weights, and clear errors for broken inputs."""

import json

import pytest
import torch

from nsds import arch
from nsds.errors import NsdsError
from nsds.geometry import Geometry
from nsds.scorers.nsds import score
from nsds.weights import GGUFSource, ModuleSource, open_source

from tiny_models import expected_roles, tiny_model, write_gguf


@pytest.mark.parametrize("arch_name", ["llama", "qwen2", "qwen3", "gemma3", "phi3", "gpt2"])
def test_gguf_source_matches_transformers_gguf_loader(arch_name, tmp_path):
    """Our GGUF reading (names, q/k un-permutation, GPT-2 transposes, config) against transformers' own."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = tmp_path / "tiny.gguf"
    write_gguf(tiny_model(arch_name), path, arch_name)
    reference_config = AutoConfig.from_pretrained(tmp_path, gguf_file=path.name)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
    with GGUFSource(path) as source:
        assert arch.geometry(source.config) == arch.geometry(reference_config)
        family, geo = arch.family_of(source.config.model_type), arch.geometry(source.config)
        for i in range(geo.num_layers):
            prefix = f"{family.body}{family.layers}.{i}."
            roles = arch.layer_roles(family, geo, lambda rel, prefix=prefix: source.tensor(prefix + rel))
            for role, tensor in expected_roles(loaded, loaded.config.model_type, i).items():
                assert torch.equal(getattr(roles, role), tensor.detach()), (arch_name, i, role)


def test_gguf_source_undoes_the_rotary_permutation(tiny_llama, tmp_path):
    path = tmp_path / "tiny.gguf"
    write_gguf(tiny_llama, path, "llama")
    with open_source(str(path)) as source:
        assert isinstance(source, GGUFSource)
        layer = tiny_llama.model.layers[2]
        for rel, module in [("self_attn.q_proj.weight", layer.self_attn.q_proj),
                            ("self_attn.k_proj.weight", layer.self_attn.k_proj),
                            ("mlp.down_proj.weight", layer.mlp.down_proj)]:  # fmt: skip
            assert torch.equal(source.tensor(f"model.layers.2.{rel}"), module.weight.detach())


def test_every_source_gives_the_same_scores(tiny_llama, tiny_llama_folder, tmp_path):
    path = tmp_path / "tiny.gguf"
    write_gguf(tiny_llama, path, "llama")
    reports = [score(open_source(str(path))), score(open_source(str(tiny_llama_folder))),
               score(ModuleSource(tiny_llama))]  # fmt: skip
    for report in reports[1:]:
        assert report.scores == pytest.approx(reports[0].scores, abs=1e-12)
        assert report.ranking == reports[0].ranking
    assert reports[0].model["files"][0]["sha256"] and reports[0].model["source"] == "gguf"


def test_corrupt_gguf_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 20)
    with pytest.raises(NsdsError, match="cannot read GGUF file"):
        open_source(str(bad))


def test_truncated_safetensors_is_a_clear_error(tiny_llama_folder, tmp_path):
    folder = tmp_path / "truncated"
    folder.mkdir()
    (folder / "config.json").write_text((tiny_llama_folder / "config.json").read_text())
    data = (tiny_llama_folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(NsdsError, match="corrupt or truncated"):
        score(open_source(str(folder)))


def test_nan_weight_is_named(tiny_llama, tmp_path):
    path = tmp_path / "nan.gguf"
    write_gguf(tiny_llama, path, "llama", nan_in="model.layers.1.mlp.down_proj.weight")
    with pytest.raises(NsdsError, match=r"'model\.layers\.1\.mlp\.down_proj\.weight' holds NaN or Inf"):
        score(open_source(str(path)))


def test_missing_shard_and_missing_config(tiny_llama_folder, tmp_path):
    (tmp_path / "config.json").write_text((tiny_llama_folder / "config.json").read_text())
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "shard-1.safetensors"}}))
    with pytest.raises(NsdsError, match="missing shard"):
        open_source(str(tmp_path))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(NsdsError, match="not a model folder"):
        open_source(str(empty))


def test_incomplete_checkpoint_names_the_missing_tensor(tiny_llama, tmp_path):
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in tiny_llama.state_dict().items() if "layers.3.mlp.up_proj" not in k}
    save_file(state, tmp_path / "model.safetensors")
    tiny_llama.config.save_pretrained(tmp_path)
    with pytest.raises(NsdsError, match=r"no tensor 'model\.layers\.3\.mlp\.up_proj\.weight'"):
        score(open_source(str(tmp_path)))


def test_geometry_rejects_bad_gqa():
    class Config:
        model_type = "llama"
        num_attention_heads, num_key_value_heads, hidden_size, num_hidden_layers = 6, 4, 48, 2

    with pytest.raises(NsdsError, match="not a multiple"):
        arch.geometry(Config())


def test_unembedding_must_exist():
    family = arch.family_of("llama")
    geo = Geometry("llama", "llama", 1, 8, 2, 2, 4, tied_embeddings=False)
    with pytest.raises(NsdsError, match=r"lm_head\.weight"):
        arch.unembedding_name(family, geo, "model.", {"model.embed_tokens.weight"})


def test_already_quantized_checkpoint_is_refused(tiny_llama_folder, tmp_path):
    config = json.loads((tiny_llama_folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(NsdsError, match=r"already quantized \(gptq\)"):
        open_source(str(tmp_path))
