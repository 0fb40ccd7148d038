"""Robust aggregation (docs/METHOD.md §4): MAD-Sigmoid per role and aspect, then Soft-OR fusion.

These act on a handful of numbers per layer, so they run in float64 NumPy on the host.
"""

from typing import Literal

import numpy as np

SoftOrForm = Literal["geometric", "product"]
MEAN_AD_CONSTANT = 1.2533  # sqrt(pi/2): makes the mean absolute deviation a consistent sigma estimate


def mad_sigmoid(
    r: np.ndarray, mad_constant: float = 1.4826, temperature: float = 1.0, eps: float = 1e-12
) -> np.ndarray:
    """sigmoid(z / T) with the robust z-score z = (r - median) / (c * MAD + eps).

    A degenerate vector does not blow up: if MAD = 0 the scale c * MAD is replaced by
    1.2533 * mean|r - median|; if that is 0 too, every layer gets 0.5.
    """
    r = np.asarray(r, dtype=np.float64)
    deviation = r - np.median(r)
    scale = mad_constant * np.median(np.abs(deviation))
    if scale == 0:
        scale = MEAN_AD_CONSTANT * np.mean(np.abs(deviation))
    if scale == 0:
        return np.full_like(r, 0.5)
    z = deviation / (scale + eps)
    return 0.5 * (1.0 + np.tanh(0.5 * z / temperature))  # = 1 / (1 + exp(-z/T)), without overflow


def soft_or(p: np.ndarray, form: SoftOrForm = "geometric", eps: float = 1e-12) -> np.ndarray:
    """Fuse probabilities p (sources x layers) per layer.

    geometric (NSDS default): 1 - exp(mean_j ln(1 - p_j + eps)), the complement of the geometric mean
    of the complements; product: 1 - prod_j (1 - p_j), the classic noisy-OR.
    """
    p = np.asarray(p, dtype=np.float64)
    if form == "geometric":
        with np.errstate(divide="ignore"):
            return 1.0 - np.exp(np.mean(np.log(1.0 - p + eps), axis=0))
    if form == "product":
        return 1.0 - np.prod(1.0 - p, axis=0)
    raise ValueError(f"unknown Soft-OR form '{form}' (use 'geometric' or 'product')")
