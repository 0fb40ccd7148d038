"""A Hugging Face folder of safetensors (one file or shards with an index), memory-mapped."""

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig

from nsds.arch import family_of
from nsds.errors import NsdsError
from nsds.weights.base import WeightSource

INDEX = "model.safetensors.index.json"


def read_config(folder: Path):
    """The folder's transformers config, after checking nsds supports its model_type."""
    path = folder / "config.json"
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise NsdsError(f"'{folder}' has no config.json: not a Hugging Face model folder") from None
    except (OSError, ValueError) as err:
        raise NsdsError(f"cannot read '{path}': {err}") from None
    family_of(str(raw.get("model_type")))
    method = (raw.get("quantization_config") or {}).get("quant_method")
    if method:
        raise NsdsError(
            f"'{folder}' is already quantized ({method}); nsds scores full-precision weights: "
            "point it at the original checkpoint"
        )
    try:
        return AutoConfig.from_pretrained(folder)
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise NsdsError(f"cannot load the config in '{folder}': {err}") from None


class SafetensorsSource(WeightSource):
    """Tensors of a safetensors checkpoint folder, read through the files' memory maps."""

    kind = "safetensors"

    def __init__(self, folder: Path, model_id: str | None = None) -> None:
        self.folder = self.location = Path(folder)
        self.config = read_config(self.folder)
        self.model_id = model_id or str(self.folder)
        self._handles: dict[str, object] = {}
        self._where = self._index()
        self.files = sorted({self.folder / f for f in self._where.values()})

    def _index(self) -> dict[str, str]:
        index = self.folder / INDEX
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError) as err:
                raise NsdsError(f"cannot read '{index}': {err}") from None
            missing = sorted({f for f in weight_map.values() if not (self.folder / f).exists()})
            if missing:
                raise NsdsError(f"'{index}' lists missing shard(s): {', '.join(missing)}")
            return dict(weight_map)
        shards = sorted(self.folder.glob("*.safetensors"))
        if not shards:
            raise NsdsError(f"'{self.folder}' has a config.json but no .safetensors weights")
        where: dict[str, str] = {}
        for shard in shards:
            where.update(dict.fromkeys(self._open(shard.name).keys(), shard.name))
        return where

    def _open(self, file: str):
        if file not in self._handles:
            try:
                self._handles[file] = safe_open(self.folder / file, framework="pt")
            except (SafetensorError, OSError, ValueError) as err:
                raise NsdsError(f"cannot read '{self.folder / file}': {err} (corrupt or truncated file?)") from None
        return self._handles[file]

    def names(self) -> set[str]:
        return set(self._where)

    def tensor(self, name: str) -> torch.Tensor:
        try:
            return self._open(self._where[name]).get_tensor(name)
        except SafetensorError as err:
            raise NsdsError(f"cannot read tensor '{name}' from '{self._where[name]}': {err}") from None

    def close(self) -> None:
        self._handles.clear()
