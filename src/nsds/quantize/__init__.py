"""Weight-only quantizers by name (a registry of classes), and the one way a plan reaches a model.

A quantizer is configured once (group size, symmetry; None: its default) and then maps a weight matrix
to its dequantized self at any of its widths, and prices its storage. `WeightBank` puts any assignment
of widths or storage formats (a Plan, or one layer at the low width for the oracle) into a loaded model
from pristine copies of its weights.
"""

from nsds.errors import NsdsError
from nsds.quantize.bank import WeightBank
from nsds.quantize.base import Quantizer
from nsds.quantize.gguf import GGUF
from nsds.quantize.hqq import HQQ
from nsds.quantize.rtn import RTN

QUANTIZERS: dict[str, type[Quantizer]] = {"rtn": RTN, "hqq": HQQ, "gguf": GGUF}

__all__ = ["QUANTIZERS", "Quantizer", "WeightBank", "make_quantizer"]


def make_quantizer(name: str, group_size: int | None = None, symmetric: bool = False) -> Quantizer:
    """The named quantizer with its settings, or a one-line error naming the choices."""
    if name not in QUANTIZERS:
        raise NsdsError(f"unknown quantizer '{name}'; choose from {', '.join(QUANTIZERS)}")
    return QUANTIZERS[name](group_size, symmetric)
