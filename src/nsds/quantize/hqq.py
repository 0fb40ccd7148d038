"""HQQ (Half-Quadratic Quantization, Badri & Shaji 2023) through the `hqq` package: data-free, it
optimises each group's zero point (and scale) to minimise an l_p<1 error of the weights."""

import torch

from nsds.errors import NsdsError
from nsds.quantize import Quantizer


def hqq_params(bits: int, group_size: int) -> dict:
    """HQQ's own defaults for a width (BaseQuantizeConfig: optimised zero, rounded zero at 4 bits), so
    the fake-quantized weights are exactly those an HQQLinear built from the same config holds."""
    from hqq.core.quantize import BaseQuantizeConfig

    return BaseQuantizeConfig(nbits=bits, group_size=group_size, axis=1)["weight_quant_params"]


def _hqq():
    try:
        from hqq.core.quantize import Quantizer as HQQQuantizer
    except ImportError:
        raise NsdsError("the HQQ quantizer needs the `hqq` package: pip install hqq") from None
    return HQQQuantizer


class HQQ(Quantizer):
    name = "hqq"
    widths = frozenset({1, 2, 3, 4, 5, 6, 8})
    grouping = "flat"

    def overhead_bits_per_group(self, symmetric: bool) -> int:
        return 32  # fp16 scale and fp16 zero point

    def check(self, widths: list[int], symmetric: bool) -> None:
        super().check(widths, symmetric)
        if symmetric:
            raise NsdsError("HQQ is asymmetric by construction (it optimises the zero point); drop --symmetric")

    def fake_quantize(self, weight: torch.Tensor, bits: int, group_size: int, symmetric: bool) -> torch.Tensor:
        """HQQ's own layout: groups of `group_size` consecutive weights in row-major order (a group may
        span two rows when in_features is not a multiple of it), exactly what HQQLinear stores."""
        if group_size % 8 or weight.numel() % group_size:
            raise NsdsError(
                f"HQQ needs a group size that is a multiple of 8 and divides every module's weight count; "
                f"{group_size} does not fit a {tuple(weight.shape)} weight"
            )
        quantizer, params = _hqq(), hqq_params(bits, group_size)
        packed, meta = quantizer.quantize(
            weight.float(), compute_dtype=torch.float32, device=str(weight.device), **params
        )
        return quantizer.dequantize(packed, meta).reshape(weight.shape).to(weight.dtype)
