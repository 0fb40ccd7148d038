"""Perplexity evaluations as jobs: what to put into the model, measured here one after another or, with
`--ray`, on the workers' model copies (nsds.cluster); both measure a job with `measure`."""

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch

from nsds.evaluate.perplexity import perplexity
from nsds.quantize import WeightBank


@dataclass(frozen=True)
class PerplexityJob:
    """One perplexity: the model with these modules stored as these formats, every other module at the
    checkpoint's weights (no formats: the checkpoint itself)."""

    desc: str
    formats: dict[str, str]  # module name -> storage format, as Plan.formats() gives


def measure(model: torch.nn.Module, windows: torch.Tensor, bank: WeightBank | None, job: PerplexityJob) -> float:
    """The job's perplexity; `bank` (the quantizer's, over `model`) puts the formats in from pristine weights."""
    if bank is not None:
        bank.load_formats(job.formats, desc=job.desc)
    return perplexity(model, windows, desc=job.desc)


class Evaluator(Protocol):
    """Runs jobs for one quantizer's bank (None: jobs without formats) and yields (index in `jobs`,
    perplexity) as each finishes, in any order."""

    def run(self, bank: WeightBank | None, jobs: list[PerplexityJob]) -> Iterator[tuple[int, float]]: ...


class Here:
    """Evaluations in this process, in order, on the loaded model."""

    def __init__(self, model: torch.nn.Module, windows: torch.Tensor) -> None:
        self.model, self.windows = model, windows

    def run(self, bank: WeightBank | None, jobs: list[PerplexityJob]) -> Iterator[tuple[int, float]]:
        for i, job in enumerate(jobs):
            yield i, measure(self.model, self.windows, bank, job)
