"""Ablations of NSDS: which parts of the method carry the ranking.

- nsds-nv / nsds-se: one aspect alone (P_NV or P_SE) instead of their Soft-OR;
- nsds-mad1: MAD constant 1.0 (the authors' script) instead of 1.4826 (the paper's figure, our default);
- nsds-product: the classic noisy-OR 1 - prod(1 - p) instead of the geometric Soft-OR;
- nsds-collapsed: no roles: every raw weight matrix (q, k, v, o, up, gate, down) is its own "role", with
  NV = its kurtosis and SE = its plain spectral capacity (no circuits, no role weights beta = 1).

All but the last re-aggregate the raw measurements of the one NSDS run the Subject memoizes.
"""

from dataclasses import replace

import numpy as np
import torch

from nsds.metrics.moments import kurtosis
from nsds.metrics.spectra import capacity, energy_rank, gram_of_columns
from nsds.scorers.nsds import NsdsParams, RawRole, aggregate, raw_roles, report_of
from nsds.scorers.subject import Subject, as_float64, layer_matrices


def _reaggregated(subject: Subject, aspect: str = "score", **changes) -> np.ndarray:
    """The memoized NSDS run's raw measurements aggregated again with changed parameters."""
    report = report_of(subject)
    params = replace(NsdsParams(**report.parameters), **changes)
    return np.array([getattr(layer, aspect) for layer in aggregate(raw_roles(report), params)])


def nv_only(subject: Subject) -> np.ndarray:
    return _reaggregated(subject, "nv")


def se_only(subject: Subject) -> np.ndarray:
    return _reaggregated(subject, "se")


def mad1(subject: Subject) -> np.ndarray:
    return _reaggregated(subject, mad_constant=1.0)


def product(subject: Subject) -> np.ndarray:
    return _reaggregated(subject, soft_or="product")


def singular_values(w: torch.Tensor) -> torch.Tensor:
    """Singular values of w, descending, from the eigenvalues of its smaller Gram matrix."""
    gram = gram_of_columns(w if w.shape[0] >= w.shape[1] else w.T, w.dtype)
    return torch.linalg.eigvalsh(gram).flip(-1).clamp_min(0).sqrt()


def matrix_raw(w: torch.Tensor, energy: float) -> RawRole:
    """NV and SE of one matrix taken whole: kurtosis of its entries, capacity of its spectrum (beta = 1)."""
    w = as_float64(w)
    sigma = singular_values(w)
    kept = energy_rank(sigma, energy)
    return RawRole(nv=float(kurtosis(w)), se=float(capacity(sigma, torch.ones_like(sigma), kept)), kept=float(kept))


def collapsed(subject: Subject) -> np.ndarray:
    params = NsdsParams()
    raw = [
        {name: matrix_raw(w, params.energy) for name, w in layer.items()} for layer in layer_matrices(subject.source)
    ]
    return np.array([layer.score for layer in aggregate(raw, params)])
