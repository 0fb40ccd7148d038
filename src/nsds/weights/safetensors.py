"""A Hugging Face folder of safetensors (one file or shards with an index), memory-mapped."""

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig

from nsds.arch import SUPPORTED_MODEL_TYPES, family_of, geometry
from nsds.errors import NsdsError, first_line
from nsds.weights.base import WeightSource, build_config

INDEX = "model.safetensors.index.json"


def read_config(folder: Path):
    """The folder's transformers config, after checking nsds supports its model_type and geometry."""
    path = folder / "config.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise NsdsError(f"'{folder}' has no config.json: not a Hugging Face model folder") from None
    except (OSError, ValueError) as err:
        raise NsdsError(f"cannot read '{path}': {first_line(err)}") from None
    if not isinstance(raw, dict):
        raise NsdsError(f"'{path}' holds a JSON {type(raw).__name__}, not an object: not a transformers config.json")
    model_type = raw.get("model_type")
    if not model_type:
        raise NsdsError(
            f"'{path}' has no model_type, so its architecture is unknown; supported model types: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    family_of(str(model_type))
    quantization = raw.get("quantization_config")
    if quantization is not None and not isinstance(quantization, dict):
        raise NsdsError(f"'{path}' has a quantization_config that is not a JSON object")
    method = (quantization or {}).get("quant_method")
    if method:
        raise NsdsError(
            f"'{folder}' is already quantized ({method}); nsds scores full-precision weights: "
            "point it at the original checkpoint"
        )
    config = build_config(lambda: AutoConfig.from_pretrained(folder), f"in '{path}'")
    try:
        geometry(config)  # heads, layers and widths that make sense, checked before any weight is read
    except NsdsError as err:
        raise NsdsError(f"{err} (in '{path}')") from None
    return config


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
                weight_map = json.loads(index.read_text(encoding="utf-8"))
            except (OSError, ValueError) as err:
                raise NsdsError(f"cannot read '{index}': {first_line(err)}") from None
            weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
            if not isinstance(weight_map, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
            ):
                raise NsdsError(
                    f"'{index}' is not a safetensors index: it needs a \"weight_map\" object of tensor name -> file"
                )
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
                raise NsdsError(
                    f"cannot read '{self.folder / file}': {first_line(err)} (corrupt or truncated file?)"
                ) from None
        return self._handles[file]

    def names(self) -> set[str]:
        return set(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        try:
            return tuple(self._open(self._where[name]).get_slice(name).get_shape())
        except SafetensorError as err:
            raise NsdsError(f"cannot read tensor '{name}' from '{self._where[name]}': {first_line(err)}") from None

    def tensor(self, name: str) -> torch.Tensor:
        try:
            return self._open(self._where[name]).get_tensor(name)
        except SafetensorError as err:
            raise NsdsError(f"cannot read tensor '{name}' from '{self._where[name]}': {first_line(err)}") from None

    def part(self, name: str, index: int) -> torch.Tensor:
        try:
            return self._open(self._where[name]).get_slice(name)[index]
        except SafetensorError as err:
            raise NsdsError(f"cannot read tensor '{name}' from '{self._where[name]}': {first_line(err)}") from None

    def close(self) -> None:
        self._handles.clear()
