"""Perplexity of a causal LM over fixed token windows: exp of the mean next-token NLL."""

import math

import torch
import torch.nn.functional as F

from nsds.progress import progress


@torch.inference_mode()
def perplexity(model: torch.nn.Module, windows: torch.Tensor, desc: str = "perplexity") -> float:
    """Every window is scored independently (no carried context); each predicts its tokens 1..n-1."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for window in progress(windows, desc=desc, unit="window"):
        ids = window.unsqueeze(0).to(device)
        logits = model(input_ids=ids).logits[0, :-1].float()
        total += float(F.cross_entropy(logits, ids[0, 1:], reduction="sum"))
        count += ids.shape[1] - 1
    return math.exp(total / count)
