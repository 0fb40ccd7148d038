"""A GGUF file's header, read by a small parser of our own: scalar metadata and the tensor table.

gguf.GGUFReader turns every tokenizer entry into NumPy objects (8 s and ~500 MB for Gemma-3's 262k-token
vocabulary; 2.6 s for SmolLM2's 49k) although nsds needs only a dozen scalars and the tensor table. The
weight source reads tensors through it; the llama.cpp runners read the types llama-quantize wrote.
"""

import math
import struct
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

_V = gguf.GGUFValueType
_SCALARS = {
    _V.UINT8: "B",
    _V.INT8: "b",
    _V.UINT16: "H",
    _V.INT16: "h",
    _V.UINT32: "I",
    _V.INT32: "i",
    _V.FLOAT32: "f",
    _V.BOOL: "?",
    _V.UINT64: "Q",
    _V.INT64: "q",
    _V.FLOAT64: "d",
}
_PLAIN = {
    gguf.GGMLQuantizationType.F32: np.float32,
    gguf.GGMLQuantizationType.F16: np.float16,
    gguf.GGMLQuantizationType.F64: np.float64,
}


@dataclass(frozen=True)
class GGUFTensor:
    qtype: gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # NumPy order: (rows, columns)
    start: int
    nbytes: int


class GGUFHeader:
    """Scalar metadata (arrays are skipped) and the tensor table of a little-endian GGUF v2/v3 file."""

    def __init__(self, path: Path) -> None:
        if path.stat().st_size == 0:
            raise ValueError("the file is empty")
        self.data = np.memmap(path, mode="r")
        self._buffer = memoryview(self.data)
        magic, version, tensor_count, kv_count = self._unpack("<IIQQ", 0)
        if magic != gguf.GGUF_MAGIC:
            raise ValueError("bad magic number, not a GGUF file")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} (big-endian or unknown) is not supported")
        offset = 24
        self.metadata: dict[str, object] = {}
        self._arrays: dict[str, int] = {}  # key -> offset of an array value (its item type, count, items)
        for _ in range(kv_count):
            key, offset = self._string(offset)
            (value_type,) = self._unpack("<I", offset)
            if _V(value_type) == _V.ARRAY:
                self._arrays[key] = offset + 4
            self.metadata[key], offset = self._value(_V(value_type), offset + 4)
        table = []
        for _ in range(tensor_count):
            name, offset = self._string(offset)
            (dims,) = self._unpack("<I", offset)
            shape = self._unpack(f"<{dims}Q", offset + 4)
            qtype, relative = self._unpack("<IQ", offset + 4 + 8 * dims)
            offset += 4 + 8 * dims + 12
            table.append((name, gguf.GGMLQuantizationType(qtype), tuple(reversed(shape)), relative))
        alignment = self.metadata.get("general.alignment") or 32
        if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment < 1:
            raise ValueError(f"general.alignment is {alignment!r}, not a positive integer")
        data_start = -(-offset // alignment) * alignment
        self.alignment, self.data_start = alignment, data_start
        self.tensors: dict[str, GGUFTensor] = {}
        for name, qtype, shape, relative in table:
            block, type_size = gguf.GGML_QUANT_SIZES[qtype]
            nbytes = math.prod(shape) * type_size // block
            if data_start + relative + nbytes > len(self.data):
                raise ValueError(f"tensor '{name}' runs past the end of the file")
            self.tensors[name] = GGUFTensor(qtype, shape, data_start + relative, nbytes)

    def _unpack(self, fmt: str, offset: int) -> tuple:
        return struct.unpack_from(fmt, self._buffer, offset)

    def _string(self, offset: int) -> tuple[str, int]:
        (length,) = self._unpack("<Q", offset)
        end = offset + 8 + length
        if end > len(self.data):
            raise ValueError("header runs past the end of the file")
        return bytes(self._buffer[offset + 8 : end]).decode("utf-8"), end

    def _value(self, value_type: _V, offset: int) -> tuple[object, int]:
        if value_type in _SCALARS:
            fmt = "<" + _SCALARS[value_type]
            return self._unpack(fmt, offset)[0], offset + struct.calcsize(fmt)
        if value_type == _V.STRING:
            return self._string(offset)
        if value_type == _V.ARRAY:  # skipped: nsds needs no array metadata (tokenizer tables)
            item_type, count = self._unpack("<IQ", offset)
            offset += 12
            if _V(item_type) in _SCALARS:
                return None, offset + count * struct.calcsize("<" + _SCALARS[_V(item_type)])
            for _ in range(count):
                _, offset = self._value(_V(item_type), offset)
            return None, offset
        raise ValueError(f"unknown metadata value type {value_type}")

    def string_item(self, key: str, index: int) -> str:
        """Item `index` of the string array `key` (a token's text in tokenizer.ggml.tokens)."""
        if key not in self._arrays:
            raise ValueError(f"the file has no array '{key}'")
        item_type, count = self._unpack("<IQ", self._arrays[key])
        if _V(item_type) != _V.STRING or not 0 <= index < count:
            raise ValueError(f"'{key}' has no string item {index}")
        offset = self._arrays[key] + 12
        for _ in range(index):
            (length,) = self._unpack("<Q", offset)
            offset += 8 + length
        return self._string(offset)[0]

    def array(self, tensor: GGUFTensor) -> np.ndarray:
        """The tensor's raw data as gguf.quants.dequantize expects it (quantized rows as bytes)."""
        raw = self.data[tensor.start : tensor.start + tensor.nbytes]
        if tensor.qtype in _PLAIN:
            return raw.view(_PLAIN[tensor.qtype]).reshape(tensor.shape)
        return raw.reshape(gguf.quant_shape_to_byte_shape(tensor.shape, tensor.qtype))
