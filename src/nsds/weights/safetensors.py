"""A Hugging Face folder of safetensors (one file or shards with an index).

Headers (names, shapes) come from safetensors' memory maps; tensor data is read with pread into memory
the caller owns. Reading through the map instead would leave every page read mapped, and counted in the
process's RSS, until the file is closed: the whole checkpoint by the end of a scoring run.
"""

import json
import math
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig

from nsds.arch import SUPPORTED_MODEL_TYPES, family_of, geometry
from nsds.errors import NsdsError, first_line
from nsds.weights.base import WeightSource, build_config

INDEX = "model.safetensors.index.json"
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip


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
        self._spans: dict[str, dict[str, tuple[str, tuple[int, ...], int]]] = {}  # file -> name -> where
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
        dtype, shape, _ = self._span(name)
        return self._read(name, 0, math.prod(shape)).view(dtype).reshape(shape)

    def row_blocks(self, name: str, rows: int) -> Iterator[torch.Tensor]:
        """Only each block's bytes are read: rows are contiguous in a safetensors file."""
        dtype, shape, _ = self._span(name)
        row = math.prod(shape[1:])
        for start in range(0, shape[0], rows):
            count = min(rows, shape[0] - start)
            yield self._read(name, start * row, count * row).view(dtype).reshape(count, *shape[1:])

    def _span(self, name: str) -> tuple[torch.dtype, tuple[int, ...], int]:
        """A tensor's dtype, shape and the file offset of its data, from its file's header."""
        file = self._where[name]
        if file not in self._spans:
            self._open(file)  # safetensors checks the header and the file's length
            with open(self.folder / file, "rb") as f:
                (size,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(size))
            header.pop("__metadata__", None)
            self._spans[file] = {
                key: (entry["dtype"], tuple(entry["shape"]), 8 + size + entry["data_offsets"][0])
                for key, entry in header.items()
            }
        if name not in self._spans[file]:
            raise NsdsError(f"cannot read tensor '{name}' from '{file}': the file does not hold it")
        kind, shape, offset = self._spans[file][name]
        if kind not in _DTYPES:
            raise NsdsError(f"tensor '{name}' in '{file}' has dtype {kind}, which nsds cannot read")
        return _DTYPES[kind], shape, offset

    def _read(self, name: str, first: int, count: int) -> torch.Tensor:
        """Elements first..first+count of a tensor, as bytes read from its file."""
        dtype, _, offset = self._span(name)
        size = torch.empty((), dtype=dtype).element_size()
        out = torch.empty(count * size, dtype=torch.uint8)
        view, done = memoryview(out.numpy()), 0
        fd = os.open(self.folder / self._where[name], os.O_RDONLY)
        try:
            while done < len(view):  # one read returns at most ~2 GiB on Linux
                got = os.preadv(fd, [view[done:]], offset + first * size + done)
                if got == 0:
                    raise NsdsError(f"'{self._where[name]}' ends inside tensor '{name}' (truncated file?)")
                done += got
        finally:
            os.close(fd)
        return out

    def part(self, name: str, index: int) -> torch.Tensor:
        try:
            return self._open(self._where[name]).get_slice(name)[index]
        except SafetensorError as err:
            raise NsdsError(f"cannot read tensor '{name}' from '{self._where[name]}': {first_line(err)}") from None

    def close(self) -> None:
        self._handles.clear()
        self._spans.clear()
