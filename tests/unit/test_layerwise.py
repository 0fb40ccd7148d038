"""A model run one decoder layer at a time gives exactly the whole model's numbers: log-probabilities and a
change made to one layer (tiny models of every dense family, written as safetensors checkpoints; experts
transformers fuses on load run resident). The layer-by-layer Fisher information: tests/unit/test_fisher.py."""

import pytest
import torch

from nsds.errors import NsdsError
from nsds.layerwise import LayerwiseModel

from tiny_models import tiny_model, whole_log_probs

DENSE = ("llama", "qwen2", "qwen3", "gemma3", "phi3", "gpt2")


def _checkpoint(model_type: str, folder):
    model = tiny_model(model_type)
    model.save_pretrained(folder)
    return model


def _whole(model, windows):
    return [logp for _, logp in whole_log_probs(model, windows)]


@pytest.mark.parametrize("model_type", DENSE)
def test_log_probs_equal_the_whole_models_and_layers_are_released(model_type, tmp_path):
    model = _checkpoint(model_type, tmp_path)
    windows = torch.randint(0, 90, (3, 24), generator=torch.Generator().manual_seed(1))
    lm = LayerwiseModel(tmp_path)
    assert not lm.resident
    layerwise = [logp for _, logp in lm.log_probs(windows)]
    assert all(torch.equal(a, b) for a, b in zip(_whole(model, windows), layerwise, strict=True))
    assert all(p.device.type == "meta" for p in lm.layers.parameters())  # no layer holds storage after a pass
    stem = [p for name, p in lm.model.named_parameters() if not name.startswith(lm.prefix)]
    assert stem and all(p.device.type == "cpu" for p in stem)
    if model.config.tie_word_embeddings:
        assert lm.model.get_output_embeddings().weight is lm.model.get_input_embeddings().weight


def test_a_change_to_one_layer_is_the_same_change_to_the_whole_model(tmp_path):
    model = _checkpoint("llama", tmp_path)
    windows = torch.randint(0, 90, (2, 16), generator=torch.Generator().manual_seed(2))

    def halve(i: int, target: torch.nn.Module) -> None:
        if i == 2:
            target.get_submodule("model.layers.2.mlp.down_proj").weight.mul_(0.5)

    lm = LayerwiseModel(tmp_path)
    layerwise = [logp for _, logp in lm.log_probs(windows, prepare=halve)]
    with torch.no_grad():
        halve(2, model)
    assert all(torch.equal(a, b) for a, b in zip(_whole(model, windows), layerwise, strict=True))
    assert not all(torch.equal(a, b) for a, (_, b) in zip(layerwise, lm.log_probs(windows), strict=True))


def test_experts_transformers_fuses_on_load_run_resident(tmp_path):
    model = _checkpoint("mixtral", tmp_path)
    windows = torch.randint(0, 90, (2, 16), generator=torch.Generator().manual_seed(3))
    lm = LayerwiseModel(tmp_path)
    assert lm.resident
    layerwise = [logp for _, logp in lm.log_probs(windows)]
    assert all(torch.equal(a, b) for a, b in zip(_whole(model, windows), layerwise, strict=True))


def test_a_config_transformers_cannot_read_is_one_line(tmp_path):
    _checkpoint("llama", tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(NsdsError, match="transformers cannot load the config in") as err:
        LayerwiseModel(tmp_path)
    assert "\n" not in str(err.value)
