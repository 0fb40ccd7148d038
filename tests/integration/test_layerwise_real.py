"""The real models run one layer at a time (read from their GGUF files as transformers reads them) give the
transformers-loaded models' log-probabilities bit for bit."""

import pytest
import torch

from nsds.layerwise import LayerwiseModel

from tiny_models import whole_log_probs


@pytest.mark.parametrize("name", ["smollm2", "gemma3-270m"])
def test_layer_by_layer_equals_the_loaded_model(name, request):
    path = request.getfixturevalue({"smollm2": "smollm2_gguf", "gemma3-270m": "gemma3_gguf"}[name])
    model = request.getfixturevalue({"smollm2": "smollm2_hf", "gemma3-270m": "gemma3_hf"}[name])
    windows = torch.randint(0, 40000, (2, 96), generator=torch.Generator().manual_seed(0))
    whole = [logp for _, logp in whole_log_probs(model, windows)]
    lm = LayerwiseModel(path)
    assert not lm.resident
    layerwise = [logp for _, logp in lm.log_probs(windows)]
    assert all(torch.equal(a, b) for a, b in zip(whole, layerwise, strict=True))
