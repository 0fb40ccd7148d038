"""ZD, the z-score distribution of the weights (Dumitru et al., "Layer-Wise Quantization: A Pragmatic
and Effective Method for Quantizing LLMs Beyond Integer Bit-Levels", arXiv:2406.17415).

For each linear weight matrix, the fraction of entries whose z-score |(w - mean) / std| exceeds 1; a
layer's score is the mean of that fraction over its matrices. The paper ranks layers with a larger
fraction as more important (their weights spread wider around the mean).
"""

import numpy as np
import torch

from nsds.scorers.subject import Subject, as_float64, layer_matrices


def outlier_fraction(w: torch.Tensor) -> float:
    """Fraction of entries with |z| > 1 (population std); 0 for a constant matrix."""
    w = as_float64(w).flatten()
    std = w.std(correction=0)
    if std == 0:
        return 0.0
    return float(((w - w.mean()).abs() > std).double().mean())


def score(subject: Subject) -> np.ndarray:
    return np.array(
        [np.mean([outlier_fraction(w) for w in layer.values()]) for layer in layer_matrices(subject.source)]
    )
