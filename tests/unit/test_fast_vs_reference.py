"""The whole fast path (nsds.scorers.nsds.measure_layer) against the plain full-SVD reference.

Random heavy-tailed and low-rank layers with GQA and head_dim != d/H; relative error <= 1e-6 in
float64 on every role's NV and SE (the issue's bar; in practice it is ~1e-12).
"""

import numpy as np
import pytest
import torch

from nsds.arch import LayerRoles
from nsds.compute import Compute
from nsds.geometry import Geometry
from nsds.metrics.spectra import gram_of_columns, readout_complement
from nsds.reference import layer_metrics, readout_basis
from nsds.scorers.nsds import measure_layer


def random_layer(geo: Geometry, mlp: int, seed: int, low_rank: bool, gated: bool = True) -> LayerRoles:
    gen = np.random.default_rng(seed)

    def mat(rows: int, cols: int) -> torch.Tensor:
        w = gen.standard_t(3.0, size=(rows, cols))
        if low_rank:  # rank-deficient plus a little noise, as in heavily structured weights
            rank = max(2, min(rows, cols) // 6)
            w = gen.standard_t(3.0, size=(rows, rank)) @ gen.normal(size=(rank, cols)) + 1e-3 * w
        return torch.from_numpy(w).float()  # checkpoints hold float32; the metrics upcast exactly

    d, q_rows, kv_rows = geo.hidden_size, geo.num_heads * geo.head_dim, geo.num_kv_heads * geo.head_dim
    return LayerRoles(
        q=mat(q_rows, d), k=mat(kv_rows, d), v=mat(kv_rows, d), o=mat(d, q_rows),
        up=mat(mlp, d), gate=mat(mlp, d) if gated else None, down=mat(d, mlp),
    )  # fmt: skip


@pytest.mark.parametrize("low_rank", [False, True])
@pytest.mark.parametrize("gated", [True, False])
def test_fast_path_matches_full_svd_reference(low_rank, gated):
    geo = Geometry("llama", "test", num_layers=1, hidden_size=48, num_heads=6, num_kv_heads=2, head_dim=12,
                   tied_embeddings=True)  # fmt: skip
    unembedding = torch.from_numpy(np.random.default_rng(9).standard_t(3.0, size=(200, 48))).float()
    energy = 0.99
    complement, k_u = readout_complement(gram_of_columns(unembedding, torch.float64), energy)
    basis = readout_basis(unembedding, energy)
    assert basis.shape[1] == k_u
    for seed in range(3):
        roles = random_layer(geo, mlp=80, seed=seed, low_rank=low_rank, gated=gated)
        fast = measure_layer(roles, geo, complement, energy, Compute())
        ref = layer_metrics(roles, geo, basis, energy)
        assert set(fast) == set(ref) == ({"qk", "ov", "up", "gate", "down"} if gated else {"qk", "ov", "up", "down"})
        for role, (nv, se, kept) in ref.items():
            assert fast[role].nv == pytest.approx(nv, rel=1e-6), (role, "NV")
            assert fast[role].se == pytest.approx(se, rel=1e-6), (role, "SE")
            assert fast[role].kept == pytest.approx(kept), (role, "k")


def test_writer_density_when_k_differs_from_k_u():
    """The authors' script crashed whenever k != k_U (docs/METHOD.md §6, defect 1); ours must not."""
    geo = Geometry("llama", "test", 1, hidden_size=32, num_heads=4, num_kv_heads=4, head_dim=8, tied_embeddings=True)
    unembedding = torch.from_numpy(np.random.default_rng(0).normal(size=(64, 32)) * np.logspace(0, -3, 32))
    complement, k_u = readout_complement(gram_of_columns(unembedding, torch.float64), 0.99)
    roles = random_layer(geo, mlp=64, seed=5, low_rank=True)
    fast = measure_layer(roles, geo, complement, 0.99, Compute())
    assert k_u != fast["down"].kept
    ref = layer_metrics(roles, geo, readout_basis(unembedding, 0.99), 0.99)
    assert fast["down"].se == pytest.approx(ref["down"][1], rel=1e-6)
