"""The baseline layer scorers (ZD, EWQ, KurtBoost, MSE, LieQ) and NSDS's ablations against hand-computed values
and independent numpy recomputations on small hand-made tensors and a tiny Llama."""

import math

import numpy as np
import pytest
import torch
import transformers as tf

from nsds.errors import NsdsError
from nsds.quantize import make_quantizer
from nsds.quantize.rtn import rtn
from nsds.scorers import ablations, ewq, kurtboost, lieq, mse, zd
from nsds.scorers import nsds as nsds_scorer
from nsds.scorers.nsds import NsdsParams
from nsds.scorers.specs import get_scorers
from nsds.scorers.subject import MATRICES, Subject, layer_matrices
from nsds.weights import ModuleSource

from tiny_models import save_tiny_tokenizer, tiny_model

TEXT = "The quick brown fox jumps over the lazy dog. A lazy dog sleeps while the quick fox runs. " * 30
PROJECTIONS = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
               "up": "mlp.up_proj", "gate": "mlp.gate_proj", "down": "mlp.down_proj"}  # fmt: skip


def t64(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama", vocab_size=300)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("baselines-tokenizer")
    save_tiny_tokenizer(folder, TEXT)
    return tf.AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def subject(llama, tokenizer):
    return Subject(ModuleSource(llama), model=llama, tokenizer=tokenizer, quantizer=make_quantizer("rtn", 32))


def weights(model) -> list[dict[str, np.ndarray]]:
    """Each layer's seven linear weights read straight off the modules (nn.Linear layout), as float64 numpy."""
    return [
        {role: layer.get_submodule(rel).weight.detach().double().numpy() for role, rel in PROJECTIONS.items()}
        for layer in model.model.layers
    ]


def np_outlier_fraction(w: np.ndarray) -> float:
    w = w.ravel()
    return float(np.mean(np.abs(w - w.mean()) > w.std()))


def np_normalized_entropy(w: np.ndarray) -> float:
    w = w.ravel()
    p = np.exp(w - w.max())
    p /= p.sum()
    p = p[p > 0]
    return float(-(p * np.log(p)).sum() / math.log(w.size))


def np_kurtosis(w: np.ndarray) -> float:
    d = w.ravel() - w.mean()
    m2, m4 = np.mean(d**2), np.mean(d**4)
    return float(m4 / m2**2 - 3.0)


def np_boost(base: np.ndarray) -> np.ndarray:
    """KurtBoost's rule written out: double layers whose depth difference is a > 2 sigma outlier."""
    out = base.astype(np.float64).copy()
    if len(base) < 3:
        return out
    diff = [base[i] - base[i - 1] for i in range(1, len(base))]
    mean, std = np.mean(diff), np.std(diff)
    for i in range(1, len(base)):
        if std > 0 and abs(diff[i - 1] - mean) > 2 * std:
            out[i] = 2 * base[i] if base[i] > 0 else 0.0
    return out


def np_erank(y: np.ndarray) -> float:
    s = np.linalg.svd(y, compute_uv=False)
    if s.sum() == 0:
        return 0.0
    p = s[s > 0] / s.sum()
    return float(np.exp(-(p * np.log(p)).sum()))


def np_capacity(w: np.ndarray, energy: float = 0.99) -> tuple[float, int]:
    """SE with beta = 1 and the kept rank: the smallest k reaching `energy` of sum sigma^2, clipped to [2, n]."""
    s = np.linalg.svd(w, compute_uv=False)
    cumulative = np.cumsum(s**2)
    k = next(i + 1 for i in range(len(s)) if cumulative[i] >= energy * cumulative[-1])
    k = min(max(k, 2), len(s))
    kept = s[:k]
    p = kept / kept.sum()
    return float(kept.sum() / np.exp(-(p * np.log(p)).sum())), k


# --- layer_matrices and get_scorers ---


def test_layer_matrices_are_the_modules_weights(llama):
    layers = list(layer_matrices(ModuleSource(llama)))
    assert len(layers) == 4
    for got, expected in zip(layers, weights(llama), strict=True):
        assert tuple(got) == MATRICES
        for role in MATRICES:
            assert np.array_equal(got[role].double().numpy(), expected[role])


def names(specs) -> list[str]:
    return [spec.name for spec in specs]


def test_get_scorers_groups_and_unknown_name():
    baselines = ["zd", "mse", "ewq", "kurtboost", "lieq"]
    ablation_names = ["nsds-nv", "nsds-se", "nsds-mad1", "nsds-product", "nsds-collapsed"]
    assert names(get_scorers(["all"])) == ["nsds", *baselines, *ablation_names]
    assert names(get_scorers(["baselines"])) == baselines
    assert names(get_scorers(["ablations"])) == ablation_names
    assert names(get_scorers(["lieq", "baselines", "nsds"])) == ["lieq", "zd", "mse", "ewq", "kurtboost", "nsds"]
    assert get_scorers(["zd"])[0].load() is zd.score
    assert [s.name for s in get_scorers(["all"]) if s.quantizer_dependent] == ["mse"]
    assert [s.name for s in get_scorers(["all"]) if s.needs_model] == ["lieq"]
    with pytest.raises(NsdsError, match="unknown scorer 'bogus'") as caught:
        get_scorers(["zd", "bogus"])
    assert "\n" not in str(caught.value)
    with pytest.raises(NsdsError, match="at least one scorer"):
        get_scorers([])


# --- ZD ---


def test_outlier_fraction_by_hand():
    # 1..9: mean 5, population std sqrt(60/9) = 2.58; |w - 5| in {3, 4} exceeds it for 1, 2, 8, 9.
    w = torch.arange(1.0, 10.0).reshape(3, 3)
    assert zd.outlier_fraction(w) == pytest.approx(4 / 9, abs=1e-15)
    # One spike among seven zeros: only the spike lies beyond one std.
    spike = torch.zeros(2, 4)
    spike[1, 3] = 10.0
    assert zd.outlier_fraction(spike) == pytest.approx(1 / 8, abs=1e-15)
    # +-1: every |z| is exactly 1, and the rule is strict.
    assert zd.outlier_fraction(t64([[-1.0, 1.0], [1.0, -1.0]])) == 0.0
    assert zd.outlier_fraction(torch.full((3, 5), 2.5)) == 0.0
    w = torch.from_numpy(np.random.default_rng(0).standard_t(3.0, size=(40, 30)))
    assert zd.outlier_fraction(w) == pytest.approx(np_outlier_fraction(w.numpy()), abs=1e-15)


def test_zd_score_is_mean_over_layer_matrices(llama, subject):
    expected = [np.mean([np_outlier_fraction(w) for w in layer.values()]) for layer in weights(llama)]
    got = zd.score(subject)
    assert got.shape == (4,)
    assert np.allclose(got, expected, rtol=0, atol=1e-12)


# --- EWQ ---


def test_normalized_entropy_by_hand():
    # softmax([0, ln 3]) = [1/4, 3/4]; n = 2.
    h = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75)) / math.log(2)
    assert ewq.normalized_entropy(t64([[0.0, math.log(3.0)]])) == pytest.approx(h, rel=1e-14)
    assert ewq.normalized_entropy(torch.full((4, 6), 0.3)) == pytest.approx(1.0, abs=1e-14)
    assert ewq.normalized_entropy(t64([[7.0]])) == 1.0  # one entry: nothing to spread
    huge = torch.zeros(5, 5)
    huge[2, 3] = 1000.0
    assert 0.0 <= ewq.normalized_entropy(huge) < 1e-12
    w = torch.from_numpy(np.random.default_rng(1).normal(size=(20, 12)))
    assert ewq.normalized_entropy(w) == pytest.approx(np_normalized_entropy(w.numpy()), rel=1e-12)


def test_block_entropy_is_parameter_weighted():
    constant = torch.zeros(2, 2)  # 4 entries, entropy 1
    pair = t64([[0.0, math.log(3.0)]])  # 2 entries, entropy h
    h = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75)) / math.log(2)
    assert ewq.block_entropy([constant, pair]) == pytest.approx((4 * 1.0 + 2 * h) / 6, rel=1e-14)
    assert ewq.block_entropy([pair, constant]) == pytest.approx((4 * 1.0 + 2 * h) / 6, rel=1e-14)
    assert ewq.block_entropy([pair]) == pytest.approx(h, rel=1e-14)


def test_ewq_score_matches_numpy(llama, subject):
    expected = []
    for layer in weights(llama):
        sizes = np.array([w.size for w in layer.values()], dtype=np.float64)
        entropies = np.array([np_normalized_entropy(w) for w in layer.values()])
        expected.append((sizes * entropies).sum() / sizes.sum())
    got = ewq.score(subject)
    assert got.shape == (4,)
    assert np.allclose(got, expected, rtol=1e-12, atol=0)
    assert np.all((got > 0) & (got <= 1))


# --- KurtBoost ---


def test_boost_doubles_only_the_jump():
    # Diffs [0, 0, 0, 4, 0, 0, 0]: mean 4/7, std 4 sqrt(6)/7, and |4 - 4/7| = sqrt(6) std > 2 std.
    base = np.array([1.0, 1.0, 1.0, 1.0, 5.0, 5.0, 5.0, 5.0])
    got = kurtboost.boost(base)
    assert np.array_equal(got, [1.0, 1.0, 1.0, 1.0, 10.0, 5.0, 5.0, 5.0])
    assert np.array_equal(base, [1.0, 1.0, 1.0, 1.0, 5.0, 5.0, 5.0, 5.0])  # input untouched
    assert np.array_equal(got, np_boost(base))


def test_boost_raises_a_negative_jump_to_zero():
    base = np.array([0.5, 0.5, 0.5, 0.5, -3.0, -3.0, -3.0, -3.0])
    assert np.array_equal(kurtboost.boost(base), [0.5, 0.5, 0.5, 0.5, 0.0, -3.0, -3.0, -3.0])


def test_boost_leaves_short_flat_and_smooth_sequences():
    short = np.array([1.0, 100.0])
    got = kurtboost.boost(short)
    assert np.array_equal(got, short) and got is not short
    assert np.array_equal(kurtboost.boost(np.array([-1.0, 7.0])), [-1.0, 7.0])
    assert np.array_equal(kurtboost.boost(np.full(6, 2.5)), np.full(6, 2.5))
    ramp = np.arange(8.0) * 0.5  # constant differences: no spread, no jump
    assert np.array_equal(kurtboost.boost(ramp), ramp)
    # First layer has no predecessor: a big step into layer 1 boosts layer 1, never layer 0.
    base = np.array([9.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    assert np.array_equal(kurtboost.boost(base), np_boost(base))
    assert kurtboost.boost(base)[0] == 9.0


def test_mean_kurtosis_and_score_match_numpy(llama, subject):
    expected = np.array([np.mean([np_kurtosis(w) for w in layer.values()]) for layer in weights(llama)])
    got = kurtboost.mean_kurtosis(subject.source)
    assert np.allclose(got, expected, rtol=1e-10, atol=1e-12)
    assert np.allclose(kurtboost.score(subject), np_boost(expected), rtol=1e-10, atol=1e-12)


# --- MSE ---


def test_layer_mse_with_rounding_by_hand():
    a = t64([[0.25, 0.75], [1.25, -1.75]])  # rounds to 0, 1, 1, -2: four errors of 1/16
    b = t64([[2.5, 3.0, -0.5]])  # round half to even: 2, 3, -0: errors 1/4, 0, 1/4
    assert mse.layer_mse([a, b], torch.round) == pytest.approx((4 / 16 + 0.5) / 7, rel=1e-15)
    assert mse.layer_mse([a], torch.round) == pytest.approx(1 / 16, rel=1e-15)
    assert mse.layer_mse([torch.ones(3, 3)], torch.round) == 0.0


def test_layer_mse_sees_float32_input():
    seen = []

    def identity(w: torch.Tensor) -> torch.Tensor:
        seen.append(w.dtype)
        return w

    w = t64([[0.1, 0.2, 0.3]])  # not float32-exact: the error is the float32 rounding alone
    error = float(((w.float().double() - w) ** 2).sum()) / 3
    assert mse.layer_mse([w], identity) == pytest.approx(error, rel=1e-12)
    assert seen == [torch.float32]


def test_mse_score_with_rtn(llama, subject):
    expected = []
    for layer in weights(llama):
        error = sum(((rtn(torch.from_numpy(w).float(), 2, 32).double().numpy() - w) ** 2).sum() for w in layer.values())
        expected.append(error / sum(w.size for w in layer.values()))
    got = mse.score(subject)
    assert got.shape == (4,)
    assert np.allclose(got, expected, rtol=1e-12, atol=0)
    assert np.all(got > 0)
    finer = mse.score(Subject(subject.source, quantizer=subject.quantizer, low_width=4))
    assert np.all(finer < got)


def test_mse_measures_the_quantizer_as_configured(llama, subject):
    """`nsds compare --symmetric` must rank by the symmetric grid's error, the one its plans are evaluated with
    (it used to measure the asymmetric error whatever the setting)."""
    symmetric = Subject(subject.source, quantizer=make_quantizer("rtn", 32, symmetric=True))
    expected = []
    for layer in weights(llama):
        error = sum(((rtn(torch.from_numpy(w).float(), 2, 32, True).double().numpy() - w) ** 2).sum()
                    for w in layer.values())  # fmt: skip
        expected.append(error / sum(w.size for w in layer.values()))
    got = mse.score(symmetric)
    assert np.allclose(got, expected, rtol=1e-12, atol=0)
    assert not np.allclose(got, mse.score(subject), rtol=1e-3, atol=0)


def test_mse_needs_a_quantizer(subject):
    with pytest.raises(NsdsError, match="quantizer"):
        mse.score(Subject(subject.source))


# --- LieQ ---


def test_effective_rank_by_hand():
    rank_one = torch.outer(t64([1.0, 2.0, -3.0, 0.5]), t64([2.0, -1.0, 4.0]))
    assert lieq.effective_rank(rank_one) == pytest.approx(1.0, abs=1e-9)
    padded = torch.zeros(5, 4, dtype=torch.float64)
    padded[:3, :3] = 2.5 * torch.eye(3)  # three equal singular values, one zero
    assert lieq.effective_rank(padded) == pytest.approx(3.0, rel=1e-12)
    assert lieq.effective_rank(torch.zeros(4, 6)) == 0.0
    # Singular values 3, 1: p = (3/4, 1/4).
    two = t64([[3.0, 0.0], [0.0, -1.0]])
    assert lieq.effective_rank(two) == pytest.approx(math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25))))
    y = np.random.default_rng(2).normal(size=(15, 9))
    assert lieq.effective_rank(torch.from_numpy(y)) == pytest.approx(np_erank(y), rel=1e-12)
    assert lieq.effective_rank(torch.from_numpy(y).float()) == pytest.approx(np_erank(y), rel=1e-5)


def test_relative_compactness_draws_from_the_generator():
    rng = np.random.default_rng(3)
    x = torch.from_numpy(rng.normal(size=(12, 8)))
    w1 = torch.from_numpy(rng.normal(size=(6, 8)))
    w2 = torch.from_numpy(rng.normal(size=(10, 8)))
    draws = torch.Generator().manual_seed(11)
    r1 = torch.randn(w1.shape, generator=draws, dtype=torch.float64).numpy()
    r2 = torch.randn(w2.shape, generator=draws, dtype=torch.float64).numpy()
    generator = torch.Generator().manual_seed(11)
    first = lieq.relative_compactness(x, w1, generator)
    second = lieq.relative_compactness(x, w2, generator)  # the next draw, not a fresh one
    xn = x.numpy()
    assert first == pytest.approx(np_erank(xn @ r1.T) / np_erank(xn @ w1.numpy().T), rel=1e-12)
    assert second == pytest.approx(np_erank(xn @ r2.T) / np_erank(xn @ w2.numpy().T), rel=1e-12)
    assert lieq.relative_compactness(x, torch.zeros(6, 8), torch.Generator().manual_seed(0)) == 0.0


def test_lieq_needs_model_and_tokenizer(llama, tokenizer, subject):
    source = subject.source
    for partial in (Subject(source), Subject(source, model=llama), Subject(source, tokenizer=tokenizer)):
        with pytest.raises(NsdsError, match="model and tokenizer"):
            lieq.score(partial)


def test_lieq_score_matches_recomputation(llama, tokenizer, subject):
    inputs: dict[tuple[int, str], torch.Tensor] = {}
    hooks = [
        layer.get_submodule(PROJECTIONS[role]).register_forward_pre_hook(
            lambda _m, args, key=(i, role): inputs.__setitem__(key, args[0][0].detach().double())
        )
        for i, layer in enumerate(llama.model.layers)
        for role in ("q", "k", "v", "o")
    ]
    try:
        with torch.no_grad():
            llama(input_ids=tokenizer(lieq.SENTENCE, return_tensors="pt").input_ids)
    finally:
        for hook in hooks:
            hook.remove()
    generator = torch.Generator().manual_seed(lieq.SEED)
    expected = []
    for i, layer in enumerate(weights(llama)):
        ratios = []
        for role in ("q", "k", "v", "o"):  # the model's module order: the generator's draw order
            x, w = inputs[(i, role)].numpy(), layer[role]
            random = torch.randn(w.shape, generator=generator, dtype=torch.float64).numpy()
            ratios.append(np_erank(x @ random.T) / np_erank(x @ w.T))
        expected.append(np.mean(ratios))
    got = lieq.score(subject)
    assert got.shape == (4,)
    assert np.all(np.isfinite(got)) and np.all(got > 0)
    assert np.allclose(got, expected, rtol=1e-9, atol=0)


# --- NSDS ablations ---


@pytest.fixture(scope="module")
def nsds_report(subject):
    return nsds_scorer.score(subject.source)


def test_single_aspect_ablations_are_the_report_fields(subject, nsds_report):
    nv = ablations.nv_only(subject)
    se = ablations.se_only(subject)
    assert np.allclose(nv, [layer.nv for layer in nsds_report.layers], rtol=1e-12, atol=0)
    assert np.allclose(se, [layer.se for layer in nsds_report.layers], rtol=1e-12, atol=0)
    assert "nsds" in subject.memo  # one NSDS run, shared


def test_reaggregated_ablations_match_rescoring(subject):
    mad1 = nsds_scorer.score(subject.source, NsdsParams(mad_constant=1.0))
    assert np.allclose(ablations.mad1(subject), mad1.scores, rtol=1e-12, atol=0)
    product = nsds_scorer.score(subject.source, NsdsParams(soft_or="product"))
    assert np.allclose(ablations.product(subject), product.scores, rtol=1e-12, atol=0)


def test_ablations_differ_from_nsds(subject, nsds_report):
    default = np.array(nsds_report.scores)
    assert not np.allclose(ablations.mad1(subject), default, rtol=1e-6, atol=0)
    assert not np.allclose(ablations.product(subject), default, rtol=1e-6, atol=0)


@pytest.mark.parametrize("shape", [(9, 5), (5, 9), (6, 6)])
def test_singular_values_match_svd(shape):
    w = torch.from_numpy(np.random.default_rng(4).standard_t(4.0, size=shape))
    got = ablations.singular_values(w)
    assert got.shape == (min(shape),)
    assert torch.allclose(got, torch.linalg.svdvals(w), rtol=1e-10, atol=1e-12)
    assert torch.all(got[:-1] >= got[1:])


def test_matrix_raw_by_hand():
    # Singular values 4, 2, 1 (energy 16, 4, 1): 99% of 21 needs all three; beta = 1.
    w = torch.diag(t64([4.0, -2.0, 1.0]))
    p = np.array([4.0, 2.0, 1.0]) / 7.0
    raw = ablations.matrix_raw(w, 0.99)
    assert raw.kept == 3.0
    assert raw.se == pytest.approx(7.0 / math.exp(-(p * np.log(p)).sum()), rel=1e-12)
    assert raw.nv == pytest.approx(np_kurtosis(w.numpy()), rel=1e-12)
    # One dominant direction still keeps two triplets (clipped up to 2).
    spike = torch.diag(t64([100.0, 1.0, 0.5]))
    p = np.array([100.0, 1.0]) / 101.0
    raw = ablations.matrix_raw(spike, 0.99)
    assert raw.kept == 2.0
    assert raw.se == pytest.approx(101.0 / math.exp(-(p * np.log(p)).sum()), rel=1e-12)


@pytest.mark.parametrize("shape", [(30, 12), (12, 30)])
def test_matrix_raw_matches_numpy(shape):
    w = np.random.default_rng(5).standard_t(3.0, size=shape)
    raw = ablations.matrix_raw(torch.from_numpy(w).float(), 0.99)
    se, k = np_capacity(w.astype(np.float32).astype(np.float64))
    assert raw.kept == float(k)
    assert raw.se == pytest.approx(se, rel=1e-10)
    assert raw.nv == pytest.approx(np_kurtosis(w.astype(np.float32).astype(np.float64)), rel=1e-10)


def test_collapsed_matches_numpy(llama, subject):
    def mad_sigmoid(r: np.ndarray) -> np.ndarray:
        z = (r - np.median(r)) / (1.4826 * np.median(np.abs(r - np.median(r))) + 1e-12)
        return 1 / (1 + np.exp(-z))

    def soft_or(p: np.ndarray, eps: float) -> np.ndarray:
        return 1 - np.exp(np.mean(np.log(1 - p + eps), axis=0))

    layers = weights(llama)
    aspects = {}
    for aspect in ("nv", "se"):
        per_role = []
        for role in MATRICES:
            measure = np_kurtosis if aspect == "nv" else (lambda w: np_capacity(w)[0])
            r = np.array([measure(layer[role]) for layer in layers])
            per_role.append(mad_sigmoid(r))
        aspects[aspect] = soft_or(np.array(per_role), 1e-12)
    expected = soft_or(np.array([aspects["nv"], aspects["se"]]), 0.0)
    got = ablations.collapsed(subject)
    assert got.shape == (4,)
    assert np.allclose(got, expected, rtol=1e-9, atol=1e-12)
