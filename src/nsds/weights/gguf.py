"""A GGUF file: one tensor dequantized at a time (by the `gguf` package), under Hugging Face names.

GGUF names are mapped to the Hugging Face names of the architecture with gguf-py's own name table,
and the two layout changes llama.cpp's converter makes are undone exactly as transformers undoes them
when it loads a GGUF: Llama's rotary permutation of q/k rows, and GPT-2's Conv1D transposes.

The header is read by a small parser of our own: gguf.GGUFReader turns every tokenizer entry into
NumPy objects (8 s and ~500 MB for Gemma-3's 262k-token vocabulary) although scoring needs only a
dozen scalars and the tensor table. The config is built from those scalars.
"""

import math
import struct
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
from transformers import AutoConfig, PretrainedConfig

from nsds.arch import family_of, geometry
from nsds.errors import NsdsError, first_line
from nsds.weights.base import WeightSource, build_config

_ARCH_BY_NAME = {name: arch for arch, name in gguf.MODEL_ARCH_NAMES.items()}
# GGUF architectures whose llama.cpp layout nsds knows how to undo, and their transformers model_type.
MODEL_TYPES = {
    "llama": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma2": "gemma2",
    "gemma3": "gemma3_text",
    "phi3": "phi3",
    "gpt2": "gpt2",
}
_GPT2_CONV1D = ("attn_qkv.weight", "attn_output.weight", "ffn_up.weight", "ffn_down.weight")
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
class _Tensor:
    qtype: gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # NumPy order: (rows, columns)
    start: int
    nbytes: int


class _Header:
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
        for _ in range(kv_count):
            key, offset = self._string(offset)
            (value_type,) = self._unpack("<I", offset)
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
        self.tensors: dict[str, _Tensor] = {}
        for name, qtype, shape, relative in table:
            block, type_size = gguf.GGML_QUANT_SIZES[qtype]
            nbytes = math.prod(shape) * type_size // block
            if data_start + relative + nbytes > len(self.data):
                raise ValueError(f"tensor '{name}' runs past the end of the file")
            self.tensors[name] = _Tensor(qtype, shape, data_start + relative, nbytes)

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

    def array(self, tensor: _Tensor) -> np.ndarray:
        """The tensor's raw data as gguf.quants.dequantize expects it (quantized rows as bytes)."""
        raw = self.data[tensor.start : tensor.start + tensor.nbytes]
        if tensor.qtype in _PLAIN:
            return raw.view(_PLAIN[tensor.qtype]).reshape(tensor.shape)
        return raw.reshape(gguf.quant_shape_to_byte_shape(tensor.shape, tensor.qtype))


def _reverse_rotary_permutation(weights: np.ndarray, heads: int) -> np.ndarray:
    """Undo convert_hf_to_gguf's per-head interleave of Llama q/k rows."""
    half = weights.shape[0] // heads // 2
    return weights.reshape(heads, half, 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def _dequantize_rows(data: np.ndarray, qtype: gguf.GGMLQuantizationType, chunk_bytes: int = 64 << 20) -> np.ndarray:
    """Dequantize to float32 a block of rows at a time: gguf's NumPy kernels build temporaries several
    times their input's size, which for a large embedding would double the peak memory."""
    if data.ndim < 2 or data.nbytes <= chunk_bytes:
        return np.array(gguf.quants.dequantize(data, qtype), dtype=np.float32)
    rows = max(1, data.shape[0] * chunk_bytes // data.nbytes)
    first = np.asarray(gguf.quants.dequantize(data[:rows], qtype), dtype=np.float32)
    out = np.empty((data.shape[0], *first.shape[1:]), dtype=np.float32)
    out[:rows] = first
    for start in range(rows, data.shape[0], rows):
        out[start : start + rows] = gguf.quants.dequantize(data[start : start + rows], qtype)
    return out


class GGUFSource(WeightSource):
    """Tensors of one GGUF file, dequantized to float32 on demand."""

    kind = "gguf"

    def __init__(self, path: Path, model_id: str | None = None) -> None:
        self.path = self.location = Path(path)
        self.files = [self.path]
        try:
            self._header = _Header(self.path)
        except (OSError, ValueError, struct.error, KeyError, OverflowError, MemoryError) as err:
            # ValueError covers UnicodeDecodeError and unknown enum values
            raise NsdsError(f"cannot read GGUF file '{self.path}': {first_line(err)} (corrupt or truncated?)") from None
        self.arch = str(self._header.metadata.get("general.architecture"))
        self.config = self._config()
        self.family = family_of(self.config.model_type)
        try:
            geometry(self.config)
        except NsdsError as err:
            raise NsdsError(f"{err} (in the metadata of '{self.path}')") from None
        self.model_id = model_id or str(self._header.metadata.get("general.name") or self.path.name)
        self._gguf_name = self._name_map()

    def _config(self) -> PretrainedConfig:
        """A transformers config with the geometry the GGUF metadata states."""
        if self.arch not in MODEL_TYPES:
            raise NsdsError(
                f"unsupported GGUF architecture '{self.arch}' in '{self.path}'; supported: {', '.join(MODEL_TYPES)}"
            )

        def meta(key: str) -> object:
            return self._header.metadata.get(f"{self.arch}.{key}")

        heads, hidden, layers = meta("attention.head_count"), meta("embedding_length"), meta("block_count")
        if not all(isinstance(v, int) and v > 0 for v in (heads, hidden, layers)):
            raise NsdsError(f"'{self.path}' lacks the {self.arch}.block_count/embedding_length/head_count metadata")
        embedding = self._header.tensors.get("token_embd.weight")
        settings = {
            "num_hidden_layers": layers,
            "hidden_size": hidden,
            "num_attention_heads": heads,
            "num_key_value_heads": meta("attention.head_count_kv") or heads,
            "head_dim": meta("attention.key_length") or hidden // heads,
            "intermediate_size": meta("feed_forward_length"),
            "vocab_size": meta("vocab_size") or (embedding.shape[0] if embedding else None),
            "max_position_embeddings": meta("context_length"),
            "tie_word_embeddings": "output.weight" not in self._header.tensors,
        }
        settings = {k: v for k, v in settings.items() if v is not None}
        return build_config(
            lambda: AutoConfig.for_model(MODEL_TYPES[self.arch], **settings),
            f"built from the metadata of '{self.path}'",
        )

    def _name_map(self) -> dict[str, str]:
        """HF name -> GGUF name, for every tensor nsds may ask for."""
        fam, layers = self.family, self.config.num_hidden_layers
        if layers > len(self._header.tensors):  # gguf's name table has entries for every block: bound it
            raise NsdsError(
                f"'{self.path}' states {layers} blocks but holds only {len(self._header.tensors)} tensors "
                "(corrupt metadata?)"
            )
        table = gguf.get_tensor_name_map(_ARCH_BY_NAME[self.arch], layers)
        wanted = [fam.body + fam.embedding, fam.unembedding] + [
            f"{fam.body}{fam.layers}.{i}.{rel}" for i in range(layers) for rel in fam.layer_tensors()
        ]
        found = {}
        for hf_name in wanted:
            name = table.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if name in self._header.tensors:
                found[hf_name] = name
        return found

    def names(self) -> set[str]:
        return set(self._gguf_name)

    def shape(self, name: str) -> tuple[int, ...]:
        gguf_name = self._gguf_name[name]
        shape = self._header.tensors[gguf_name].shape
        return shape[::-1] if self.arch == "gpt2" and gguf_name.endswith(_GPT2_CONV1D) else shape

    def tensor(self, name: str) -> torch.Tensor:
        gguf_name = self._gguf_name[name]
        entry = self._header.tensors[gguf_name]
        try:
            weights = _dequantize_rows(self._header.array(entry), entry.qtype)
        except (ValueError, NotImplementedError) as err:
            raise NsdsError(f"cannot dequantize '{gguf_name}' ({entry.qtype.name}): {err}") from None
        if self.arch == "llama" and gguf_name.endswith(("attn_q.weight", "attn_k.weight")):
            key = "num_attention_heads" if "attn_q" in gguf_name else "num_key_value_heads"
            heads = getattr(self.config, key)
            if weights.shape[0] % (2 * heads):
                raise NsdsError(
                    f"'{gguf_name}' in '{self.path}' has {weights.shape[0]} rows, which do not split into the "
                    f"{heads} heads its metadata states (corrupt file?)"
                )
            weights = _reverse_rotary_permutation(weights, heads)
        if self.arch == "gpt2" and gguf_name.endswith(_GPT2_CONV1D):
            weights = weights.T
        return torch.from_numpy(np.ascontiguousarray(weights))
