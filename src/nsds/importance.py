"""Importance matrices: for every matrix a decoder multiplies, the sum over tokens of each input channel's
square and the token count (per expert for MoE), llama.cpp's `imatrix` (docs/GGUF.md §5).

llama-quantize --imatrix rounds every block to minimise the error weighted by the mean of x_j^2, which is
worth more than any choice of types. The data-free default makes one from the model's own text: the model
writes `tokens` tokens (nsds.selftext) and llama-imatrix accumulates the statistics on that text. No text is
read. A user's own matrix (made by llama-imatrix on any text, in its
GGUF or legacy .dat format) is read the same way. Both are read exactly as llama-quantize reads them, so the
weights nsds quantizes in process are the ones llama-quantize writes.
"""

import hashlib
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch

from nsds import gguf_tools, selftext
from nsds.errors import NsdsError, first_line
from nsds.files import cache_dir, copy_file, sha256_file
from nsds.gguf_header import GGUFHeader
from nsds.progress import note, stage
from nsds.selftext import LENGTH

DEFAULT_TOKENS = 8192  # 16 sequences of selftext.LENGTH; the sample's size is studied in docs/GGUF.md §5
SUFFIX = ".imatrix.gguf"
_METADATA = ("imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size")


@dataclass(frozen=True)
class ImportanceMatrix:
    """An importance matrix as llama-quantize reads it: per tensor, the sums of x_j^2 (matrices x columns,
    one matrix per expert) and the token counts (one per matrix)."""

    path: Path
    sums: dict[str, np.ndarray]
    counts: dict[str, np.ndarray]
    legacy: bool  # the .dat format: sums already divided by the tokens and multiplied by the calls

    @property
    def digest(self) -> str:
        return sha256_file(self.path)

    def weights(self, tensor: str) -> np.ndarray:
        """The tensor's quantization weights (matrices x columns, float32): sums / counts as llama-quantize
        computes them (1 where a matrix saw no token; legacy: sums / calls)."""
        sums, counts = self.sums[tensor], self.counts[tensor]
        if self.legacy:
            return sums / np.float32(counts[0]) if counts[0] > 0 else sums.copy()
        out = np.ones_like(sums)
        seen = counts > 0
        out[seen] = sums[seen] / counts[seen, None].astype(np.float32)
        return out

    def for_modules(self, tensors: Mapping[str, str], columns: Mapping[str, int]) -> dict[str, torch.Tensor]:
        """Module name -> its quantization weights (one per input column), for modules stored as one 2-D
        tensor each (`tensors`: module -> GGUF tensor name, `columns`: module -> in_features). A matrix made
        for another model is a one-line error."""
        out = {}
        for module, tensor in tensors.items():
            if tensor not in self.sums:
                raise NsdsError(f"the importance matrix '{self.path.name}' has no entry for {tensor} ({module}): "
                                "it was made for another model; make one for this model or leave it out")  # fmt: skip
            weights = self.weights(tensor)
            if weights.shape != (1, columns[module]):
                raise NsdsError(f"the importance matrix '{self.path.name}' holds {weights.size} values for {tensor}, "
                                f"whose rows have {columns[module]}: it was made for another model")  # fmt: skip
            out[module] = torch.from_numpy(weights[0])
        return out


def read(path: Path) -> ImportanceMatrix:
    """An importance matrix file (llama-imatrix's GGUF format, or its legacy .dat), or a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise NsdsError(f"importance matrix '{path}' does not exist")
    try:
        with path.open("rb") as handle:
            is_gguf = struct.unpack("<I", handle.read(4) or b"\0\0\0\0")[0] == gguf.GGUF_MAGIC
        return _read_gguf(path) if is_gguf else _read_legacy(path)
    except (OSError, ValueError, KeyError, struct.error, OverflowError, UnicodeDecodeError) as err:
        raise NsdsError(f"'{path}' is not an importance matrix llama-quantize reads (llama-imatrix's GGUF or .dat "
                        f"format): {first_line(err)}") from None  # fmt: skip


def _read_gguf(path: Path) -> ImportanceMatrix:
    header = GGUFHeader(path)
    missing = [key for key in _METADATA if key not in header.metadata]
    if missing:
        raise ValueError(f"it has no {missing[0]} (llama-quantize refuses an imatrix GGUF without its metadata)")
    parts: dict[str, dict[str, np.ndarray]] = {}
    for name, tensor in header.tensors.items():
        for suffix in (".in_sum2", ".counts"):
            if name.endswith(suffix):
                if tensor.qtype != gguf.GGMLQuantizationType.F32:
                    raise ValueError(f"'{name}' is {tensor.qtype.name}, not F32")
                parts.setdefault(name.removesuffix(suffix), {})[suffix] = np.array(header.array(tensor))
    if not parts:
        raise ValueError("it holds no .in_sum2 / .counts tensors")
    sums, counts = {}, {}
    for name, found in parts.items():
        if len(found) != 2:
            raise ValueError(f"'{name}' has sums without counts or counts without sums")
        matrices = found[".counts"].size
        if matrices < 1 or found[".in_sum2"].size % matrices:
            raise ValueError(f"'{name}' has {found['.in_sum2'].size} sums for {matrices} counts")
        sums[name] = found[".in_sum2"].reshape(matrices, -1).astype(np.float32)
        counts[name] = np.rint(found[".counts"].reshape(-1)).astype(np.int64)
    return ImportanceMatrix(path, sums, counts, legacy=False)


def _read_legacy(path: Path) -> ImportanceMatrix:
    data = path.read_bytes()
    (entries,), offset = struct.unpack_from("<i", data, 0), 4
    if entries < 1:
        raise ValueError("no entries")
    sums, counts = {}, {}
    for _ in range(entries):
        (length,) = struct.unpack_from("<i", data, offset)
        if length < 1 or offset + 4 + length > len(data):
            raise ValueError("an entry's name runs past the end of the file")
        name = data[offset + 4 : offset + 4 + length].decode("utf-8")
        calls, values = struct.unpack_from("<ii", data, offset + 4 + length)
        offset += 12 + length
        if values < 1 or offset + 4 * values > len(data):
            raise ValueError(f"'{name}' has {values} values, more than the file holds")
        sums[name] = np.frombuffer(data, np.float32, values, offset).reshape(1, values).copy()
        counts[name] = np.array([calls], dtype=np.int64)
        offset += 4 * values
    return ImportanceMatrix(path, sums, counts, legacy=True)


# ------------------------------------------------------------------------------------- from the model's text


def settings(tokens: int) -> dict[str, object]:
    """What a self-made matrix depends on besides the model file: the sample and the llama.cpp build."""
    own = selftext.settings(tokens // LENGTH)
    return {"tokens": tokens, **{k: v for k, v in own.items() if k != "sequences"}}


def check_tokens(tokens: int) -> int:
    """The sample's size must be at least two sequences (llama-imatrix needs two chunks)."""
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 2 * LENGTH:
        raise NsdsError(f"the model's own text must be at least {2 * LENGTH} tokens (two sequences of {LENGTH}), "
                        f"got {tokens!r}")  # fmt: skip
    return tokens


def self_made(base: Path, tokens: int = DEFAULT_TOKENS) -> ImportanceMatrix:
    """The importance matrix of `base` (a GGUF file) on `tokens` tokens of text it wrote itself (nsds.selftext),
    kept in the nsds cache (keyed by the file's SHA-256 and the settings) with the text beside it."""
    tokens = check_tokens(tokens)
    key = {"model": sha256_file(base), **settings(tokens)}
    digest = hashlib.sha256(repr(sorted(key.items())).encode()).hexdigest()[:20]
    target = cache_dir() / "imatrix" / f"{digest}{SUFFIX}"
    if target.is_file():
        try:
            found = read(target)
            stage(f"importance matrix of the model's own text: from the nsds cache ({target.name})")
            return found
        except NsdsError as err:  # a damaged entry is only lost work
            note(f"{first_line(err)}; making the importance matrix again")
    sequences = tokens // LENGTH
    text = selftext.text_file(base, sequences, target.with_suffix("").with_suffix(".txt"))
    stage(f"importance matrix on that text (llama-imatrix, {sequences} chunks of {LENGTH})")
    gguf_tools.make_imatrix(base, text, target, LENGTH, sequences)
    return read(target)


def flat(base: Path, target: Path) -> Path:
    """A flat importance matrix for every matrix of `base` (each channel 1, one token): what llama.cpp's
    preset rules see when a matrix is present, for sizing a preset before the real one is made."""
    writer = gguf.GGUFWriter(target, arch="imatrix")
    writer.add_array(_METADATA[0], ["flat"])
    writer.add_uint32(_METADATA[1], 1)
    writer.add_uint32(_METADATA[2], 1)
    for name, tensor in GGUFHeader(base).tensors.items():
        if len(tensor.shape) >= 2:
            matrices = math.prod(tensor.shape[:-2]) if len(tensor.shape) > 2 else 1
            writer.add_tensor(f"{name}.in_sum2", np.ones((matrices, tensor.shape[-1]), dtype=np.float32))
            writer.add_tensor(f"{name}.counts", np.ones(matrices, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target


def keep_beside(matrix: ImportanceMatrix, target: Path) -> None:
    """Copy the matrix file to `target` (the export's imatrix.gguf) atomically."""
    copy_file(matrix.path, target)
