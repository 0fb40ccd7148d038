"""HQQ (Half-Quadratic Quantization, Badri & Shaji 2023) through the `hqq` package: data-free, it
optimises each group's zero point (and scale) to minimise an l_p<1 error of the weights. Also saves a
planned model in HQQ's own format."""

import shutil
import tempfile
from pathlib import Path

import torch
from hqq.core.quantize import BaseQuantizeConfig, HQQLinear
from hqq.core.quantize import Quantizer as HQQQuantizer
from hqq.models.hf.base import AutoHQQHFModel

from nsds.errors import NsdsError
from nsds.plan import Plan
from nsds.quantize.base import GroupQuantizer


def hqq_params(bits: int, group_size: int) -> dict:
    """HQQ's own defaults for a width (BaseQuantizeConfig: optimised zero, rounded zero at 4 bits), so
    the fake-quantized weights are exactly those an HQQLinear built from the same config holds."""
    return BaseQuantizeConfig(nbits=bits, group_size=group_size, axis=1)["weight_quant_params"]


class HQQ(GroupQuantizer):
    name = "hqq"
    widths = frozenset({1, 2, 3, 4, 5, 6, 8})
    grouping = "flat"

    def __init__(self, group_size: int | None = None, symmetric: bool = False) -> None:
        super().__init__(group_size, symmetric)
        if symmetric:
            raise NsdsError("HQQ is asymmetric by construction (it optimises the zero point); drop --symmetric")
        if self.group_size % 8:
            raise NsdsError(f"HQQ needs a group size that is a multiple of 8, got {self.group_size}")

    @property
    def overhead_bits_per_group(self) -> int:
        return 32  # fp16 scale and fp16 zero point

    def check_shape(self, out_features: int, in_features: int) -> None:
        if (out_features * in_features) % self.group_size:
            raise NsdsError(
                f"HQQ's group size must divide every module's weight count; {self.group_size} does not divide "
                f"a {out_features} x {in_features} weight (try --group-size 64 or 32)"
            )

    def fake_quantize(self, weight: torch.Tensor, bits: int) -> torch.Tensor:
        """HQQ's own layout: groups of `group_size` consecutive weights in row-major order (a group may
        span two rows when in_features is not a multiple of it), exactly what HQQLinear stores."""
        self.check_shape(*weight.shape)
        packed, meta = HQQQuantizer.quantize(
            weight.float(), compute_dtype=torch.float32, device=str(weight.device), **hqq_params(bits, self.group_size)
        )
        return HQQQuantizer.dequantize(packed, meta).reshape(weight.shape).to(weight.dtype)


def save_hqq_model(model: torch.nn.Module, plan: Plan, target: Path) -> None:
    """Quantize the (unquantized) model with HQQ by the plan and save it in HQQ's format (reload with
    hqq.models.hf.base.AutoHQQHFModel.from_quantized). The model's planned Linear modules become
    HQQLinear. Written to a temporary folder, then renamed, so `target` is never half-written."""
    device = str(next(model.parameters()).device)
    for module in plan.modules:
        parent, _, child = module.name.rpartition(".")
        config = BaseQuantizeConfig(nbits=module.bits, group_size=module.group_size, axis=1)
        linear = model.get_submodule(module.name)
        setattr(
            model.get_submodule(parent), child, HQQLinear(linear, config, compute_dtype=torch.float32, device=device)
        )
    model.hqq_quantized = True
    model.base_class = AutoHQQHFModel
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        AutoHQQHFModel.save_quantized(model, str(staging))
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
