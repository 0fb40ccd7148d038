"""ggml's quantization types and numerics, the ones llama-quantize writes (docs/GGUF.md §2).

The bytes and their dequantization come from llama.cpp's own ggml library (ggml_quantize_chunk and each
type's to_float, called through ctypes), never from a re-implementation: a module fake-quantized here
holds exactly the weights llama.cpp computes with after `llama-quantize`. The library is the one built
by `nsds assets fetch llama.cpp` (or a user's shared build: libggml-base.so).

The type table (block size, bytes per block) is gguf-py's, checked against the library's own at load;
`written_type` mirrors llama.cpp's fallback for rows a type's block does not divide (llama-quant.cpp,
tensor_type_fallback), which tests check against what llama-quantize really writes.
"""

import ctypes
import functools
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch

from nsds.errors import NsdsError
from nsds.llamacpp import ENV_VAR, GGML_LIBRARY_NAMES, tools

# llama.cpp's block-256 i-quants; IQ4_NL, a block-32 one, is what they fall back to.
I_QUANTS_256 = ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_XS")
# The types nsds plans with: llama.cpp's k-quants, the block-32 legacy types, and the i-quants (IQ), plus the
# unquantized ones a fallback or an embedding may end in.
QUANTIZED = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "IQ4_NL", *I_QUANTS_256)
FLOATS = ("F32", "F16", "BF16")
# The types llama-quantize writes only with an importance matrix (tensor_requires_imatrix, llama-quant.cpp).
NEEDS_IMPORTANCE = frozenset({"IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS"})

# llama.cpp's fallback when a type's block does not divide a row (tensor_type_fallback, llama-quant.cpp):
# block-256 types fall back to a block-32 type of at least their bits; block-32 types, then, to F16.
FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"} | dict.fromkeys(
    I_QUANTS_256, "IQ4_NL"
)


@dataclass(frozen=True)
class GgmlType:
    name: str
    block_size: int  # weights per block
    block_bytes: int  # bytes per block, scales included

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.block_bytes / self.block_size

    @property
    def nominal_bits(self) -> float:
        """The bits per weight its name states (Q5_1: 5), its scales aside; an i-quant's name states only its
        class, so its bits per weight, scales included, as llama.cpp lists them (IQ3_S: 3.4375)."""
        if self.name in FLOATS:
            return 32 if self.name == "F32" else 16
        return int(self.name[1]) if self.name.startswith("Q") else self.bits_per_weight


def ggml_type(name: str) -> GgmlType:
    """A ggml type by name (case-insensitive), with its block layout; a one-line error for an unknown one."""
    key = name.upper()
    if key not in QUANTIZED + FLOATS:
        raise NsdsError(f"unknown or unsupported ggml type '{name}'; nsds plans with {', '.join(QUANTIZED)}")
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[key]]
    return GgmlType(key, block, size)


def written_type(name: str, columns: int) -> str:
    """The type llama-quantize writes when asked for `name` on rows of `columns` weights."""
    target = ggml_type(name)
    if columns % target.block_size == 0:
        return target.name
    if target.name not in FALLBACK and target.block_size > 32:
        raise NsdsError(f"llama.cpp defines no fallback for {target.name} on rows of {columns}")
    fallback = FALLBACK.get(target.name, target.name)
    return fallback if columns % ggml_type(fallback).block_size == 0 else "F16"


def tensor_bytes(name: str, rows: int, columns: int) -> int:
    """Bytes of a rows x columns matrix stored as `name` (which must divide the rows)."""
    kind = ggml_type(name)
    if columns % kind.block_size:
        raise NsdsError(f"{kind.name} cannot store rows of {columns} weights (blocks of {kind.block_size})")
    return rows * columns // kind.block_size * kind.block_bytes


class _Traits(ctypes.Structure):
    # struct ggml_type_traits (ggml.h); checked against gguf-py's table on load
    _fields_ = [
        ("type_name", ctypes.c_char_p),
        ("blck_size", ctypes.c_int64),
        ("blck_size_interleave", ctypes.c_int64),
        ("type_size", ctypes.c_size_t),
        ("is_quantized", ctypes.c_bool),
        ("to_float", ctypes.c_void_p),
        ("from_float_ref", ctypes.c_void_p),
    ]


_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)


class Ggml:
    """ggml's quantize and dequantize for one shared library."""

    def __init__(self, path: Path, fix: str = "rebuild with `nsds assets fetch llama.cpp`") -> None:
        try:
            lib = ctypes.CDLL(str(path))
            lib.ggml_get_type_traits.restype = ctypes.POINTER(_Traits)
            lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
            lib.ggml_quantize_chunk.restype = ctypes.c_size_t
            lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                                ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]  # fmt: skip
            lib.ggml_quantize_init.argtypes = [ctypes.c_int]
        except (OSError, AttributeError) as err:
            raise NsdsError(f"cannot load ggml's quantizers from '{path}': {err}; {fix}") from None
        self.lib, self.path = lib, path
        for name in (*QUANTIZED, "F16"):
            traits = self._traits(name)
            kind = ggml_type(name)
            if (traits.type_name.decode().upper(), traits.blck_size, traits.type_size) != (
                kind.name, kind.block_size, kind.block_bytes,
            ):  # fmt: skip
                raise NsdsError(f"'{path}' has another ggml type table than the gguf package ({name}): versions differ")

    def _traits(self, name: str) -> _Traits:
        return self.lib.ggml_get_type_traits(int(gguf.GGMLQuantizationType[name])).contents

    def quantize(self, weights: np.ndarray, name: str, importance: np.ndarray | None = None) -> np.ndarray:
        """A float32 rows x columns matrix as the type's bytes (rows x row bytes), as llama-quantize writes
        them: with `importance` (one weight per column, what llama-quantize reads from `--imatrix`) passed
        to ggml_quantize_chunk as its quant_weights, else without; rows are split over threads (ctypes
        releases the GIL)."""
        rows, columns = weights.shape
        data = np.ascontiguousarray(weights, dtype=np.float32)
        out = np.empty((rows, tensor_bytes(name, 1, columns)), dtype=np.uint8)
        code = int(gguf.GGMLQuantizationType[name])
        weighting = None
        if importance is None and name in NEEDS_IMPORTANCE:  # ggml would abort the process
            raise NsdsError(f"{name} is written only with an importance matrix: give one (--imatrix) or drop {name}")
        if importance is not None:
            weighting = np.ascontiguousarray(importance, dtype=np.float32)
            if weighting.shape != (columns,):
                raise NsdsError(f"an importance vector of shape {list(weighting.shape)} for rows of {columns} weights")
        self.lib.ggml_quantize_init(code)

        def chunk(span: tuple[int, int]) -> None:
            start, stop = span
            self.lib.ggml_quantize_chunk(code, data[start:].ctypes.data, out[start:].ctypes.data, 0, stop - start,
                                         columns, None if weighting is None else weighting.ctypes.data)  # fmt: skip

        step = max(1, math.ceil(rows / _threads()))
        with ThreadPoolExecutor(_threads()) as pool:
            list(pool.map(chunk, [(s, min(rows, s + step)) for s in range(0, rows, step)]))
        return out

    def dequantize(self, data: np.ndarray, name: str, columns: int) -> np.ndarray:
        """The type's bytes (rows x row bytes) back to float32 rows x columns, with ggml's to_float."""
        rows = data.shape[0]
        source = np.ascontiguousarray(data)
        out = np.empty((rows, columns), dtype=np.float32)
        _TO_FLOAT(self._traits(name).to_float)(source.ctypes.data, out.ctypes.data, rows * columns)
        return out

    def fake_quantize(self, weight: torch.Tensor, name: str, importance: torch.Tensor | None = None) -> torch.Tensor:
        """`weight` (out x in) through the type and back, in its dtype: what llama.cpp computes with (with
        `importance`, one weight per input column, as llama-quantize --imatrix quantizes)."""
        if name == "F32":
            return weight.clone()
        matrix = weight.detach().to(torch.float32).cpu().numpy()
        weighting = None if importance is None else importance.detach().to(torch.float32).cpu().numpy()
        restored = self.dequantize(self.quantize(matrix, name, weighting), name, matrix.shape[1])
        return torch.from_numpy(restored).to(weight.dtype)


def _threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return os.cpu_count() or 1


@functools.cache
def _load(path: str, fix: str) -> Ggml:
    return Ggml(Path(path), fix)


def library() -> Ggml:
    """ggml from llama.cpp's build (nsds assets fetch llama.cpp, or NSDS_LLAMA_CPP)."""
    found = tools()
    if found.ggml_library is None:
        raise NsdsError(
            f"the llama.cpp build in {ENV_VAR} has no shared ggml library ({' or '.join(GGML_LIBRARY_NAMES)}): "
            "build it with -DBUILD_SHARED_LIBS=ON, or unset it and run `nsds assets fetch llama.cpp`"
        )
    fix = "rebuild with `nsds assets fetch llama.cpp`"
    if found.source == "env":
        fix = f"check the shared build {ENV_VAR} points at, or unset it and run `nsds assets fetch llama.cpp`"
    return _load(str(found.ggml_library), fix)
