"""Weight-only quantizers by name (a registry of classes), and the one way a plan reaches a model.

A quantizer is configured once (group size, symmetry; None: its default) and then maps a weight matrix
to its dequantized self at any of its widths, and prices its storage. `WeightBank` puts any assignment
of widths or storage formats (a Plan, or one layer at the low width for the oracle) into a loaded model
from pristine copies of its weights.
"""

from collections.abc import Collection, Iterable, Sequence

from nsds.errors import NsdsError
from nsds.plan import Module
from nsds.quantize.bank import WeightBank
from nsds.quantize.base import Quantizer
from nsds.quantize.ct import CompressedTensors
from nsds.quantize.gguf import GGUF
from nsds.quantize.hqq import HQQ
from nsds.quantize.rtn import RTN

QUANTIZERS: dict[str, type[Quantizer]] = {"rtn": RTN, "hqq": HQQ, "gguf": GGUF, "ct": CompressedTensors}

__all__ = ["QUANTIZERS", "Quantizer", "WeightBank", "check_expert_formats", "make_quantizer"]


def make_quantizer(name: str, group_size: int | None = None, symmetric: bool = False) -> Quantizer:
    """The named quantizer with its settings, or a one-line error naming the choices."""
    if name not in QUANTIZERS:
        raise NsdsError(f"unknown quantizer '{name}'; choose from {', '.join(QUANTIZERS)}")
    return QUANTIZERS[name](group_size, symmetric)


def check_expert_formats(modules: Sequence[Module], quantizers: Iterable[str], per_expert: bool,
                         writes: Collection[str] = ()) -> None:  # fmt: skip
    """Refuse, before any work, what no format can hold for a MoE model's experts (`writes`: the formats the
    job writes besides its results, "hqq" for --save, "ct" for the compressed-tensors export).

    Per-expert widths exist only in nsds's own fake-quantized evaluation (rtn, hqq): llama.cpp stores all
    experts of a layer's projection as one 3-D tensor of one type, as fused-MoE kernels do. The gguf
    quantizer and the compressed-tensors export do not write MoE plans yet, and HQQ's saved format holds
    nn.Linear modules, not the fused 3-D expert parameters of transformers 5.
    """
    routed = any(m.expert not in (None, "shared") for m in modules)
    if per_expert and not routed:
        raise NsdsError("--per-expert gives each MoE expert its own width, but this model has no experts")
    if not routed:
        return
    if "gguf" in quantizers:
        raise NsdsError("the gguf quantizer cannot plan mixture-of-experts models yet (llama.cpp stores a layer's "
                        "experts as one 3-D tensor per projection); use rtn or hqq")  # fmt: skip
    if "ct" in writes:
        raise NsdsError("the compressed-tensors export does not write mixture-of-experts plans yet (vLLM's fused "
                        "MoE kernels take one scheme for all experts of a layer); drop --export")  # fmt: skip
    if "hqq" in writes:
        raise NsdsError("--save writes HQQ's format, which holds nn.Linear modules, not the fused 3-D expert "
                        "parameters of this MoE model; drop --save")  # fmt: skip
