"""Mixture-of-experts and multi-head latent attention, on tiny randomly initialised transformers models of
every MoE family, saved as safetensors and written as GGUF the way llama.cpp's converter writes them:
streamed expert tensors equal the modules' weights, every expert is planned and counted, a plan applies
to the fused 3-D expert parameters, and `nsds run` works end to end."""

import json

import pytest
import torch

from nsds import arch
from nsds.config import RunConfig
from nsds.errors import NsdsError
from nsds.pipeline import run
from nsds.plan import Plan
from nsds.quantize import WeightBank, make_quantizer
from nsds.scorers.nsds import score
from nsds.scores import ScoreReport
from nsds.weights import GGUFSource, ModuleSource, open_source

from tiny_models import MOE_TYPES, save_tiny_tokenizer, tiny_model, write_gguf

GGUF_ARCH = {"mixtral": "llama", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe", "olmoe": "olmoe",
             "deepseek_v2": "deepseek2", "deepseek_v3": "deepseek2", "gpt_oss": "gpt-oss"}  # fmt: skip
# llama.cpp's qwen2moe has no dense layers, so its GGUF is written without Qwen's mlp_only_layers.
GGUF_OVERRIDES = {"qwen2_moe": {"mlp_only_layers": []}}


def expected_experts(model, model_type: str, i: int) -> dict[str, tuple[torch.Tensor, ...]]:
    """Layer i's experts (gate, up, down in nn.Linear layout) read off the in-memory modules (written
    independently of nsds); {} for a dense layer."""
    mlp = model.model.layers[i].mlp
    experts = getattr(mlp, "experts", None)
    if experts is None:
        return {}
    out = {}
    for j in range(experts.gate_up_proj.shape[0]):
        fused, down = experts.gate_up_proj[j].detach(), experts.down_proj[j].detach()
        if model_type == "gpt_oss":  # (d, 2F) with gate/up columns interleaved, down (F, d)
            out[str(j)] = (fused[:, ::2].T, fused[:, 1::2].T, down.T)
        else:
            out[str(j)] = (*fused.chunk(2), down)
    shared = getattr(mlp, "shared_expert", None) or getattr(mlp, "shared_experts", None)
    if shared is not None:
        out["shared"] = tuple(getattr(shared, f"{p}_proj").weight.detach() for p in ("gate", "up", "down"))
    return out


def streamed_experts(source) -> list[dict[str, tuple[torch.Tensor, ...]]]:
    family, geo = arch.family_of(source.config.model_type), arch.geometry(source.config)
    body = arch.find_body(family, source.names())
    layers = []
    for i in range(geo.num_layers):
        experts = arch.layer_experts(family, geo, arch.source_layer(source, family, body, i))
        layers.append({e.name: (e.gate(), e.up(), e.down()) for e in experts})
    return layers


def assert_same_experts(model, model_type: str, source, exact: bool = True) -> None:
    streamed = streamed_experts(source)
    assert any(streamed), "no MoE layer found"
    for i, layer in enumerate(streamed):
        expected = expected_experts(model, model_type, i)
        assert layer.keys() == expected.keys(), (model_type, i)
        for name, matrices in expected.items():
            for got, want in zip(layer[name], matrices, strict=True):
                assert torch.equal(got, want) if exact else torch.allclose(got, want), (model_type, i, name)


@pytest.fixture(scope="module", params=MOE_TYPES)
def moe(request, tmp_path_factory):
    model = tiny_model(request.param)
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder)
    return request.param, model, folder


def test_streamed_experts_equal_module_weights(moe):
    """On disk per expert (gpt-oss: fused, transposed, interleaved), in memory fused 3-D: the same matrices."""
    model_type, model, folder = moe
    with open_source(str(folder)) as source:
        assert_same_experts(model, model_type, source)
    assert_same_experts(model, model_type, ModuleSource(model))


def test_fused_checkpoint_reads_the_same(tmp_path):
    """transformers 5 can also save its fused 3-D parameters as they are (save_original_format=False)."""
    model = tiny_model("mixtral")
    model.save_pretrained(tmp_path, save_original_format=False)
    with open_source(str(tmp_path)) as source:
        assert "model.layers.0.mlp.experts.gate_up_proj" in source.names()
        assert_same_experts(model, "mixtral", source)


@pytest.mark.parametrize("model_type", MOE_TYPES)
def test_gguf_experts_equal_module_weights(model_type, tmp_path):
    """llama.cpp's one 3-D tensor per projection (ffn_*_exps, shared ffn_*_shexp), one expert dequantized
    at a time; DeepSeek's kv_b rebuilt from attn_k_b/attn_v_b; the same modules and scores as the model."""
    model = tiny_model(model_type, **GGUF_OVERRIDES.get(model_type, {}))
    path = tmp_path / "tiny.gguf"
    write_gguf(model, path, GGUF_ARCH[model_type])
    with GGUFSource(path) as source:
        assert source.config.model_type == model_type
        assert arch.geometry(source.config) == arch.geometry(model.config)
        assert_same_experts(model, model_type, source)
        assert arch.source_modules(source) == arch.linear_modules(model)
        if model_type.startswith("deepseek"):
            kv_b = source.tensor("model.layers.1.self_attn.kv_b_proj.weight")
            assert torch.equal(kv_b, model.model.layers[1].self_attn.kv_b_proj.weight.detach())
        from_gguf = score(source)
    in_memory = score(ModuleSource(model))
    assert from_gguf.scores == pytest.approx(in_memory.scores, abs=1e-9)


def test_every_source_gives_the_same_scores(moe):
    _, model, folder = moe
    with open_source(str(folder)) as source:
        streamed = score(source)
    assert streamed.scores == score(ModuleSource(model)).scores


def test_scores_break_down_per_expert(moe):
    """scores.json: each MoE layer's up/gate/down with every expert's raw values; the layer's value is
    their parameter-weighted mean (shared experts weigh by their width)."""
    model_type, model, folder = moe
    with open_source(str(folder)) as source:
        report = score(source)
    data = report.to_dict()
    assert ScoreReport.from_dict(data) == report
    moe_layers = [layer for layer in report.layers if layer.roles["up"].experts is not None]
    assert moe_layers and len(moe_layers) == sum(bool(expected_experts(model, model_type, i)) for i in range(4))
    for layer in moe_layers:
        for role in ("up", "gate", "down"):
            parts = layer.roles[role].experts
            names = [str(j) for j in range(4)] + (["shared"] if "shared" in parts else [])
            assert list(parts) == names
            total = sum(p.params for p in parts.values())
            for aspect in ("nv", "se"):
                mean = sum(getattr(p, f"{aspect}_raw") * p.params for p in parts.values()) / total
                assert getattr(layer.roles[role], f"{aspect}_raw") == pytest.approx(mean, rel=1e-12)
    if model_type.startswith("deepseek"):
        assert report.roles[-1] == "qk_rope" and report.layers[0].roles["up"].experts is None  # dense layer 0


def test_mla_circuits_go_through_the_low_rank_factors():
    """DeepSeek: q_h = W_qb^h W_qa, k_h = W_kb^h W_kva, v_h = W_vb^h W_kva; rotary rows apart (docs/METHOD.md)."""
    model = tiny_model("deepseek_v3")
    family, geo = arch.family_of("deepseek_v3"), arch.geometry(model.config)
    att = model.model.layers[2].self_attn
    source = ModuleSource(model)
    roles = arch.layer_roles(family, geo, arch.source_layer(source, family, "model.", 2))
    heads, nope, rope, dv, rank = 4, 16, 8, 12, 16
    q_b = att.q_b_proj.weight.detach().double().view(heads, nope + rope, -1)
    q_a = att.q_a_proj.weight.detach().double()
    kv_a = att.kv_a_proj_with_mqa.weight.detach().double()
    kv_b = att.kv_b_proj.weight.detach().double().view(heads, nope + dv, rank)
    for h in range(heads):
        q = roles.q.double()[h * nope : (h + 1) * nope]
        k = roles.k.double()[h * nope : (h + 1) * nope]
        v = roles.v.double()[h * dv : (h + 1) * dv]
        assert torch.allclose(q, q_b[h, :nope] @ q_a) and torch.allclose(k, kv_b[h, :nope] @ kv_a[:rank])
        assert torch.allclose(v, kv_b[h, nope:] @ kv_a[:rank])
        assert torch.allclose(roles.q_rope.double()[h * rope : (h + 1) * rope], q_b[h, nope:] @ q_a)
    assert torch.equal(roles.k_rope, att.kv_a_proj_with_mqa.weight.detach()[rank:])


@pytest.mark.parametrize("per_expert", [False, True])
def test_plans_count_every_expert_and_never_the_router(moe, per_expert):
    _, model, _ = moe
    modules = arch.linear_modules(model, per_expert=per_expert)
    names = {m.name for m in modules}
    planned = 0
    for name, p in model.named_parameters():
        if "router" in name or name.endswith(("mlp.gate.weight", "shared_expert_gate.weight")):
            assert not any(n.startswith(name.rsplit(".", 1)[0]) for n in names), name  # routers stay full
        elif p.ndim == 3:
            planned += p.numel()  # fused experts: every expert's slice is a module
        elif p.ndim == 2 and name.rsplit(".", 1)[0] in names:
            planned += p.numel()
    assert sum(m.params for m in modules) == planned
    routed = [m for m in modules if m.expert not in (None, "shared")]
    assert {m.expert for m in routed} == {"0", "1", "2", "3"}
    groups = {m.group for m in routed}
    layers = len({m.layer for m in routed})
    assert len(groups) == (8 * layers if per_expert else 2 * layers)  # (layer[, expert], gate_up | down)


def test_plan_applies_to_fused_expert_parameters(moe):
    """Each expert's slice of the 3-D parameters is quantized at its own width, and restored exactly."""
    model_type, model, _ = moe
    modules = arch.linear_modules(model, per_expert=True)
    quantizer = make_quantizer("rtn", 16)
    bank = WeightBank(model, [m.name for m in modules], quantizer, keep=False)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    pristine = [{name: tuple(w.clone() for w in ws) for name, ws in expected_experts(model, model_type, i).items()}
                for i in range(4)]  # fmt: skip
    width = {"0": 4, "1": 2, "2": 3, "3": 4, "shared": 2}
    bank.load({m.name: width[m.expert] if m.expert else 8 for m in modules})
    for i in range(4):
        for name, matrices in expected_experts(model, model_type, i).items():
            for got, weight in zip(matrices, pristine[i][name], strict=True):
                assert torch.equal(got, quantizer.fake_quantize(weight, width[name])), (model_type, i, name)
    bank.restore()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


TEXT = "The quick brown fox jumps over the lazy dog. A lazy dog sleeps while the quick fox runs. " * 30


@pytest.fixture(scope="module")
def moe_folder(tmp_path_factory):
    """DeepSeek-V3 shaped: MLA, a dense first layer, routed and shared experts; with a tokenizer and a text."""
    folder = tmp_path_factory.mktemp("tiny-moe-run")
    tiny_model("deepseek_v3", vocab_size=300).save_pretrained(folder)
    save_tiny_tokenizer(folder, TEXT)
    (folder / "text.txt").write_text(TEXT)
    return folder


@pytest.mark.parametrize(("quantizer", "per_expert"), [("rtn", False), ("hqq", True)])
def test_run_plans_and_evaluates_a_moe_model(moe_folder, tmp_path, quantizer, per_expert):
    out = tmp_path / "out"
    result = run(RunConfig(model=str(moe_folder), budget=3.0, quantizer=quantizer, group_size=16,
                           text=str(moe_folder / "text.txt"), tokens=200, window=32, out=out, device="cpu",
                           per_expert=per_expert))  # fmt: skip
    plan = Plan.load(out / "plan.json")
    experts = [m for m in plan.modules if ".mlp.experts." in m.name]
    assert len(experts) == 3 * 4 * 3  # 3 MoE layers x 4 experts x (gate, up, down)
    assert plan.params == sum(m.params for m in arch.source_modules(open_source(str(moe_folder))))
    assert plan.weight_bits <= 3.0 and result.evaluations[1].weight_bits == plan.weight_bits
    if not per_expert:  # one width per (layer, projection over experts)
        for layer in (1, 2, 3):
            for role in ("gate", "up", "down"):
                assert len({m.bits for m in experts if m.layer == layer and m.role == role}) == 1
    assert all(e.ppl > 1 for e in result.evaluations)
    scores = json.loads((out / "scores.json").read_text())
    assert set(scores["layers"][1]["roles"]["down"]["experts"]) == {"0", "1", "2", "3", "shared"}
    assert scores["geometry"]["experts"] == 4 and scores["geometry"]["kv_lora_rank"] == 16


def test_moe_limits_are_one_line_errors(moe_folder, tiny_llama_folder, tmp_path):
    common = dict(text=str(moe_folder / "text.txt"), tokens=200, window=32, device="cpu")
    with pytest.raises(NsdsError, match="gguf quantizer cannot plan mixture-of-experts"):
        run(RunConfig(model=str(moe_folder), quantizer="gguf", budget=4.5, widths=(4, 6), out=tmp_path / "a",
                      **common))  # fmt: skip
    with pytest.raises(NsdsError, match="--save writes HQQ's format"):
        run(RunConfig(model=str(moe_folder), quantizer="hqq", out=tmp_path / "b", save=tmp_path / "s", **common))
    with pytest.raises(NsdsError, match="this model has no experts"):
        run(RunConfig(model=str(tiny_llama_folder), per_expert=True, out=tmp_path / "c", **common))


def test_missing_expert_is_a_clear_error(tmp_path):
    from safetensors.torch import save_file

    model = tiny_model("qwen3_moe")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    folder = tmp_path / "fused"
    model.save_pretrained(folder, save_original_format=False)
    state = {k: v for k, v in state.items() if k != "model.layers.2.mlp.experts.down_proj"}
    save_file(state, folder / "model.safetensors")
    with pytest.raises(NsdsError, match=r"no tensor 'model\.layers\.2\.mlp\.experts\.down_proj'"):
        score(open_source(str(folder)))
