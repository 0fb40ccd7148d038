"""EWQ, entropy-weighted quantization (Behtash et al., "Universality of Layer-Level Entropy-Weighted
Quantization Beyond Model Architecture and Size", arXiv:2503.04704).

Each weight matrix's entries are turned into a distribution by a softmax; its Shannon entropy is divided
by log(n) (n entries) so matrices of different sizes compare; a block's entropy is the parameter-weighted
mean over its matrices, as in the paper. EWQ keeps high-entropy blocks at higher precision, so the
score is the block entropy.
"""

import math

import numpy as np
import torch

from nsds.scorers.subject import Subject, as_float64, layer_matrices


def normalized_entropy(w: torch.Tensor) -> float:
    """H(softmax(w)) / log(n) over all n entries of w, in [0, 1]; 1 for a constant matrix."""
    w = as_float64(w).flatten()
    if w.numel() < 2:
        return 1.0
    log_p = torch.log_softmax(w, dim=0)
    return float(-(log_p.exp() * log_p).sum()) / math.log(w.numel())


def block_entropy(matrices: list[torch.Tensor]) -> float:
    """Parameter-weighted mean of the matrices' normalized entropies."""
    sizes = np.array([w.numel() for w in matrices], dtype=np.float64)
    entropies = np.array([normalized_entropy(w) for w in matrices])
    return float((sizes * entropies).sum() / sizes.sum())


def score(subject: Subject) -> np.ndarray:
    return np.array([block_entropy(list(layer.values())) for layer in layer_matrices(subject.source)])
