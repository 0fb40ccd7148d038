"""Tensors that wait on disk instead of in memory: the hidden states of the Fisher step's forward pass and the
reference's log-probabilities, which grow with the model's depth or vocabulary."""

import os
from pathlib import Path

import torch


class RowFile:
    """`rows` tensors of one `shape` and `dtype` in a file, written and read by position with pwrite/pread. Not
    a memory map: written pages stay in the kernel's page cache, which it can drop or write back at will, and
    never count in the process's resident memory, so the process's peak does not grow with the file."""

    def __init__(self, path: Path, rows: int, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        self.path, self.rows, self.shape, self.dtype = Path(path), rows, shape, dtype
        self.row_bytes = torch.Size(shape).numel() * dtype.itemsize
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)

    def write(self, row: int, tensor: torch.Tensor) -> None:
        """Row `row` becomes `tensor` (of the file's shape; cast to its dtype)."""
        if not 0 <= row < self.rows or tuple(tensor.shape) != self.shape:
            raise IndexError(f"row {row} of shape {tuple(tensor.shape)} does not fit {self.rows} rows of {self.shape}")
        data = tensor.detach().to("cpu", self.dtype).contiguous().view(torch.uint8).numpy()
        written = os.pwrite(self._fd, data, row * self.row_bytes)
        if written != self.row_bytes:
            raise OSError(f"short write to {self.path}: {written} of {self.row_bytes} bytes (disk full?)")

    def read(self, row: int) -> torch.Tensor:
        """Row `row`, as a new tensor."""
        if not 0 <= row < self.rows:
            raise IndexError(f"row {row} of {self.rows}")
        buffer = bytearray(self.row_bytes)
        if os.preadv(self._fd, [buffer], row * self.row_bytes) != self.row_bytes:
            raise OSError(f"row {row} of {self.path} was never written")
        return torch.frombuffer(buffer, dtype=self.dtype).view(self.shape)

    def close(self) -> None:
        """Close and delete the file."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self.path.unlink(missing_ok=True)
