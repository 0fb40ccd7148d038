"""Round-to-nearest, group-wise, asymmetric (min/max) or symmetric (abs-max), for any group size."""

import torch

from nsds.quantize.base import GroupQuantizer


def _groups(weight: torch.Tensor, group_size: int) -> list[torch.Tensor]:
    """Views of (out, groups, size): full groups, then the short last group when in_features % g != 0."""
    out, features = weight.shape
    full = features - features % group_size
    parts = [weight[:, :full].reshape(out, -1, group_size)] if full else []
    if full < features:
        parts.append(weight[:, full:].reshape(out, 1, features - full))
    return parts


def rtn(weight: torch.Tensor, bits: int, group_size: int, symmetric: bool = False) -> torch.Tensor:
    """Fake-quantize with round-to-nearest: each group of `group_size` inputs of a row gets its own grid.

    Asymmetric: scale = (max - min) / (2^b - 1), integer zero = round(-min / scale), q in [0, 2^b - 1].
    Symmetric (GPTQ's convention): scale = 2 max|w| / (2^b - 1), zero = 2^(b-1).
    Computed in float32 (float64 inputs stay float64); the result has the input's dtype.
    """
    levels = 2**bits - 1
    outputs = []
    for group in _groups(weight if weight.dtype == torch.float64 else weight.float(), group_size):
        if symmetric:
            scale = 2 * group.abs().amax(dim=-1, keepdim=True) / levels
            zero = torch.full_like(scale, 2 ** (bits - 1))
        else:
            low, high = group.amin(dim=-1, keepdim=True), group.amax(dim=-1, keepdim=True)
            scale = (high - low) / levels
            zero = torch.round(-low / torch.where(scale > 0, scale, torch.ones_like(scale)))
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.clamp(torch.round(group / safe) + zero, 0, levels)
        # A constant group is exactly representable (one level): keep it as it is.
        outputs.append(torch.where(scale > 0, (q - zero) * safe, group).flatten(1))
    return torch.cat(outputs, dim=1).to(weight.dtype)


class RTN(GroupQuantizer):
    name = "rtn"
    widths = frozenset(range(1, 9))

    @property
    def overhead_bits_per_group(self) -> int:
        return 16 if self.symmetric else 32  # fp16 scale (+ fp16 zero point)

    def fake_quantize(self, weight: torch.Tensor, bits: int) -> torch.Tensor:
        return rtn(weight, bits, self.group_size, self.symmetric)
