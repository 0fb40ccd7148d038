"""The weight-source interface: named tensors, read one at a time, in Hugging Face names and layouts."""

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from nsds.errors import NsdsError, first_line
from nsds.files import sha256_file


class WeightSource(ABC):
    """A model's tensors under their Hugging Face names, plus its transformers config.

    Sources never load the whole model: `tensor` reads (and for GGUF dequantizes) one tensor on demand.
    """

    kind: str
    config: Any  # transformers.PretrainedConfig
    model_id: str
    files: list[Path]
    location: Path | None  # what transformers would load: the model folder or the GGUF file

    @abstractmethod
    def names(self) -> set[str]:
        """Every tensor name this source can return."""

    @abstractmethod
    def tensor(self, name: str) -> torch.Tensor:
        """One tensor in nn.Module layout and the checkpoint's floating dtype (GGUF: dequantized float32)."""

    def part(self, name: str, index: int) -> torch.Tensor:
        """tensor[index] of a stacked tensor (one expert of a 3-D expert tensor); sources that can read it
        alone do, so scoring a MoE layer never holds all its experts."""
        return self.tensor(name)[index]

    def shape(self, name: str) -> tuple[int, ...]:
        """A tensor's shape in nn.Module layout; sources that have a header read it without the data."""
        return tuple(self.tensor(name).shape)

    def row_blocks(self, name: str, rows: int) -> Iterator[torch.Tensor]:
        """A tensor's rows, `rows` at a time. Sources that can read a range of rows read only it, so a sum
        over the blocks (W_U's Gram) never holds the whole tensor; the others slice the whole one."""
        tensor = self.tensor(name)
        for start in range(0, tensor.shape[0], rows):
            yield tensor[start : start + rows]

    def provenance(self) -> dict[str, Any]:
        """Where the weights came from, with a SHA-256 per file, for the score report."""
        return {
            "id": self.model_id,
            "source": self.kind,
            "files": [{"name": f.name, "bytes": f.stat().st_size, "sha256": sha256_file(f)} for f in self.files],
        }

    def close(self) -> None:  # noqa: B027 - sources without handles need no cleanup
        """Release file handles."""

    def __enter__(self) -> "WeightSource":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def weights_identity(provenance: dict[str, Any]) -> list[str] | str:
    """What names a model's weights in cache keys: its files' SHA-256 (the id for a source without files)."""
    return [f["sha256"] for f in provenance["files"]] or provenance["id"]


def build_config(build: Callable[[], Any], where: str) -> Any:
    """Run `build` (a transformers config constructor) with whatever it raises as one line.

    transformers validates configs with strict dataclasses and per-model validators, which raise
    StrictDataclass*Error, ValueError, TypeError or even ZeroDivisionError for a bad value: any of them
    means the config is unusable.
    """
    try:
        return build()
    except Exception as err:  # see above: no narrower type covers what the validators raise
        raise NsdsError(f"transformers rejects the config {where}: {first_line(err)}") from None
