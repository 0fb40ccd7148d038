"""KurtBoost (Zhang et al., "Towards Superior Quantization Accuracy: A Layer-sensitive Approach",
arXiv:2503.06518).

A layer's base score is the mean excess kurtosis of its weight matrices. Layers where the kurtosis
changes abruptly along depth are the hard ones: where the difference to the previous layer lies more
than 2 standard deviations from the mean difference, the score is doubled (a negative base score is
raised to 0 instead, so a boost never lowers a layer).
"""

import numpy as np

from nsds.metrics.moments import kurtosis
from nsds.scorers.subject import Subject, as_float64, layer_matrices

JUMP_SIGMAS = 2.0


def boost(base: np.ndarray, sigmas: float = JUMP_SIGMAS) -> np.ndarray:
    """Double the layers whose depth difference base[l] - base[l-1] is an outlier (> sigmas std from
    the mean difference; population std). Layer 0 has no predecessor and is never boosted."""
    base = np.asarray(base, dtype=np.float64)
    if base.size < 3:
        return base.copy()
    diff = np.diff(base)
    spread = diff.std()
    jumps = np.zeros(base.size, dtype=bool)
    if spread > 0:
        jumps[1:] = np.abs(diff - diff.mean()) > sigmas * spread
    return np.where(jumps, base + np.abs(base), base)


def mean_kurtosis(source) -> np.ndarray:
    return np.array(
        [np.mean([float(kurtosis(as_float64(w))) for w in layer.values()]) for layer in layer_matrices(source)]
    )


def score(subject: Subject) -> np.ndarray:
    return boost(mean_kurtosis(subject.source))
