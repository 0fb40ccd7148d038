"""An in-memory transformers model as a weight source (e.g. to score the model one is evaluating)."""

from pathlib import Path

import torch

from nsds.arch import family_of
from nsds.weights.base import WeightSource


class ModuleSource(WeightSource):
    """The parameters of a loaded PreTrainedModel, read straight from its state dict."""

    kind = "module"

    def __init__(self, model: torch.nn.Module, model_id: str | None = None, files: list[Path] | None = None) -> None:
        self.config = model.config
        family_of(self.config.model_type)
        self.model_id = model_id or getattr(self.config, "_name_or_path", "") or type(model).__name__
        self.files = list(files or [])  # the files it was loaded from, for provenance
        self.location = None
        self._state = model.state_dict()

    def names(self) -> set[str]:
        return set(self._state)

    def tensor(self, name: str) -> torch.Tensor:
        return self._state[name].detach()

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._state[name].shape)
