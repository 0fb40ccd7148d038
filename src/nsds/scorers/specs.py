"""Every layer scorer, as data: one spec per scorer, in the order tables list them.

A scorer maps a Subject (scorers/subject.py) to one sensitivity per decoder layer; higher means "give
this layer more bits", so every allocator consumes every scorer the same way. This module imports no
scorer code (and no torch): reports read the specs, commands resolve `entry` when they run a scorer.
"""

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from nsds.errors import NsdsError

KINDS = ("nsds", "baseline", "ablation")


@dataclass(frozen=True)
class ScorerSpec:
    name: str
    kind: str  # nsds: the paper's method; baseline: a published scorer; ablation: NSDS with one part changed
    entry: str  # "module:function" taking a Subject, returning one score per layer
    about: str
    needs_model: bool = False  # runs the loaded model (needs its checkpoint weights in place)
    quantizer_dependent: bool = False  # its scores change with the quantizer the plans use

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"scorer kind '{self.kind}' is not one of {list(KINDS)}")

    def load(self) -> Callable[[Any], Any]:
        module, _, function = self.entry.partition(":")
        return getattr(importlib.import_module(module), function)


# fmt: off
SCORERS: tuple[ScorerSpec, ...] = (
    ScorerSpec("nsds", "nsds", "nsds.scorers.nsds:layer_scores", "NSDS (arXiv:2603.17354), paper defaults"),
    ScorerSpec("zd", "baseline", "nsds.scorers.zd:score", "z-score outlier fraction (arXiv:2406.17415)"),
    ScorerSpec("mse", "baseline", "nsds.scorers.mse:score", "weight error at the low width with the plans' quantizer",
               quantizer_dependent=True),
    ScorerSpec("ewq", "baseline", "nsds.scorers.ewq:score", "softmax entropy of the weights (arXiv:2503.04704)"),
    ScorerSpec("kurtboost", "baseline", "nsds.scorers.kurtboost:score", "kurtosis, doubled at depth jumps "
               "(arXiv:2503.06518)"),
    ScorerSpec("lieq", "baseline", "nsds.scorers.lieq:score", "data-free LieQ: effective-rank compactness of the "
               "attention projections on one fixed sentence", needs_model=True),
    ScorerSpec("nsds-nv", "ablation", "nsds.scorers.ablations:nv_only", "NSDS's numerical aspect alone"),
    ScorerSpec("nsds-se", "ablation", "nsds.scorers.ablations:se_only", "NSDS's structural aspect alone"),
    ScorerSpec("nsds-mad1", "ablation", "nsds.scorers.ablations:mad1", "NSDS with MAD constant 1.0"),
    ScorerSpec("nsds-product", "ablation", "nsds.scorers.ablations:product", "NSDS with the noisy-OR"),
    ScorerSpec("nsds-collapsed", "ablation", "nsds.scorers.ablations:collapsed", "NSDS without roles"),
)
# fmt: on
BY_NAME = {spec.name: spec for spec in SCORERS}
GROUPS = {
    "all": [s.name for s in SCORERS],
    "baselines": [s.name for s in SCORERS if s.kind == "baseline"],
    "ablations": [s.name for s in SCORERS if s.kind == "ablation"],
}


def get_scorers(names: list[str]) -> list[ScorerSpec]:
    """Specs by name; 'all' expands to every one, 'baselines' to the literature's, 'ablations' to NSDS's."""
    chosen: list[str] = []
    for name in names:
        for one in GROUPS.get(name, [name]):
            if one not in BY_NAME:
                choices = ", ".join([*BY_NAME, *GROUPS])
                raise NsdsError(f"unknown scorer '{one}'; choose from {choices}")
            if one not in chosen:
                chosen.append(one)
    if not chosen:
        raise NsdsError(f"give at least one scorer, e.g. --scorers nsds or all ({', '.join(BY_NAME)})")
    return [BY_NAME[name] for name in chosen]
