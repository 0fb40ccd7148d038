"""Excess kurtosis (Numerical Vulnerability) of matrices, of their columns, and of low-rank products.

All use population central moments: kurt = m4 / m2^2 - 3. A constant input (m2 = 0) has no tails
and gets 0, so absent or zeroed weights never produce NaN; a NaN or Inf entry always yields NaN.
"""

import torch

BLOCK_BYTES = 128 << 20  # bound on the temporary each blockwise product materialises


def _excess(m2: torch.Tensor, m4: torch.Tensor) -> torch.Tensor:
    """m4 / m2^2 - 3, and 0 where m2 = 0; NaN/Inf inputs stay non-finite so callers can detect them."""
    safe = torch.where(m2 == 0, torch.ones_like(m2), m2)
    return torch.where(m2 == 0, torch.zeros_like(m2), m4 / safe.square() - 3.0)


def kurtosis(x: torch.Tensor, dim: int | tuple[int, ...] | None = None) -> torch.Tensor:
    """Excess kurtosis of the entries of `x` (all of them, or along `dim`), in x's dtype."""
    dims = tuple(range(x.ndim)) if dim is None else dim
    square = (x - x.mean(dim=dims, keepdim=True)).square_()
    return _excess(square.mean(dim=dims), square.square_().mean(dim=dims))


def product_kurtosis(a: torch.Tensor, b: torch.Tensor, block_bytes: int = BLOCK_BYTES) -> torch.Tensor:
    """Excess kurtosis of the entries of each product a[h] @ b[h], without holding the products.

    a: (..., m, r), b: (..., r, n) with small r (a head's d_h). The mean comes from the factors' sums
    (1^T A B 1 = (A^T 1) . (B 1)) and is folded into the product as one extra rank:
    [A, 1] [B; -mean 1^T] = A B - mean. The central second and fourth moments are then a sum and a norm of
    the squares of each block of rows, so memory stays at `block_bytes` whatever m and n are.
    """
    m, n = a.shape[-2], b.shape[-1]
    mean = (a.sum(dim=-2) * b.sum(dim=-1)).sum(dim=-1) / (m * n)
    a = torch.cat([a, torch.ones_like(a[..., :1])], dim=-1)
    b = torch.cat([b, -mean[..., None, None].expand(*b.shape[:-2], 1, n)], dim=-2)
    batch = a[..., 0, 0].numel()
    rows = max(1, block_bytes // (a.element_size() * n * batch))
    s2 = torch.zeros_like(mean)
    s4 = torch.zeros_like(mean)
    for start in range(0, m, rows):
        square = (a[..., start : start + rows, :] @ b).flatten(-2).square_()
        s2 += square.sum(dim=-1)
        s4 += torch.linalg.vector_norm(square, dim=-1).square()  # one pass, no fourth-power temporary
    return _excess(s2 / (m * n), s4 / (m * n))
