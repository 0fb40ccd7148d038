"""KL divergence of a quantized model's next-token distribution from the reference model's, token by token
on the evaluation windows (docs/PROTOCOL.md): the measure the llama.cpp community ranks quants by.

The reference pass keeps its log-probabilities on disk, float16, window by window (nsds.spill; tokens x
vocabulary: 0.8 GB for SmolLM2 at 8192 tokens, 4.3 GB for Gemma-3's 262k vocabulary), so the model is never
held twice, the process holds one window of them at a time, and every plan is compared window by window.
float16 rounds a log-probability by up to 2^-11 of itself; the part of each token's KLD that rounding shifts,
sum_v p16_v (log p16_v - log p_v), is computed exactly in the reference pass and taken off again, so what
remains is KL(p || q) with p's weights rounded (relative error ~1e-3), not a bias of the size of a small
model's KLD.
"""

import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from nsds.spill import RowFile


@dataclass(frozen=True)
class Divergence:
    """A model's distance from the reference on the same windows, per scored token (nats)."""

    ppl: float
    kld: float  # mean KL(reference || model)
    kld_stderr: float  # standard error of that mean
    kld_p99: float  # 99th percentile over tokens
    same_top: float  # share of tokens whose most likely next token is the reference's
    window_klds: tuple[float, ...]  # the mean KLD of each window (for paired comparisons of two models)


class ReferenceLogProbs:
    """The reference model's log-probabilities on `windows` (every position but the last of each), recorded
    once into `folder` by `record`, then the yardstick of `compare`."""

    def __init__(self, folder: Path) -> None:
        self.path = Path(folder) / "reference-logprobs.f16"
        self.logprobs: RowFile | None = None  # window by window, float16, on disk (nsds.spill)
        self.correction: np.ndarray | None = None  # per token: sum p16 (log p16 - log p), from the exact values
        self.top: np.ndarray | None = None  # per token: the reference's most likely next token

    @torch.inference_mode()
    def record(self, windows: torch.Tensor, log_probs: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> float:
        """The reference's perplexity on the windows, from its `log_probs` (window ids, float32 log-probabilities
        of positions 0..n-2, window by window: LayerwiseModel.log_probs); they are kept for `compare`."""
        positions = windows.shape[1] - 1
        total = 0.0
        for i, (ids, logp) in enumerate(log_probs):
            if self.logprobs is None:
                self.logprobs = RowFile(self.path, windows.shape[0], tuple(logp.shape), torch.float16)
                self.correction = np.zeros(windows.shape[0] * positions, dtype=np.float64)
                self.top = np.zeros(windows.shape[0] * positions, dtype=np.int64)
            rows = slice(i * positions, (i + 1) * positions)
            stored = logp.half()
            self.logprobs.write(i, stored)
            rounded = stored.float()
            self.correction[rows] = (rounded.exp() * (rounded - logp)).sum(-1).double().numpy()
            self.top[rows] = logp.argmax(-1).numpy()
            total -= float(logp.gather(-1, ids[1:, None]).sum())
        return math.exp(total / (windows.shape[0] * positions))

    @torch.inference_mode()
    def compare(self, windows: torch.Tensor, log_probs: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> Divergence:
        """A model's perplexity and its KL divergence from the recorded reference, from its `log_probs` on the
        same windows (as `record` reads them)."""
        if self.logprobs is None or self.correction is None or self.top is None:
            raise RuntimeError("the reference log-probabilities were not recorded")
        positions = windows.shape[1] - 1
        total, klds, same = 0.0, [], 0
        for i, (ids, logq) in enumerate(log_probs):
            rows = slice(i * positions, (i + 1) * positions)
            reference = self.logprobs.read(i).float()
            kld = (reference.exp() * (reference - logq)).sum(-1).double() - torch.from_numpy(self.correction[rows])
            klds.append(kld.numpy())
            same += int((logq.argmax(-1).numpy() == self.top[rows]).sum())
            total -= float(logq.gather(-1, ids[1:, None]).sum())
        values = np.concatenate(klds)
        count = values.size
        return Divergence(
            ppl=math.exp(total / count),
            kld=float(values.mean()),
            kld_stderr=float(values.std(ddof=1) / math.sqrt(count)) if count > 1 else 0.0,
            kld_p99=float(np.percentile(values, 99)),
            same_top=same / count,
            window_klds=tuple(float(k.mean()) for k in klds),
        )

    def close(self) -> None:
        """Drop the recorded log-probabilities and their file."""
        if self.logprobs is not None:
            self.logprobs.close()  # deletes the file too
        self.logprobs = None
