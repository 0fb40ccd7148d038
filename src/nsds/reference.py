"""A plain, slow restatement of docs/METHOD.md sections 1-3, to check the fast path against (tests, benchmark).

Every head circuit is formed as a full d x d matrix and decomposed by a full SVD; every kurtosis is the
textbook formula in float64 NumPy; W_U is decomposed by a full SVD. No shortcut is shared with
nsds.metrics, so agreement between the two is evidence that the shortcuts are exact.
"""

import numpy as np
import torch

from nsds.arch import Geometry, LayerRoles


def excess_kurtosis(x: np.ndarray) -> float:
    """Population excess kurtosis m4 / m2^2 - 3 of all entries (0 for a constant input)."""
    x = np.asarray(x, dtype=np.float64).ravel()
    c = x - x.mean()
    m2, m4 = np.mean(c**2), np.mean(c**4)
    return 0.0 if m2 == 0 else float(m4 / m2**2 - 3.0)


def kept_triplets(sigma: np.ndarray, energy: float) -> int:
    total = np.sum(sigma**2)
    running = 0.0
    for k, s in enumerate(sigma, start=1):
        running += s**2
        if running >= energy * total:
            return min(max(k, 2), len(sigma))
    return len(sigma)


def spectral_capacity(sigma: np.ndarray, beta: np.ndarray, k: int) -> float:
    s = beta[:k] * sigma[:k]
    if s.sum() == 0:
        return 0.0
    p = s / s.sum()
    entropy = -sum(pi * np.log(pi) for pi in p if pi > 0)
    return float(s.sum() / np.exp(entropy))


def readout_basis(unembedding: torch.Tensor, energy: float) -> np.ndarray:
    """P: the top right singular vectors of W_U by the energy rule (full SVD)."""
    _, sigma, vt = np.linalg.svd(unembedding.double().numpy(), full_matrices=False)
    return vt[: kept_triplets(sigma, energy)].T


def matrix_metrics(w: np.ndarray, role: str, readout: np.ndarray, energy: float) -> tuple[float, float, int]:
    """(NV, SE, k) of one matrix for role 'qk', 'ov', 'up', 'gate' or 'down'."""
    u, sigma, vt = np.linalg.svd(w, full_matrices=False)
    k = kept_triplets(sigma, energy)
    beta = np.zeros(len(sigma))
    for i in range(k):
        if role in ("up", "gate"):
            beta[i] = np.log1p(max(excess_kurtosis(vt[i]), 0.0))
        elif role == "qk":
            beta[i] = np.log1p(max(excess_kurtosis(u[:, i]), 0.0) * max(excess_kurtosis(vt[i]), 0.0))
        else:  # writers: ov, down
            beta[i] = np.linalg.norm(readout.T @ u[:, i])
    return excess_kurtosis(w), spectral_capacity(sigma, beta, k), k


def layer_metrics(
    roles: LayerRoles, geo: Geometry, readout: np.ndarray, energy: float
) -> dict[str, tuple[float, float, float]]:
    """Raw (NV, SE, mean k) per role of one layer, circuits formed head by head."""
    matrices = ("q", "k", "v", "o", "up", "gate", "down")  # a dense layer's (the reference knows no MoE or MLA)
    f64 = {name: None if getattr(roles, name) is None else getattr(roles, name).double().numpy() for name in matrices}
    dh = geo.head_dim
    circuits: dict[str, list[tuple[float, float, int]]] = {"qk": [], "ov": []}
    for h in range(geo.num_heads):
        g = geo.kv_group(h)
        wq, wk = f64["q"][h * dh : (h + 1) * dh], f64["k"][g * dh : (g + 1) * dh]
        wo, wv = f64["o"][:, h * dh : (h + 1) * dh], f64["v"][g * dh : (g + 1) * dh]
        circuits["qk"].append(matrix_metrics(wq.T @ wk, "qk", readout, energy))
        circuits["ov"].append(matrix_metrics(wo @ wv, "ov", readout, energy))
    out = {
        role: tuple(float(np.mean(column)) for column in zip(*values, strict=True)) for role, values in circuits.items()
    }
    for role in ("up", "gate", "down"):
        if f64[role] is not None:
            out[role] = tuple(float(x) for x in matrix_metrics(f64[role], role, readout, energy))
    return out
