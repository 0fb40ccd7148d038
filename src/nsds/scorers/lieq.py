"""LieQ, data-free variant (after "LieQ: Layer-wise Information Effectiveness Quantization", 2025, which
scores layers by how compact and effective their representations are).

The model reads one fixed English sentence. For every attention projection (q, k, v, o; a fused qkv
counts as one; MLA's q_a, q_b, kv_a, kv_b) the projection's output on its actual input, Y = X W^T, is
compared with the output of a randomly initialised copy of the projection (Gaussian, fixed seed) on the
same input. Compactness is measured by the effective rank erank(Y) = exp(entropy of the normalised
singular values). A layer whose trained projections concentrate the representation far more than random
ones (erank_random / erank large) carries learned structure, so it scores higher. One sentence stands
in for calibration data; no dataset is read.
"""

import numpy as np
import torch

from nsds import arch
from nsds.errors import NsdsError
from nsds.scorers.subject import Subject

SENTENCE = (
    "The committee met on Tuesday morning to discuss the new budget, and after a long debate about schools, "
    "roads and taxes, the members agreed to postpone the final vote until the end of next month."
)
SEED = 0


def effective_rank(y: torch.Tensor) -> float:
    """exp(-sum p log p) with p the singular values of y divided by their sum (Roy & Vetterli); 0 for y = 0."""
    sigma = torch.linalg.svdvals(y.double())
    total = sigma.sum()
    if total == 0:
        return 0.0
    p = sigma[sigma > 0] / total
    return float(torch.exp(-(p * p.log()).sum()))


def relative_compactness(x: torch.Tensor, w: torch.Tensor, generator: torch.Generator) -> float:
    """erank(X W_rand^T) / erank(X W^T) for a Gaussian W_rand of W's shape (scale-free, so no init scale)."""
    random = torch.randn(w.shape, generator=generator, dtype=torch.float64)
    trained = effective_rank(x.double() @ w.double().T)
    return effective_rank(x.double() @ random.T) / trained if trained > 0 else 0.0


@torch.inference_mode()
def score(subject: Subject) -> np.ndarray:
    model, tokenizer = subject.model, subject.tokenizer
    if model is None or tokenizer is None:
        raise NsdsError("the LieQ scorer runs the model on one sentence: it needs the loaded model and tokenizer")
    conv1d = arch.family_of(model.config.model_type).conv1d
    modules = [m for m in arch.linear_modules(model, fuse=False) if m.role in arch.ATTENTION_ROLES]
    inputs: dict[str, torch.Tensor] = {}
    hooks = [
        model.get_submodule(m.name).register_forward_pre_hook(
            lambda _module, args, name=m.name: inputs.__setitem__(name, args[0][0].detach().cpu())
        )
        for m in modules
    ]
    try:
        ids = tokenizer(SENTENCE, return_tensors="pt").input_ids.to(next(model.parameters()).device)
        model(input_ids=ids)
    finally:
        for hook in hooks:
            hook.remove()
    generator = torch.Generator().manual_seed(SEED)
    per_layer: dict[int, list[float]] = {}
    for m in modules:
        weight = model.get_submodule(m.name).weight.detach().cpu()
        w = weight.T if conv1d else weight
        per_layer.setdefault(m.layer, []).append(relative_compactness(inputs[m.name], w, generator))
    return np.array([np.mean(per_layer[i]) for i in sorted(per_layer)])
