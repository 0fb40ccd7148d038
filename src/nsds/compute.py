"""Where and in what precision the scorers' linear algebra runs."""

import os
from dataclasses import dataclass

import torch

from nsds.errors import NsdsError

PRECISIONS = {"float64": torch.float64, "float32": torch.float32}


@dataclass(frozen=True)
class Compute:
    """A torch device and dtype (float64 is exact to ~1e-12; float32 is meant for GPUs)."""

    device: str = "cpu"
    dtype: torch.dtype = torch.float64

    @classmethod
    def choose(cls, device: str = "auto", precision: str = "float64") -> "Compute":
        """Check the user's device and precision names before any work starts; 'auto' takes a CUDA GPU if
        torch sees one. `cuda:N` names one GPU."""
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        kind, _, index = device.partition(":")
        if kind not in ("cpu", "cuda") or (index and (kind == "cpu" or not index.isdigit())):
            raise NsdsError(f"unknown device '{device}'; use cpu, cuda, cuda:N or auto")
        if kind == "cuda":
            if not torch.cuda.is_available():
                raise NsdsError(f"--device {device} was asked for but torch sees no CUDA GPU; use --device cpu")
            if index and int(index) >= torch.cuda.device_count():
                raise NsdsError(f"no GPU '{device}': torch sees {torch.cuda.device_count()} CUDA device(s)")
        if precision not in PRECISIONS:
            raise NsdsError(f"unknown precision '{precision}' (use float64 or float32)")
        return cls(device=device, dtype=PRECISIONS[precision])

    def memory(self) -> int | None:
        """Bytes of memory on the device: the GPU's, or the machine's physical memory (None where the system
        does not say)."""
        if self.device.startswith("cuda"):
            return torch.cuda.get_device_properties(torch.device(self.device)).total_memory
        try:
            return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):  # not a POSIX system that names these
            return None
