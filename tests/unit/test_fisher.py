"""The Fisher information on the model's own samples: deterministic self-text, and the layer-by-layer diagonal
against an independent per-sequence gradient computation on the whole model (also for experts sliced from
fused 3-D parameters)."""

import pytest
import torch
import torch.nn.functional as F

from nsds import arch
from nsds.fisher import layerwise_fisher, self_text
from nsds.layerwise import LayerwiseModel

from tiny_models import tiny_model


def test_self_text_is_seeded_cut_to_the_context_and_leaves_the_callers_random_state():
    model = tiny_model("llama")  # context 64
    torch.manual_seed(5)
    state = torch.random.get_rng_state()
    text = self_text(model, bos=3, sequences=4, length=200)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert text.shape == (4, 64) and (text[:, 0] == 3).all()
    assert torch.equal(text, self_text(model, bos=3, sequences=4, length=200))
    assert not torch.equal(text, self_text(model, bos=3, sequences=4, length=200, seed=1))
    assert len({tuple(row.tolist()) for row in text}) == 4  # sampled, not greedy


@pytest.mark.parametrize("model_type", ["llama", "gemma3", "gpt2", "mixtral"])
def test_layerwise_fisher_is_the_mean_squared_sequence_gradient(model_type, tmp_path):
    """Layer by layer (mixtral: resident, its experts sliced from fused 3-D parameters), handed over from the
    last layer down while each layer is loaded, and no file left behind."""
    model = tiny_model(model_type)
    model.save_pretrained(tmp_path / "model")
    modules = arch.linear_modules(model, fuse=True)
    tokens = self_text(model, bos=1, sequences=3, length=12)
    assert tokens.shape == (3, 13)
    lm = LayerwiseModel(tmp_path / "model")
    assert lm.resident == (model_type == "mixtral")
    seen, fisher = [], {}

    def each_layer(i: int, found: dict[str, torch.Tensor]) -> None:
        assert all(p.device.type != "meta" for p in lm.layers[i].parameters())
        assert {m.name for m in modules if m.layer == i} == set(found)
        seen.append(i)
        fisher.update(found)

    layerwise_fisher(lm, modules, tokens, tmp_path, each_layer)
    assert seen == [3, 2, 1, 0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # the layers' inputs are gone
    assert all(p.grad is None and not p.requires_grad for p in lm.model.parameters())
    parameters = dict(model.named_parameters())
    expected = {name: torch.zeros_like(p) for name, p in parameters.items()}
    for sequence in tokens:  # every parameter's gradient, one sequence at a time, by plain backward
        model.zero_grad()
        logits = model(input_ids=sequence[None]).logits[0, :-1]
        F.cross_entropy(logits, sequence[1:], reduction="sum").backward()
        for name, p in parameters.items():
            if p.grad is not None:
                expected[name] += p.grad.square() / (3 * 12)  # per token: 12 predicted tokens per sequence
    model.zero_grad()
    experts = [m for m in modules if "experts" in m.name]
    for name, p in parameters.items():  # a fused experts parameter: its modules' slices add up to all of it
        slices = [fisher[m.name] for m in experts if arch.module_weight(model, m.name)[0]._base is p]
        if slices:
            assert sum(float(f.sum()) for f in slices) == pytest.approx(float(expected[name].sum()), rel=1e-4)
    assert experts or model_type != "mixtral"
    for m in modules:
        assert fisher[m.name].shape == (m.out_features, m.in_features) and (fisher[m.name] >= 0).all()
        if "experts" not in m.name:
            weight = model.get_submodule(m.name).weight
            name = next(n for n, p in parameters.items() if p is weight)
            own = expected[name].T if arch.module_weight(model, m.name)[1] else expected[name]
            assert torch.allclose(fisher[m.name], own, rtol=1e-4, atol=1e-12), m.name
