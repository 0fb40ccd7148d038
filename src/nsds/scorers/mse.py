"""MSE: the weight quantization error at the low width, the plainest data-free sensitivity proxy
(GPTQ's layer objective ||(W - Q(W)) X||^2, Frantar et al., arXiv:2210.17323, with no data: X X^T = I,
which leaves ||W - Q(W)||^2).

A layer's score is the mean squared error between its linear weights and their quantized-dequantized
values, over all the layer's weights, with the quantizer being evaluated, as configured (RTN: min/max or
abs-max per group; HQQ: its optimizer), at the plan's low width and group size.
"""

import numpy as np
import torch

from nsds.errors import NsdsError
from nsds.scorers.subject import Subject, as_float64, layer_matrices


def layer_mse(matrices: list[torch.Tensor], quantize) -> float:
    """sum ||W - Q(W)||^2 / (number of weights), over the layer's matrices; `quantize` maps a float32 W to Q(W)."""
    error = sum(float((as_float64(quantize(w.float())) - as_float64(w)).square().sum()) for w in matrices)
    return error / sum(w.numel() for w in matrices)


def score(subject: Subject) -> np.ndarray:
    """The error of the quantizer the plans are evaluated with, as configured (group size, symmetry)."""
    quantizer = subject.quantizer
    if quantizer is None:
        raise NsdsError("the MSE scorer needs a quantizer (the one the plans are evaluated with)")

    def quantize(w: torch.Tensor) -> torch.Tensor:
        return quantizer.fake_quantize(w, subject.low_width)

    return np.array([layer_mse(list(layer.values()), quantize) for layer in layer_matrices(subject.source)])
