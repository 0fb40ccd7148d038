"""The settings of `nsds run` and `nsds compare`: one typed object per command, passed everywhere and
stored in its results."""

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from nsds.documents import build, plain
from nsds.plan import Width

DEFAULT_MODEL = "smollm2"
# The options that take one of a few names; the registries they name (nsds.quantize.QUANTIZERS,
# nsds.allocate.ALLOCATORS) hold the same names, in this order (tests/unit/test_cli.py checks it).
QuantizerName = Literal["rtn", "hqq", "gguf", "ct"]
AllocatorName = Literal["auto", "error", "topk", "budget", "fisher", "higgs", "uniform", "llama.cpp"]
BudgetCounts = Literal["weights", "storage"]


@dataclass(frozen=True)
class RunConfig:
    model: str = DEFAULT_MODEL
    gguf_file: str | None = None
    budget: float | str = 3.0  # bits per weight, or (quantizer gguf) a llama.cpp preset whose size to match
    widths: tuple[Width, ...] | None = None  # None: the quantizer's (rtn/hqq 2,4; gguf the k-quants 2,3,4,5,6,8)
    quantizer: QuantizerName = "rtn"
    group_size: int | None = None  # None: the quantizer's default (128; GGUF types fix their own blocks)
    allocator: AllocatorName = "auto"  # auto: nsds's default (error); results store the one used
    baselines: tuple[str, ...] = ("uniform",)  # plans evaluated beside nsds's (pipeline.BASELINES), or "all"
    symmetric: bool = False
    fuse: bool = True  # q/k/v and gate/up share a width, as fused runtimes need
    per_expert: bool = False  # each MoE expert its own width (nsds's own evaluation; not llama.cpp/fused kernels)
    budget_counts: BudgetCounts | None = None  # None: the quantizer's default (weights for rtn/hqq, storage for gguf)
    text: str = "brown"
    tokens: int = 8192
    window: int | None = None
    tasks: tuple[str, ...] = ()
    task_limit: int | None = None
    out: Path = Path("nsds-run")
    save: Path | None = None
    export: bool = False  # quantizer gguf: also write OUT/model.gguf, OUT/tensor-types.txt, OUT/imatrix.gguf
    imatrix: str | None = None  # self, none or a file; None: the quantizer's default (gguf: self, else none)
    imatrix_tokens: int = 8192  # tokens of its own text the model writes for a self-made importance matrix
    device: str = "auto"

    def to_dict(self) -> dict[str, Any]:
        return plain(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunConfig":
        return build(cls, data)


@dataclass(frozen=True)
class CompareConfig:
    model: str = DEFAULT_MODEL
    gguf_file: str | None = None
    budgets: tuple[float | str, ...] = (2.5, 3.0, 3.5)  # bits, or (quantizer gguf) llama.cpp presets
    widths: tuple[Width, ...] = (2, 4)
    quantizers: tuple[QuantizerName, ...] = ("rtn", "hqq")
    scorers: tuple[str, ...] = ("all",)
    seeds: int = 5
    group_size: int | None = None
    symmetric: bool = False
    fuse: bool = True
    per_expert: bool = False
    text: str = "brown"
    tokens: int = 2048
    window: int | None = None
    out: Path = Path("nsds-compare")
    device: str = "auto"

    def to_dict(self) -> dict[str, Any]:
        return plain(self)
