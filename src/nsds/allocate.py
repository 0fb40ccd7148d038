"""Bit allocation under an average-bit budget (docs/METHOD.md §5): sensitive layers get more bits.

Allocators that turn per-layer scores into a Plan:
- `topk`: the paper's rule, two widths, layers ranked by score;
- `budget`: any candidate widths, parameter-weighted, storage-aware, honouring groups that must share a
  width, solved exactly as a multiple-choice knapsack;
- `uniform`: the score-free baseline at the same budget;
- `llama.cpp`: llama.cpp's hand-written mixture rule (attn_v and ffn_down first), filled to the budget;
- `random_scores`: seeded random layer scores, the floor any scorer must beat;
- `error` (the default), `fisher`, `higgs`: measured module errors (nsds.distortion), knapsack over width
  groups (docs/METHOD.md §9).
"""

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np

from nsds.distortion import ErrorTable
from nsds.errors import NsdsError
from nsds.plan import Module, ModulePlan, Plan
from nsds.progress import note
from nsds.quantize.base import Quantizer, Storage
from nsds.scores import ranking

_MAX_CELLS = 200_000  # budget resolution of the knapsack table; coarser costs are rounded up (never over budget)
BUDGET_MEASURES = ("weights", "storage")


@dataclass(frozen=True)
class Setting:
    """What every allocator needs besides the modules and scores."""

    budget: float
    widths: tuple[float, ...]
    quantizer: Quantizer  # configured: its storage() prices every module at every width
    model: str
    budget_counts: str = "weights"  # "weights": the paper's bits per weight; "storage": with every scale/zero


def allocation_setting(
    quantizer: Quantizer, model_id: str, budget: float, widths: Sequence[float], budget_counts: str | None = None
) -> Setting:
    """The allocation setting of a configured quantizer, checked (see check_setting); budget_counts None
    is the quantizer's default (weights for RTN/HQQ as in the paper, storage for GGUF types)."""
    quantizer.check_widths(widths)
    counts = quantizer.budget_counts[0] if budget_counts is None else budget_counts
    if counts in BUDGET_MEASURES and counts not in quantizer.budget_counts:
        raise NsdsError(f"quantizer '{quantizer.name}' budgets count {' or '.join(quantizer.budget_counts)} only, "
                        f"not '{counts}'")  # fmt: skip
    setting = Setting(budget=budget, widths=tuple(widths), quantizer=quantizer, model=model_id, budget_counts=counts)
    check_setting(setting)
    return setting


def uniform_setting(setting: Setting) -> Setting:
    """The uniform baseline's widths: the budget itself when it is a width the quantizer has (3.0 -> 3-bit
    everywhere, even with candidates 2/4: what a user would otherwise run), else the candidate widths, mixed
    evenly over depth."""
    budget = setting.budget
    if setting.budget_counts == "weights" and budget == int(budget) and int(budget) in setting.quantizer.widths:
        return replace(setting, widths=(int(budget),))
    return setting


def check_setting(setting: Setting, modules: Sequence[Module] | None = None) -> tuple[float, ...]:
    """Sorted candidate widths, after checking the budget lies within what they reach (never silently clamped).

    Counting storage, the reach depends on the modules' shapes (scales per group or block, a row's short last
    group, a GGUF type's fallback): without modules only the weights' lower bound is checked; with them the
    check is exact.
    """
    widths = tuple(sorted(set(setting.widths)))
    if not widths or any(isinstance(w, bool) or not isinstance(w, int | float) or w <= 0 for w in widths):
        raise NsdsError(f"widths must be positive numbers of bits, got {list(setting.widths)}")
    if setting.budget_counts not in BUDGET_MEASURES:
        raise NsdsError(f"budget counts 'weights' or 'storage', not '{setting.budget_counts}'")
    if not math.isfinite(setting.budget):
        raise NsdsError(f"budget must be a finite number of bits, got {setting.budget}")
    low, high = widths[0], widths[-1]
    if modules:
        params = sum(m.params for m in modules)
        floor, ceiling = (sum(_cost(m, w, setting) for m in modules) / params for w in (low, high))
    else:
        floor, ceiling = low, high if setting.budget_counts == "weights" else math.inf
    if not floor - 1e-9 <= setting.budget <= ceiling + 1e-9:
        # shown inside the true range (the floor rounded up, the ceiling down): any budget shown in it is taken
        lowest = math.ceil(floor * 1e4) / 1e4
        if math.isinf(ceiling):
            reach = f"at least {lowest:g} bits; the exact range depends on the model's shapes"
        else:
            storage = " with group overhead" if setting.budget_counts == "storage" else ""
            reach = f"[{lowest:g}, {math.floor(ceiling * 1e4) / 1e4:g}] bits{storage}"
        raise NsdsError(f"budget {setting.budget} bits is outside what widths {list(widths)} can reach ({reach})")
    return widths


def check_fits(modules: Sequence[Module], quantizer: Quantizer, settings: Sequence[Setting]) -> None:
    """Against the model's real shapes: every module fits the quantizer's layout and every budget lies within
    what the widths reach (exactly, group overhead included)."""
    for m in modules:
        quantizer.check_shape(m.out_features, m.in_features)
    for setting in settings:
        check_setting(setting, modules)


def _plan(
    modules: Sequence[Module],
    bits: dict[str, float],
    reasons: dict[str, dict],
    setting: Setting,
    allocator: str,
    widths: tuple[float, ...],
) -> Plan:
    return plan_of(modules, bits, reasons, setting.quantizer, setting.model, allocator, setting.budget, widths)


def plan_of(
    modules: Sequence[Module],
    bits: dict[str, float],
    reasons: dict[str, dict],
    quantizer: Quantizer,
    model: str,
    allocator: str,
    budget: float | None,
    widths: Sequence[float],
    storage: Mapping[str, Storage] | None = None,
) -> Plan:
    """A Plan for these widths, each module's storage priced by the quantizer (or given: a preset's types,
    read from its file)."""
    planned = []
    for m in modules:
        stored = storage[m.name] if storage else quantizer.storage(m.out_features, m.in_features, bits[m.name])
        planned.append(ModulePlan(m.name, m.layer, m.role, m.out_features, m.in_features, bits[m.name],
                                  stored.group_size, stored.format, stored.bits, reasons[m.name]))  # fmt: skip
    return Plan(model=model, quantizer=quantizer.name, allocator=allocator, budget=budget, widths=list(widths),
                modules=planned, symmetric=quantizer.symmetric)  # fmt: skip


def _cost(module: Module, width: float, setting: Setting) -> float:
    """Bits a module costs at `width` under the setting's budget measure."""
    if setting.budget_counts == "storage":
        return setting.quantizer.storage(module.out_features, module.in_features, width).bits
    return module.params * width


def _by_layer(modules: Sequence[Module]) -> dict[int, list[Module]]:
    layers: dict[int, list[Module]] = {}
    for m in modules:
        layers.setdefault(m.layer, []).append(m)
    return layers


def _by_group(modules: Sequence[Module]) -> list[list[Module]]:
    """The allocation units: modules that must share a width (Module.group), in first-seen order."""
    groups: dict[str, list[Module]] = {}
    for m in modules:
        groups.setdefault(m.group, []).append(m)
    return list(groups.values())


def topk(modules: Sequence[Module], scores: Sequence[float], setting: Setting) -> Plan:
    """The paper's rule: rank layers by score (descending, ties by layer index); the top layers get the
    high width, the rest the low width, cut where the parameter-weighted average would exceed the budget.

    With equal-size layers this keeps floor(L (B - b_lo) / (b_hi - b_lo)) layers high; the paper's
    round() can overshoot the budget by half a layer, this never does.
    """
    widths = check_setting(setting, modules)
    if len(widths) != 2:
        raise NsdsError(f"topk takes exactly two widths (low, high), got {list(widths)}; use --allocator budget")
    low, high = widths
    layers = _by_layer(modules)
    if len(scores) != len(layers):
        raise NsdsError(f"{len(scores)} layer scores for a model with {len(layers)} layers")
    limit = setting.budget * sum(m.params for m in modules)
    spent = sum(_cost(m, low, setting) for m in modules)
    bits, reasons = {}, {}
    cut = False
    for rank, layer in enumerate(ranking(list(scores)), start=1):
        extra = sum(_cost(m, high, setting) - _cost(m, low, setting) for m in layers[layer])
        cut = cut or spent + extra > limit + 1e-6
        if not cut:
            spent += extra
        for m in layers[layer]:
            bits[m.name] = low if cut else high
            reasons[m.name] = {"allocator": "topk", "layer_score": scores[layer], "rank": rank}
    plan = _plan(modules, bits, reasons, setting, "topk", widths)
    reached = spent / sum(m.params for m in modules)
    if setting.budget - reached > 0.1 * (high - low):
        note(
            f"warning: the top-k rule moves whole layers and reached only {reached:.3f} of {setting.budget} bits "
            "on this model; --allocator budget fills the budget more closely"
        )
    return plan


def budgeted(modules: Sequence[Module], scores: Sequence[float], setting: Setting) -> Plan:
    """Any candidate widths, meeting the budget exactly or as close as possible from below.

    Modules of one group (Module.group: q/k/v or gate/up fused by a runtime, the experts of one MoE
    layer) share a width. The allocator minimises the expected sensitivity-weighted quantization error
        sum_g  S_g * n_g * 4^(-b_g)
    (S_g the layer's score, n_g the group's weights; a b-bit uniform quantizer's error power scales as
    4^-b) subject to the budget (see `knapsack`). Sensitive, and cheap, groups get bits first.
    """
    widths = check_setting(setting, modules)
    units = _by_group(modules)
    layers = len({m.layer for m in modules})
    if len(scores) != layers:
        raise NsdsError(f"{len(scores)} layer scores for a model with {layers} layers")
    error = [[scores[unit[0].layer] * sum(m.params for m in unit) * 4.0 ** (-w) for w in widths] for unit in units]
    chosen = knapsack(units, error, widths, setting)
    bits, reasons = {}, {}
    for unit, width in zip(units, chosen, strict=True):
        for m in unit:
            bits[m.name] = width
            reasons[m.name] = {"allocator": "budget", "layer_score": scores[m.layer], "group": m.group}
    return _plan(modules, bits, reasons, setting, "budget", widths)


def knapsack(
    units: Sequence[Sequence[Module]], error: Sequence[Sequence[float]], widths: tuple[float, ...], setting: Setting
) -> list[float]:
    """The width of each unit (modules sharing one) minimising sum_u error[u][j_u] subject to
    sum_u cost_u(b_u) <= B * N, where cost counts weight bits or, with budget_counts="storage", also each
    quantization group's scale and zero point (a GGUF type's blocks, after its fallbacks).

    A multiple-choice knapsack, solved exactly by dynamic programming over the budget (costs are counted
    in units of their greatest common divisor, or rounded up to 1/200000 of the budget for odd shapes, so
    the plan never exceeds it).
    """
    costs = [[sum(_cost(m, w, setting) for m in unit) for w in widths] for unit in units]
    limit = setting.budget * sum(m.params for unit in units for m in unit)
    step = math.gcd(*(int(c) for row in costs for c in row))
    if limit / step > _MAX_CELLS:
        step = math.ceil(limit / _MAX_CELLS)
    cells = np.array([[-(-int(c) // step) for c in row] for row in costs], dtype=np.int64)  # rounded up
    capacity = math.floor(limit / step + 1e-9)
    error = np.asarray(error, dtype=np.float64)
    best = np.full(capacity + 1, np.inf)
    best[0] = 0.0
    choice = np.zeros((len(units), capacity + 1), dtype=np.int8)
    for u in range(len(units)):
        new = np.full(capacity + 1, np.inf)
        for j, cost in enumerate(cells[u]):
            if cost > capacity:
                continue
            candidate = np.full(capacity + 1, np.inf)
            candidate[cost:] = best[: capacity + 1 - cost] + error[u, j]
            better = candidate < new
            new[better] = candidate[better]
            choice[u, better] = j
        best = new
    if not np.isfinite(best).any():
        raise NsdsError(f"no assignment of widths {list(widths)} fits a budget of {setting.budget} bits")
    cell = int(np.nanargmin(best))
    chosen: list[float] = [0.0] * len(units)
    for u in range(len(units) - 1, -1, -1):
        j = int(choice[u, cell])
        cell -= int(cells[u, j])
        chosen[u] = widths[j]
    return chosen


def uniform(modules: Sequence[Module], setting: Setting) -> Plan:
    """The score-free baseline at the same budget: one width everywhere when the budget is a candidate
    width; otherwise the two widths around it, the higher one on layers spread evenly over depth, as
    many as fit the budget (the nearest feasible uniform mix)."""
    widths = check_setting(setting, modules)
    layers = _by_layer(modules)
    low, high = _bracket(modules, setting, widths)
    limit = setting.budget * sum(m.params for m in modules)

    def spend(high_layers: set[int]) -> float:
        return sum(_cost(m, high if m.layer in high_layers else low, setting) for m in modules)

    order = sorted(layers)
    chosen: set[int] = set()
    for count in range(len(order), 0, -1):
        spread = {order[int((j + 0.5) * len(order) / count)] for j in range(count)}
        if high != low and spend(spread) <= limit + 1e-6:
            chosen = spread
            break
    if spend(chosen) > limit + 1e-6:
        raise NsdsError(f"even width {low} everywhere exceeds the budget of {setting.budget} bits")
    bits = {m.name: high if m.layer in chosen else low for m in modules}
    reasons = {m.name: {"allocator": "uniform", "spread": len(chosen)} for m in modules}
    return _plan(modules, bits, reasons, setting, "uniform", widths)


def _bracket(modules: Sequence[Module], setting: Setting, widths: tuple[float, ...]) -> tuple[float, float]:
    """The candidate widths whose uniform cost lies just below (or at) and just above the budget (by cost: a
    GGUF i-quant's width does not order its size among the k-quants')."""
    params = sum(m.params for m in modules)

    def average(width: float) -> float:
        return sum(_cost(m, width, setting) for m in modules) / params

    low = max((w for w in widths if average(w) <= setting.budget + 1e-9), key=average)
    return low, min((w for w in widths if average(w) > setting.budget + 1e-9), key=average, default=low)


def use_more_bits(layer: int, layers: int) -> bool:
    """llama.cpp's `use_more_bits` (src/llama-quant.cpp): the first and last eighth of the layers, and
    every third layer in between."""
    return layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2


def llama_cpp_favours(module: Module, layers: int) -> bool:
    """Whether llama.cpp's k-quant mixes favour this module: attn_v (or a fused qkv) and ffn_down on the
    layers `use_more_bits` picks."""
    return module.role in ("v", "qkv", "down") and use_more_bits(module.layer, layers)


def llama_cpp(modules: Sequence[Module], setting: Setting) -> Plan:
    """llama.cpp's mixture heuristic at an exact average-bit budget.

    llama.cpp's k-quant mixes (Q4_K_M, Q3_K_M...) give attn_v and ffn_down more bits on the layers
    `use_more_bits` picks. Its mixes have fixed sizes; to compare at equal bits, every unit (module, or
    group of modules sharing a width) starts at the width below the budget and is raised to the width
    above in llama.cpp's order of priority while the budget allows: units holding attn_v or ffn_down on
    the chosen layers, then on the other layers, then the rest on the chosen layers, then everything
    else, by layer within a tier.
    """
    widths = check_setting(setting, modules)
    low, high = _bracket(modules, setting, widths)
    layers = len(_by_layer(modules))

    def tier(unit: list[Module]) -> tuple[int, int]:
        favoured = any(m.role in ("v", "qkv", "down") for m in unit)
        chosen = use_more_bits(unit[0].layer, layers)
        return (0 if chosen else 1) if favoured else (2 if chosen else 3), unit[0].layer

    limit = setting.budget * sum(m.params for m in modules)
    spent = sum(_cost(m, low, setting) for m in modules)
    if spent > limit + 1e-6:
        raise NsdsError(f"even width {low} everywhere exceeds the budget of {setting.budget} bits")
    bits, reasons = {}, {}
    for unit in sorted(_by_group(modules), key=tier):
        extra = sum(_cost(m, high, setting) - _cost(m, low, setting) for m in unit)
        raise_it = spent + extra <= limit + 1e-6
        spent += extra if raise_it else 0
        for m in unit:
            bits[m.name] = high if raise_it else low
            reasons[m.name] = {"allocator": "llama.cpp", "tier": tier(unit)[0]}
    return _plan(modules, bits, reasons, setting, "llama.cpp", widths)


# The `error` allocator's two models of what quantization costs (docs/METHOD.md §9), their constants chosen on
# brown-tune. Where the uniform plan's predicted cost is below FISHER_REGIME nats per token (by the Fisher
# information of text the model wrote itself; 0.5 beat 0.25, 0 and infinity) the second-order Taylor model holds:
# minimise the sum of F-weighted errors, no constants. Where the noise is large it does not (its plans starved the
# large MLP matrices at 3.5 bits), and `error` minimises a measured-error model instead: HIGGS's first-order sum
# of relative weight errors plus a second-order term in the output noise energy (the size-weighted mean relative
# error), the first and last decoder layers counted twice (nothing downstream corrects them), and attn_v/ffn_down
# on the layers llama.cpp's mixes favour counted 1.25 times (its structural prior as a feature, not a rule: 1.25
# beat 1, 1.5 and 2). The uniform plan is kept unless the optimum is predicted clearly better (a model's 0.6 % was
# worse on brown-tune).
FISHER_REGIME = 0.5
EDGE_WEIGHT = 2.0
ENERGY_WEIGHT = 100.0
ENERGY_EXPONENT = 2.0
PRIOR_WEIGHT = 1.25
MIN_PREDICTED_GAIN = 0.03
_REFITS = 10  # linearisations tried, from the uniform plan; each is a fixed point or better than the last


class PredictedLoss:
    """`error`'s model of the loss of a plan (bits per module name; a module not in it is unquantized):

        L = sum_m p_m r_m(b_m) + (energy_weight / k) * M * R^k,    R = sum_m p_m n_m r_m(b_m) / N,

    with r_m(b) module m's measured error (`measure`), n_m its weights, N their sum over the M modules,
    p_m = edge_weight on the first and last decoder layers, 1 elsewhere, times prior_weight on the modules
    llama.cpp's mixes favour (`llama_cpp_favours`), and k = energy_exponent (2: the default; 3 was tried on
    brown-tune and did no better, docs/METHOD.md §9)."""

    def __init__(self, modules: Sequence[Module], errors: ErrorTable, measure: str = "relative",
                 edge_weight: float = EDGE_WEIGHT, energy_weight: float = ENERGY_WEIGHT,
                 energy_exponent: float = ENERGY_EXPONENT, prior_weight: float = PRIOR_WEIGHT) -> None:  # fmt: skip
        layers = max(m.layer for m in modules) + 1
        self.modules, self.errors, self.measure, self.energy_weight = modules, errors, measure, energy_weight
        self.exponent = energy_exponent
        self.edge = {m.name: (edge_weight if m.layer in (0, layers - 1) else 1.0)
                     * (prior_weight if llama_cpp_favours(m, layers) else 1.0) for m in modules}  # fmt: skip
        self.params = sum(m.params for m in modules)

    def _error(self, m: Module, bits: Mapping[str, float]) -> float:
        return self.errors.of(m.name, bits[m.name], self.measure) if m.name in bits else 0.0

    def energy(self, bits: Mapping[str, float]) -> float:
        """R: the edge- and size-weighted mean error, a data-free proxy of the output noise energy."""
        return sum(self.edge[m.name] * m.params * self._error(m, bits) for m in self.modules) / self.params

    def __call__(self, bits: Mapping[str, float]) -> float:
        first = sum(self.edge[m.name] * self._error(m, bits) for m in self.modules)
        return first + self.energy_weight / self.exponent * len(self.modules) * self.energy(bits) ** self.exponent

    def linearised(self, energy: float) -> Callable[[Module], float]:
        """dL/dr_m at energy R: p_m (1 + energy_weight * R^(k-1) * n_m / (N / M)), each module's knapsack weight."""
        mean = self.params / len(self.modules)
        slope = self.energy_weight * energy ** (self.exponent - 1)
        return lambda m: self.edge[m.name] * (1 + slope * m.params / mean)


def least_error(
    modules: Sequence[Module],
    errors: ErrorTable,
    setting: Setting,
    measure: str = "relative",
    edge_weight: float = EDGE_WEIGHT,
    energy_weight: float = ENERGY_WEIGHT,
    min_gain: float = MIN_PREDICTED_GAIN,
    energy_exponent: float = ENERGY_EXPONENT,
    prior_weight: float = PRIOR_WEIGHT,
    fisher_regime: float = FISHER_REGIME,
) -> Plan:
    """nsds's default. When the uniform plan's predicted cost, 1/2 sum_m F-weighted error (nats per token), is
    below `fisher_regime`: the widths minimising the F-weighted error (`fisher`). Otherwise the widths
    minimising PredictedLoss: the knapsack minimises the loss linearised at the current plan's energy exactly;
    starting from the uniform plan, it is solved again at each new plan's energy until a plan repeats (at most
    _REFITS times), and the plan with the lowest predicted loss is kept (with energy_weight 0 that is the exact
    optimum of sum_m p_m r_m). When the chosen model predicts the plan less than `min_gain` better than the
    uniform plan, the uniform plan is returned (each module's reason says "fallback"). Every module's error is
    its own, measured with the plans' own quantizer."""
    widths = _check_table(errors, setting, modules)
    baseline = uniform(modules, setting)  # among the candidates: a budget that is one gives it everywhere
    uniform_bits = _bits(baseline)
    drift = fisher_cost(errors, uniform_bits)
    if drift < fisher_regime:
        model, best = "fisher", fisher(modules, errors, setting, "error")
        best_loss, predicted = fisher_cost(errors, _bits(best)), drift
    else:
        model, loss = "energy", PredictedLoss(modules, errors, measure, edge_weight, energy_weight,
                                              energy_exponent, prior_weight)  # fmt: skip
        best, best_loss = _least_predicted_loss(modules, errors, setting, measure, loss, baseline)
        predicted = loss(uniform_bits)
    gain = 1 - best_loss / predicted if predicted > 0 else 0.0
    if best is not baseline and gain >= min_gain:
        why = {"model": model, "predicted_gain": gain}
        return replace(best, modules=[replace(p, reason=p.reason | why) for p in best.modules])
    reasons = {p.name: {"allocator": "error", "model": model, "fallback": "uniform", "predicted_gain": gain}
               for p in baseline.modules}  # fmt: skip
    return _plan(modules, uniform_bits, reasons, setting, "error", widths)


def _least_predicted_loss(modules: Sequence[Module], errors: ErrorTable, setting: Setting, measure: str,
                          loss: PredictedLoss, baseline: Plan) -> tuple[Plan, float]:  # fmt: skip
    """The plan with the lowest `loss` among the uniform baseline and the knapsack's solutions linearised at
    each plan's energy in turn, and its loss."""
    current = _bits(baseline)
    best, best_loss = baseline, loss(current)
    for _ in range(_REFITS):
        fitted = _by_error(modules, errors, setting, measure, loss.linearised(loss.energy(current)), "error")
        fitted_bits = _bits(fitted)
        if loss(fitted_bits) < best_loss:
            best, best_loss = fitted, loss(fitted_bits)
        if fitted_bits == current:
            break
        current = fitted_bits
    return best, best_loss


def fisher_cost(errors: ErrorTable, bits: Mapping[str, float]) -> float:
    """The second-order estimate of what a plan costs the model's predictions: 1/2 sum_m F-weighted error of
    module m at its width, in nats per token (nsds.fisher)."""
    return sum(errors.of(name, width, "fisher") for name, width in bits.items()) / 2


def fisher(modules: Sequence[Module], errors: ErrorTable, setting: Setting, name: str = "fisher") -> Plan:
    """The widths minimising the Fisher-weighted error sum_m sum_i F_ii (W - Q_b(W))_i^2 under the budget:
    the second-order estimate of the cost to the model's predictions, measured on its own samples."""
    return _by_error(modules, errors, setting, "fisher", lambda m: 1.0, name)


def _bits(plan: Plan) -> dict[str, float]:
    return {p.name: p.bits for p in plan.modules}


def _check_table(errors: ErrorTable, setting: Setting, modules: Sequence[Module]) -> tuple[float, ...]:
    """The setting's widths, after checking the table was measured with its quantizer at those widths."""
    widths = check_setting(setting, modules)
    if sorted(set(widths) - set(errors.widths)) or errors.quantizer != setting.quantizer.name:
        raise NsdsError(f"the error table was measured for {errors.quantizer} at widths {list(errors.widths)}, "
                        f"not {setting.quantizer.name} at {list(widths)}")  # fmt: skip
    return widths


def _by_error(
    modules: Sequence[Module],
    errors: ErrorTable,
    setting: Setting,
    measure: str,
    weight: Callable[[Module], float],
    name: str,
) -> Plan:
    """The knapsack over width groups of sum_m weight(m) * e_m(b) by `measure` (relative, gained or fisher)."""
    widths = _check_table(errors, setting, modules)
    units = _by_group(modules)
    error = [[sum(errors.of(m.name, w, measure) * weight(m) for m in unit) for w in widths] for unit in units]
    chosen = knapsack(units, error, widths, setting)
    bits, reasons = {}, {}
    for unit, row, width in zip(units, error, chosen, strict=True):
        for m in unit:
            bits[m.name] = width
            reasons[m.name] = {"allocator": name, "group": m.group, "predicted_error": row[widths.index(width)]}
    return _plan(modules, bits, reasons, setting, name, widths)


def higgs(modules: Sequence[Module], errors: ErrorTable, setting: Setting, measure: str = "relative") -> Plan:
    """The HIGGS-style program without data (llm-compressor's dynamic bitwidths, arXiv:2411.17525): minimise
    the sum of the modules' relative weight errors (or another `measure`), every coefficient 1, under the
    budget."""
    return _by_error(modules, errors, setting, measure, lambda m: 1.0, "higgs")


def random_scores(layers: int, seed: int) -> list[float]:
    """Seeded random layer scores: fed to the same allocator as a real scorer, they give the random
    allocation at the same budget."""
    return [float(x) for x in np.random.default_rng(seed).random(layers)]


@dataclass(frozen=True)
class Evidence:
    """What allocators read besides the modules and the setting; each reads what its spec needs."""

    scores: Sequence[float] | None = None  # one per layer, higher: more bits (a scorer's)
    errors: ErrorTable | None = None  # every module's measured error at every candidate width


@dataclass(frozen=True)
class AllocatorSpec:
    allocate: Callable[[Sequence[Module], Evidence, Setting], Plan]
    needs: str | None  # the Evidence field it reads: "scores", "errors", or None
    about: str


# fmt: off
ALLOCATORS: dict[str, AllocatorSpec] = {
    "error": AllocatorSpec(lambda m, e, s: least_error(m, e.errors, s), "errors",
                           "measured per-module error at every width, first plus second order, knapsack (default)"),
    "topk": AllocatorSpec(lambda m, e, s: topk(m, e.scores, s), "scores", "the paper's rule: top layers high"),
    "budget": AllocatorSpec(lambda m, e, s: budgeted(m, e.scores, s), "scores",
                            "layer scores x 4^-b, knapsack over width groups"),
    "fisher": AllocatorSpec(lambda m, e, s: fisher(m, e.errors, s), "errors",
                            "Fisher-weighted error on the model's own samples, knapsack"),
    "higgs": AllocatorSpec(lambda m, e, s: higgs(m, e.errors, s), "errors",
                           "HIGGS-style: sum of relative weight errors, coefficients 1"),
    "uniform": AllocatorSpec(lambda m, e, s: uniform(m, s), None, "one width, or two mixed evenly over depth"),
    "llama.cpp": AllocatorSpec(lambda m, e, s: llama_cpp(m, s), None,
                               "llama.cpp's rule: attn_v and ffn_down first, filled to the budget"),
}
# fmt: on


def allocate(kind: str, modules: Sequence[Module], evidence: Evidence, setting: Setting) -> Plan:
    """Dispatch to an allocator by name, with the evidence it needs."""
    if kind not in ALLOCATORS:
        raise NsdsError(f"unknown allocator '{kind}'; choose from {', '.join(ALLOCATORS)}")
    spec = ALLOCATORS[kind]
    if spec.needs is not None and getattr(evidence, spec.needs) is None:
        raise NsdsError(f"allocator '{kind}' needs {'layer scores' if spec.needs == 'scores' else 'an error table'}")
    return spec.allocate(modules, evidence, setting)


DEFAULT_ALLOCATOR = "error"


def paper_allocator(widths: Sequence[float]) -> str:
    """The paper's allocation of layer scores: its top-k rule for two widths, the knapsack for more."""
    return "topk" if len(set(widths)) == 2 else "budget"


def plan_for(label: str, modules: Sequence[Module], evidence: Evidence, setting: Setting) -> Plan:
    """The plan an allocator makes at this setting, the way every command compares them: `uniform` at its own
    widths (the budget's width when it is a candidate), "paper" the NSDS paper's allocation of layer scores."""
    kind = _kind(label, setting.widths)
    return allocate(kind, modules, evidence, uniform_setting(setting) if label == "uniform" else setting)


def evidence_needed(label: str, widths: Sequence[float]) -> str | None:
    """The Evidence field plan_for(label, ...) reads: "scores", "errors" or None."""
    return ALLOCATORS[_kind(label, widths)].needs


def _kind(label: str, widths: Sequence[float]) -> str:
    return paper_allocator(widths) if label == "paper" else label
