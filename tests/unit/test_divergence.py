"""In-process KL divergence from the reference, against a direct float64 computation on the same windows."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nsds.evaluate.divergence import ReferenceLogProbs
from nsds.evaluate.perplexity import perplexity

from tiny_models import tiny_model, whole_log_probs


def _exact(reference: torch.nn.Module, model: torch.nn.Module, windows: torch.Tensor) -> np.ndarray:
    """Per token KL(reference || model) in float64, positions 0..n-2 of every window."""
    values = []
    with torch.no_grad():
        for window in windows:
            p = F.log_softmax(reference(input_ids=window[None]).logits[0, :-1].double(), -1)
            q = F.log_softmax(model(input_ids=window[None]).logits[0, :-1].double(), -1)
            values.append((p.exp() * (p - q)).sum(-1).numpy())
    return np.concatenate(values)


def test_kld_equals_the_direct_computation(tmp_path):
    reference = tiny_model("llama")
    model = tiny_model("llama")
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.004 * torch.randn_like(parameter))  # a "quantized" copy
    windows = torch.randint(0, 96, (3, 17), generator=torch.Generator().manual_seed(1))
    recorded = ReferenceLogProbs(tmp_path)
    ppl = recorded.record(windows, whole_log_probs(reference, windows))
    assert ppl == pytest.approx(perplexity(reference, windows), rel=1e-6)
    assert recorded.path.is_file()
    found = recorded.compare(windows, whole_log_probs(model, windows))
    exact = _exact(reference, model, windows)
    assert found.kld == pytest.approx(exact.mean(), rel=2e-3)  # float16 storage, its rounding shift taken off
    assert found.kld_p99 == pytest.approx(np.percentile(exact, 99), rel=5e-3)
    assert found.kld_stderr == pytest.approx(exact.std(ddof=1) / math.sqrt(exact.size), rel=5e-3)
    assert found.ppl == pytest.approx(perplexity(model, windows), rel=1e-6)
    assert 0 < found.same_top < 1
    itself = recorded.compare(windows, whole_log_probs(reference, windows))
    assert abs(itself.kld) < 1e-6 and itself.same_top == 1.0
    recorded.close()
    assert not recorded.path.exists()
