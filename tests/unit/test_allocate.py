"""Allocators: budgets met from below, feasibility errors, fused groups, parameter weighting, optimality."""

import itertools
import math
import re
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nsds.allocate import (
    FISHER_REGIME,
    MIN_PREDICTED_GAIN,
    PRIOR_WEIGHT,
    Evidence,
    PredictedLoss,
    Setting,
    allocate,
    budgeted,
    check_setting,
    fisher_cost,
    higgs,
    knapsack,
    least_error,
    llama_cpp,
    llama_cpp_favours,
    plan_for,
    random_scores,
    topk,
    uniform,
    uniform_setting,
    use_more_bits,
)
from nsds.distortion import ErrorTable, ModuleError
from nsds.errors import NsdsError
from nsds.plan import Module, Plan
from nsds.quantize import make_quantizer
from nsds.quantize.rtn import RTN


def layered(layers: int, sizes=((64, 64),), fuse_all=False) -> list[Module]:
    """`layers` decoder layers, each with modules of the given (out, in) shapes."""
    return [
        Module(f"l{i}.m{j}", i, f"r{j}", out, inp, f"{i}" if fuse_all else f"{i}.{j}")
        for i in range(layers)
        for j, (out, inp) in enumerate(sizes)
    ]


def setting(budget, widths=(2, 4), group_size=64, **kw) -> Setting:
    """An asymmetric RTN setting: 16-bit scale and 16-bit zero point per group."""
    return Setting(budget=budget, widths=widths, quantizer=RTN(group_size), model="test", **kw)


def test_topk_is_the_papers_rule():
    scores = [0.1 * (i % 7) for i in range(30)]  # ties on purpose
    plan = topk(layered(30), scores, setting(2.5))
    high = [m.layer for m in plan.modules if m.bits == 4]
    assert len(high) == 7 == math.floor(30 * (2.5 - 2) / (4 - 2))  # never over budget, unlike round(7.5)
    order = sorted(range(30), key=lambda i: (-scores[i], i))
    assert high == sorted(order[:7])
    assert plan.weight_bits == pytest.approx((7 * 4 + 23 * 2) / 30) and plan.weight_bits <= 2.5
    assert topk(layered(30), scores, setting(4.0)).weight_bits == 4.0
    assert topk(layered(30), scores, setting(2.0)).weight_bits == 2.0


@pytest.mark.parametrize("budget", [1.5, 4.01, -1])
def test_budget_outside_widths_is_an_error(budget):
    with pytest.raises(NsdsError, match="outside what widths"):
        topk(layered(4), [0.5] * 4, setting(budget))


def test_the_reach_a_refusal_shows_is_inside_the_true_one():
    """A budget the message offers is accepted: the floor is shown rounded up, the ceiling down (a ceiling of
    4.27096 is shown as 4.2709, not as 4.271, which it refuses); without shapes, no made-up upper bound."""
    modules = layered(4, sizes=((64, 70),))  # a short last group: the reach has many digits
    storage = setting(9.0, budget_counts="storage")
    with pytest.raises(NsdsError) as err:
        check_setting(storage, modules)
    low, high = (float(x) for x in re.search(r"\[([0-9.]+), ([0-9.]+)\] bits", str(err.value)).groups())
    for budget in (low, high):
        check_setting(replace(storage, budget=budget), modules)  # accepted
    with pytest.raises(NsdsError, match=r"\(at least 2 bits; the exact range depends on the model's shapes\)"):
        check_setting(replace(storage, budget=1.0))


def test_topk_needs_two_widths_and_matching_scores():
    with pytest.raises(NsdsError, match="exactly two widths"):
        topk(layered(4), [0.5] * 4, setting(3, widths=(2, 3, 4)))
    with pytest.raises(NsdsError, match="3 layer scores"):
        topk(layered(4), [0.5] * 3, setting(3))
    with pytest.raises(NsdsError, match="unknown allocator"):
        allocate("greedy", layered(4), Evidence(scores=[0.5] * 4), setting(3))
    with pytest.raises(NsdsError, match="allocator 'error' needs an error table"):
        allocate("error", layered(4), Evidence(scores=[0.5] * 4), setting(3))


def test_parameter_weighting():
    # Layer 0 is three times as large as layer 1: giving it 4 bits costs three times as much.
    modules = [Module("big", 0, "r", 192, 64, "0"), Module("small", 1, "r", 64, 64, "1")]
    plan = topk(modules, [0.9, 0.1], setting(2.5))
    assert {m.name: m.bits for m in plan.modules} == {"big": 2, "small": 2}  # big alone would give 3.5
    plan = topk(modules, [0.1, 0.9], setting(2.5))
    assert {m.name: m.bits for m in plan.modules} == {"big": 2, "small": 4}
    assert plan.weight_bits == pytest.approx((192 * 2 + 64 * 4) / 256)


def test_budget_allocator_fills_the_budget_with_partial_layers():
    modules = layered(30, sizes=((64, 64), (192, 64)))
    scores = [i / 30 for i in range(30)]
    plan = budgeted(modules, scores, setting(2.5))
    assert plan.weight_bits == pytest.approx(2.5)  # exact: layer-level topk can only reach 2.4667
    by_module = {m.name: m.bits for m in plan.modules}
    assert by_module["l29.m1"] == 4 and by_module["l0.m1"] == 2  # most sensitive first


def test_fused_groups_share_a_width():
    modules = layered(8, sizes=((64, 64), (32, 64), (32, 64)), fuse_all=True)
    plan = budgeted(modules, [0.1 * i for i in range(8)], setting(3.1, widths=(2, 3, 4)))
    for layer in range(8):
        assert len({m.bits for m in plan.modules if m.layer == layer}) == 1
    assert plan.weight_bits <= 3.1


def test_storage_budget_counts_scales_and_zeros():
    modules = layered(10, sizes=((64, 128),))
    plan = budgeted(modules, [0.5] * 10, setting(3.0, widths=(2, 3, 4), budget_counts="storage"))
    assert plan.storage_bits <= 3.0 + 1e-9
    assert plan.storage_bits == pytest.approx(plan.weight_bits + 2 * 32 / 128)
    with pytest.raises(NsdsError, match="with group overhead"):
        budgeted(modules, [0.5] * 10, setting(2.2, budget_counts="storage"))


def test_uniform_baseline():
    modules = layered(12)
    plan = uniform(modules, setting(3.0, widths=(2, 3, 4)))
    assert {m.bits for m in plan.modules} == {3}
    plan = uniform(modules, setting(2.5))
    high = sorted({m.layer for m in plan.modules if m.bits == 4})
    assert len(high) == 3 and plan.weight_bits == 2.5  # spread over depth, no scores used
    assert high == [2, 6, 10]


def test_uniform_baseline_is_the_budgets_width_whenever_the_quantizer_has_it():
    """At 3 bits with candidates 2/4 the baseline is 3-bit everywhere (what a user would otherwise run);
    `error`'s fallback stays within its candidates, the 2/4 mix."""
    modules = layered(12)
    assert uniform_setting(setting(3.0)).widths == (3,)
    assert {m.bits for m in plan_for("uniform", modules, Evidence(), setting(3.0)).modules} == {3}
    errors = table(modules, (2, 4), lambda m, w: 4.0**-w)  # every module alike: no plan beats another
    plan = least_error(modules, errors, setting(3.0), edge_weight=1.0, energy_weight=0)
    assert sorted({m.bits for m in plan.modules}) == [2, 4] and plan.weight_bits == 3.0
    assert all(p.reason["fallback"] == "uniform" for p in plan.modules)


def test_the_uniform_and_llama_cpp_brackets_order_gguf_types_by_size():
    """An i-quant's width is its bits per weight, a k-quant's the bits its name states: IQ4_XS (4.25) is smaller
    than Q4_K (4), so between Q3_K's and IQ4_XS's size the bracket is (Q3_K, IQ4_XS), never Q4_K."""
    modules = layered(8, sizes=((256, 256),))
    quantizer = make_quantizer("gguf")
    gguf = Setting(budget=4.0, widths=(3, 4, 4.25), quantizer=quantizer, model="test", budget_counts="storage")
    for plan in (uniform(modules, gguf), llama_cpp(modules, gguf)):
        assert {m.format for m in plan.modules} == {"Q3_K", "IQ4_XS"}, plan.allocator
        assert 3.4375 < plan.storage_bits <= 4.0


def test_plan_bits_accounting_and_json_roundtrip(tmp_path):
    modules = [Module("a", 0, "q", 576, 576, "0"), Module("b", 1, "q", 576, 576, "1")]
    plan = topk(modules, [0.2, 0.8], setting(3.0, group_size=128))
    assert plan.weight_bits == 3.0
    # 576 inputs in groups of 128: 5 groups per row (the last has 64); 16-bit scale + 16-bit zero each.
    assert plan.storage_bits == pytest.approx(3.0 + 5 * 32 / 576)
    plan.save(tmp_path / "plan.json")
    again = Plan.load(tmp_path / "plan.json")
    assert again.to_dict() == plan.to_dict()
    assert again.embeddings.startswith("token embedding and output head")
    (tmp_path / "other.json").write_text('{"schema": "nsds.scores/1"}')
    with pytest.raises(NsdsError, match=r"cannot read plan file .*expected 'nsds\.plan/2'"):
        Plan.load(tmp_path / "other.json")


def brute_force(modules, scores, s: Setting):
    """Best assignment by enumeration (tiny instances only)."""
    groups = sorted({m.group for m in modules})
    best = None
    for choice in itertools.product(s.widths, repeat=len(groups)):
        width = dict(zip(groups, choice, strict=True))
        cost = sum(m.params * width[m.group] for m in modules)
        if cost > s.budget * sum(m.params for m in modules) + 1e-9:
            continue
        error = sum(scores[m.layer] * m.params * 4.0 ** -width[m.group] for m in modules)
        if best is None or error < best - 1e-12:
            best = error
    return best


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.sampled_from([16, 32, 48, 96]), min_size=2, max_size=5),
    scores=st.lists(st.floats(0.01, 0.99), min_size=5, max_size=5),
    budget=st.floats(2.0, 4.0),
    widths=st.sampled_from([(2, 4), (2, 3, 4), (2, 3, 4, 8)]),
)
def test_budget_allocator_is_optimal_and_never_over_budget(sizes, scores, budget, widths):
    budget = min(budget, max(widths))
    modules = [Module(f"m{i}", i, "r", out, 16, str(i)) for i, out in enumerate(sizes)]
    scores = scores[: len(sizes)]
    s = setting(budget, widths=widths)
    plan = budgeted(modules, scores, s)
    assert plan.weight_bits <= budget + 1e-9
    error = sum(scores[m.layer] * m.params * 4.0**-m.bits for m in plan.modules)
    assert error == pytest.approx(brute_force(modules, scores, s), rel=1e-9)


def llama_like(layers: int) -> list[Module]:
    """Llama-shaped layers: q/k/v fused into one group, o alone, gate/up fused, down alone."""
    shapes = {"q": (64, 64), "k": (16, 64), "v": (16, 64), "o": (64, 64), "gate": (96, 64), "up": (96, 64),
              "down": (64, 96)}  # fmt: skip
    groups = {"q": "qkv", "k": "qkv", "v": "qkv", "gate": "gate_up", "up": "gate_up"}
    return [
        Module(f"l{i}.{role}", i, role, out, inp, f"{i}.{groups.get(role, role)}")
        for i in range(layers)
        for role, (out, inp) in shapes.items()
    ]


def test_use_more_bits_is_llama_cpps_rule():
    # llama-quant.cpp: i < n/8 || i >= 7n/8 || (i - n/8) % 3 == 2, integer division; for n = 30: 3 and 26
    chosen = [i for i in range(30) if use_more_bits(i, 30)]
    assert chosen == [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]


def test_llama_cpp_mixture_favours_v_and_down_on_chosen_layers_within_budget():
    modules = llama_like(16)
    params = sum(m.params for m in modules)
    down_and_qkv = sum(m.params for m in modules if m.role in ("q", "k", "v", "down") and use_more_bits(m.layer, 16))
    budget = 2 + 2 * down_and_qkv / params  # exactly the first tier at 4 bits
    plan = llama_cpp(modules, setting(budget))
    high = {m.name for m in plan.modules if m.bits == 4}
    assert high == {m.name for m in modules if m.role in ("q", "k", "v", "down") and use_more_bits(m.layer, 16)}
    assert plan.weight_bits == pytest.approx(budget)
    for b in (2.3, 3.0, 3.7):
        plan = allocate("llama.cpp", modules, Evidence(), setting(b))
        assert plan.weight_bits <= b + 1e-9 and plan.allocator == "llama.cpp"
        bits = {m.name: m.bits for m in plan.modules}
        for m in modules:  # modules of one group share a width
            assert bits[m.name] == bits[next(n.name for n in modules if n.group == m.group)]
    # with widths 2,3,4 at 3.5 the mixture runs between 3 and 4 bits
    plan = llama_cpp(modules, setting(3.5, widths=(2, 3, 4)))
    assert {m.bits for m in plan.modules} == {3, 4} and plan.weight_bits <= 3.5


def test_random_scores_are_seeded():
    assert random_scores(10, 0) == random_scores(10, 0)
    assert random_scores(10, 0) != random_scores(10, 1)
    assert random_scores(10, 3) == list(np.random.default_rng(3).random(10))  # numpy's seeded generator


def table(modules: list[Module], widths: tuple[int, ...], relative, gained=None, fisher=None) -> ErrorTable:
    """An error table with errors given per module as a function of (module, width). The Fisher-weighted error
    defaults to 1 everywhere: a predicted cost far above FISHER_REGIME, so least_error uses its energy model."""
    gained = gained or relative
    fisher = fisher or (lambda m, w: 1.0)
    return ErrorTable("rtn", widths, {
        m.name: ModuleError(*(tuple(f(m, w) for w in widths) for f in (relative, gained, fisher)))
        for m in modules
    })  # fmt: skip


def modules_and_errors(seed: int) -> tuple[list[Module], ErrorTable]:
    """Six modules of different sizes over three layers, errors falling ~4x per bit with seeded scales."""
    roles = ["q", "k", "v", "o", "down", "up"]
    modules = [Module(f"m{i}", i // 2, role, 64 * (1 + i % 3), 64, f"{i}") for i, role in enumerate(roles)]
    rng = np.random.default_rng(seed)
    scale = {m.name: rng.uniform(0.1, 10) for m in modules}

    def error(m: Module, w: int) -> float:
        return scale[m.name] * 4.0**-w * (1 + 0.1 * w)

    return modules, table(modules, (2, 3, 4), error, lambda m, w: 2 * error(m, w))


def best_widths(modules: list[Module], budget: float, loss) -> tuple[int, ...]:
    """The width assignment with the lowest loss(bits) within the budget, over every assignment."""
    params = sum(m.params for m in modules)
    feasible = (ws for ws in itertools.product((2, 3, 4), repeat=len(modules))
                if sum(m.params * w for m, w in zip(modules, ws, strict=True)) <= budget * params)  # fmt: skip
    return min(feasible, key=lambda ws: loss({m.name: w for m, w in zip(modules, ws, strict=True)}))


@pytest.mark.parametrize(("measure", "edge"), [("relative", 3.0), ("gained", 1.0)])
def test_least_error_first_order_is_the_exact_optimum(measure, edge):
    """Without the energy term the knapsack minimises sum_m p_m r_m exactly (layers 0 and 2 are the edges; the
    down module of layer 2 also carries the default prior weight)."""
    modules, errors = modules_and_errors(0)
    weight = {m.name: (edge if m.layer in (0, 2) else 1.0) * (PRIOR_WEIGHT if m.name == "m4" else 1.0)
              for m in modules}  # fmt: skip

    def loss(bits):
        return sum(weight[m.name] * errors.of(m.name, bits[m.name], measure) for m in modules)

    for budget in (2.4, 3.0, 3.6):
        s = setting(budget, widths=(2, 3, 4))
        plan = least_error(modules, errors, s, measure=measure, edge_weight=edge, energy_weight=0, min_gain=0)
        assert tuple(m.bits for m in plan.modules) == best_widths(modules, budget, loss)
        assert plan.weight_bits <= budget and plan.allocator == "error"


def test_prior_weight_scales_the_modules_llama_cpp_favours():
    """prior_weight multiplies p_m of attn_v/qkv and ffn_down on use_more_bits layers, on top of the edge weight;
    the first-order knapsack is then the exact optimum of that weighted sum."""
    modules, errors = modules_and_errors(1)
    favoured = {m.name for m in modules if llama_cpp_favours(m, 3)}
    assert favoured == {"m4"}  # of three layers, use_more_bits picks only the last; there, only down is favoured
    assert llama_cpp_favours(Module("x", 2, "qkv", 8, 8, "x"), 3) and not llama_cpp_favours(modules[2], 3)
    loss_of = PredictedLoss(modules, errors, edge_weight=2.0, energy_weight=0, prior_weight=5.0)
    assert loss_of.edge == {"m0": 2.0, "m1": 2.0, "m2": 1.0, "m3": 1.0, "m4": 10.0, "m5": 2.0}

    def loss(bits):
        return sum((5.0 if m.name in favoured else 1.0) * errors.of(m.name, bits[m.name], "relative") for m in modules)

    for budget in (2.4, 3.0, 3.6):
        s = setting(budget, widths=(2, 3, 4))
        plan = least_error(modules, errors, s, edge_weight=1.0, energy_weight=0, min_gain=0, prior_weight=5.0)
        assert tuple(m.bits for m in plan.modules) == best_widths(modules, budget, loss)


@pytest.mark.parametrize("seed", range(4))
def test_least_error_finds_the_optimum_of_the_higher_order_loss(seed):
    """With the energy term (squared or cubed) the refitted knapsack reaches the brute-force optimum of
    PredictedLoss, written out here independently of the class."""
    modules, errors = modules_and_errors(seed)
    params = sum(m.params for m in modules)
    for exponent, weight in ((2.0, 30.0), (2.0, 300.0), (3.0, 100.0), (3.0, 1000.0)):

        def loss(bits, exponent=exponent, weight=weight):
            edge = {m.name: (2.0 if m.layer in (0, 2) else 1.0) * (PRIOR_WEIGHT if m.name == "m4" else 1.0)
                    for m in modules}  # fmt: skip
            r = {m.name: errors.of(m.name, bits[m.name], "relative") for m in modules}
            energy = sum(edge[m.name] * m.params * r[m.name] for m in modules) / params
            return sum(edge[m.name] * r[m.name] for m in modules) + weight / exponent * len(modules) * energy**exponent

        for budget in (2.5, 3.0, 3.5):
            plan = least_error(modules, errors, setting(budget, widths=(2, 3, 4)), energy_weight=weight,
                               energy_exponent=exponent, min_gain=0)  # fmt: skip
            bits = {m.name: m.bits for m in plan.modules}
            predicted = PredictedLoss(modules, errors, energy_weight=weight, energy_exponent=exponent)(bits)
            assert loss(bits) == pytest.approx(predicted)
            assert tuple(bits.values()) == best_widths(modules, budget, loss), (exponent, weight, budget)


def test_least_error_keeps_uniform_unless_predicted_clearly_better():
    # Four equal modules at 3 bits (error 1 each, 4 in all). Raising one to 4 bits saves 0.75; it is paid for
    # by lowering m2 to 2 bits, which costs m2 `loss`: the optimum is predicted (0.75 - loss) / 4 better than
    # uniform, and only a gain of MIN_PREDICTED_GAIN or more leaves the uniform plan. (No prior weight: m2 and
    # m3 are down modules on layers llama.cpp favours.)
    modules = [Module(f"m{i}", i, "down", 64, 64, f"{i}") for i in range(4)]
    s = setting(3.0, widths=(2, 3, 4))
    for loss, leaves in ((0.0, True), (0.7, False)):
        low = {m.name: 1 + loss if m.name == "m2" else 4.0 for m in modules}  # error at 2 bits
        errors = table(modules, (2, 3, 4), lambda m, w, low=low: {2: low[m.name], 3: 1.0, 4: 0.25}[w])
        gain = (0.75 - loss) / 4
        assert (gain >= MIN_PREDICTED_GAIN) == leaves
        optimum = least_error(modules, errors, s, edge_weight=1.0, energy_weight=0, min_gain=0, prior_weight=1.0)
        assert sorted(m.bits for m in optimum.modules) == [2, 3, 3, 4]
        plan = least_error(modules, errors, s, edge_weight=1.0, energy_weight=0, prior_weight=1.0)
        assert plan.allocator == "error" and plan.weight_bits <= 3.0
        if leaves:
            assert plan.modules == optimum.modules
        else:
            assert [m.bits for m in plan.modules] == [3, 3, 3, 3]
            assert plan.modules[0].reason == {"allocator": "error", "model": "energy", "fallback": "uniform",
                                              "predicted_gain": pytest.approx(gain)}  # fmt: skip


@pytest.mark.parametrize("seed", range(3))
def test_least_error_minimises_the_fisher_cost_where_the_noise_is_small(seed):
    """Where the uniform plan's Fisher-predicted cost (half the sum of F-weighted errors) is below
    FISHER_REGIME, `error`'s plan is the brute-force optimum of the sum of F-weighted errors (as is the `fisher`
    allocator's); above it, the energy model's plan, whatever the Fisher column says."""
    modules, energy_errors = modules_and_errors(seed)
    rng = np.random.default_rng(100 + seed)
    sensitivity = {m.name: rng.uniform(0.01, 1) for m in modules}
    for scale, regime in ((1e-3, "fisher"), (1e3, "energy")):

        def fisher_error(m, w, scale=scale):
            return scale * sensitivity[m.name] * 4.0**-w

        errors = table(modules, (2, 3, 4), lambda m, w: energy_errors.of(m.name, w, "relative"),
                       lambda m, w: energy_errors.of(m.name, w, "gained"), fisher_error)  # fmt: skip
        for budget in (2.5, 3.0, 3.5):
            s = setting(budget, widths=(2, 3, 4))
            uniform_cost = fisher_cost(errors, {p.name: p.bits for p in uniform(modules, s).modules})
            assert (uniform_cost < FISHER_REGIME) == (regime == "fisher")
            plan = least_error(modules, errors, s, min_gain=0)
            assert plan.allocator == "error" and {p.reason["model"] for p in plan.modules} == {regime}
            if regime == "fisher":
                optimum = best_widths(modules, budget, lambda bits, errors=errors: sum(
                    errors.of(n, b, "fisher") for n, b in bits.items()))  # fmt: skip
                assert tuple(p.bits for p in plan.modules) == optimum
                assert [p.bits for p in allocate("fisher", modules, Evidence(errors=errors), s).modules] == [
                    p.bits for p in plan.modules]  # fmt: skip
            else:
                energy = least_error(modules, energy_errors, s, min_gain=0)
                assert [p.bits for p in plan.modules] == [p.bits for p in energy.modules]


def test_higgs_weighs_every_module_by_one_on_relative_error():
    # Two modules of equal size: HIGGS gives the bits to the one whose relative error falls most, whatever
    # the role weights and the gained errors say.
    modules = [Module("a", 0, "down", 64, 64, "0"), Module("b", 1, "q", 64, 64, "1"), Module("c", 2, "o", 64, 64, "2")]
    errors = table(modules, (2, 4), lambda m, w: {"a": 2.0, "b": 1.0, "c": 0.0}[m.name] * 4.0**-w,
                   lambda m, w: {"a": 1.0, "b": 5.0, "c": 0.0}[m.name] * 4.0**-w)  # fmt: skip
    s = setting(2 + 2 / 3)  # one of the three at 4 bits
    assert {m.name: m.bits for m in higgs(modules, errors, s).modules} == {"a": 4, "b": 2, "c": 2}
    plan = least_error(modules, errors, s, measure="gained", edge_weight=1.0, energy_weight=0)
    assert {m.name: m.bits for m in plan.modules} == {"a": 2, "b": 4, "c": 2}
    plan = allocate("higgs", modules, Evidence(errors=errors), s)
    assert plan.allocator == "higgs" and plan.modules[0].reason["predicted_error"] == pytest.approx(2.0 / 256)


def test_error_table_must_match_the_setting():
    modules = [Module(f"l{i}", i, "down", 64, 64, f"{i}") for i in range(2)]
    errors = table(modules, (2, 3), lambda m, w: 1.0)
    with pytest.raises(NsdsError, match="measured for rtn at widths \\[2, 3\\], not rtn at \\[2, 4\\]"):
        least_error(modules, errors, setting(3))
    with pytest.raises(NsdsError, match="no module 'l0'"):
        least_error(modules, table([], (2, 4), lambda m, w: 1.0), setting(3))


def test_knapsack_keeps_groups_together_and_never_exceeds_the_budget():
    units = [[Module("a", 0, "q", 64, 64, "0.qkv"), Module("b", 0, "k", 64, 64, "0.qkv")],
             [Module("c", 1, "down", 128, 64, "1.down")]]  # fmt: skip
    error = [[4.0, 1.0], [2.0, 0.0]]
    assert knapsack(units, error, (2, 4), setting(3)) == [4, 2]  # 2x64x64 at 4 bits fits, 128x64 does not as well
    assert knapsack(units, error, (2, 4), setting(2.01)) == [2, 2]
