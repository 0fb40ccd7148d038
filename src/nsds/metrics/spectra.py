"""Structural Expressiveness: top-energy singular triplets, role weights and spectral capacity.

Two exact fast paths replace the full SVD:
- a matrix's triplets on the side we need come from the eigen-decomposition of its smaller Gram
  matrix (eigenvectors = singular vectors, eigenvalues = sigma^2);
- a head circuit A @ B with A (d x r), B (r x d) has rank <= r: thin-QR both factors and take the SVD
  of the r x r core, so no d x d matrix is ever formed or decomposed.
Everything is batched over leading dimensions (heads).
"""

import itertools
from collections.abc import Iterable

import torch

from nsds.metrics.moments import BLOCK_BYTES, kurtosis


def gram_of_columns(
    w: torch.Tensor, dtype: torch.dtype, block_bytes: int = BLOCK_BYTES, strips: int = 8
) -> torch.Tensor:
    """The lower triangle of W^T W in `dtype` (the upper stays zero; eigh reads only the lower).

    Rows are taken in blocks of `gram_block_rows` so a huge W (an unembedding) is never copied to `dtype`
    whole; see gram_of_blocks.
    """
    rows = gram_block_rows(w.shape[1], dtype, block_bytes)
    blocks = (w[start : start + rows] for start in range(0, w.shape[0], rows))
    return gram_of_blocks(blocks, w.shape[1], dtype, w.device, strips)


def gram_block_rows(n: int, dtype: torch.dtype, block_bytes: int = BLOCK_BYTES) -> int:
    """Rows of an n-column matrix per block of gram_of_columns (a block in `dtype` takes `block_bytes`)."""
    return max(1, block_bytes // (torch.finfo(dtype).bits // 8 * n))


def gram_of_blocks(
    blocks: Iterable[torch.Tensor], n: int, dtype: torch.dtype, device: torch.device | str = "cpu", strips: int = 8
) -> torch.Tensor:
    """The lower triangle of W^T W in `dtype`, summed over W's row blocks as they arrive (W is never whole).

    Computing only the strips G[i, :i+1] of `strips` column blocks saves almost half the flops of a full
    product (BLAS has syrk for this, but torch does not expose it). The same blocks in the same order give
    the same bits as gram_of_columns on the whole W.
    """
    edges = [round(i * n / strips) for i in range(strips + 1)]
    gram = torch.zeros(n, n, dtype=dtype, device=device)
    for rows in blocks:
        block = rows.to(device=device, dtype=dtype)
        for lo, hi in itertools.pairwise(edges):
            gram[lo:hi, :hi].addmm_(block[:, lo:hi].T, block[:, :hi])
    return gram


def triplets(w: torch.Tensor, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Singular values (descending) and the singular vectors of one side of W, via its smaller Gram.

    Computed in W's dtype (pass float64 for exact results).
    side="right" gives the columns v_i (input side, length in_features); side="left" the u_i.
    """
    tall = w.shape[0] >= w.shape[1]
    want_columns_side = side == "right"
    gram = gram_of_columns(w if tall else w.T, w.dtype)
    values, vectors = torch.linalg.eigh(gram)
    sigma = values.flip(-1).clamp_min(0).sqrt()
    vectors = vectors.flip(-1)
    # The Gram of the short side gives that side's vectors; the other side is W v / sigma (or W^T u / sigma).
    if want_columns_side == tall:
        return sigma, vectors
    other = (w if tall else w.T) @ vectors
    return sigma, other / torch.where(sigma > 0, sigma, torch.ones_like(sigma))


def product_triplets(
    a: torch.Tensor, b: torch.Tensor, group: torch.Tensor | None = None, right: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """SVD of each rank-r product a[h] @ b[g(h)] (a: (H, m, r), b: (G, r, n)) by the QR construction.

    A = Qa Ra, B^T = Qb Rb  =>  A B = Qa (Ra Rb^T) Qb^T; with Ra Rb^T = X S Y^T, U = Qa X and V = Qb Y.
    `group` maps each of the H products to its right factor (GQA shares one b among several heads), so
    each b is factored once. Returns sigma (H, r), U (H, m, r) and V (H, n, r), or None for V when
    `right` is False (writers need only U, which saves forming Qb).
    """
    qa, ra = torch.linalg.qr(a)
    bt = b.transpose(-2, -1)
    qb, rb = torch.linalg.qr(bt) if right else (None, torch.linalg.qr(bt, mode="r").R)
    if group is not None:
        rb = rb[group]
        qb = None if qb is None else qb[group]
    x, sigma, yt = torch.linalg.svd(ra @ rb.transpose(-2, -1))
    return sigma, qa @ x, None if qb is None else qb @ yt.transpose(-2, -1)


def energy_rank(sigma: torch.Tensor, threshold: float) -> torch.Tensor:
    """Smallest k with sum_{i<=k} sigma_i^2 >= threshold * sum sigma^2, clipped to [2, n]."""
    energy = torch.cumsum(sigma.square(), dim=-1)
    k = (energy < threshold * energy[..., -1:]).sum(dim=-1) + 1
    return k.clamp(min=min(2, sigma.shape[-1]), max=sigma.shape[-1])


def capacity(sigma: torch.Tensor, beta: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """SE = sum(s) / exp(H(p)) over the kept triplets, s_i = beta_i sigma_i, p = s / sum(s); 0 if sum(s) = 0."""
    kept = torch.arange(sigma.shape[-1], device=sigma.device) < k[..., None]
    s = torch.where(kept, beta * sigma, torch.zeros_like(sigma))
    total = s.sum(dim=-1, keepdim=True)
    p = s / torch.where(total > 0, total, torch.ones_like(total))
    entropy = -torch.where(p > 0, p * torch.log(torch.where(p > 0, p, torch.ones_like(p))), 0).sum(dim=-1)
    return torch.where(total[..., 0] > 0, total[..., 0] / torch.exp(entropy), torch.zeros_like(entropy))


def input_specificity(v: torch.Tensor) -> torch.Tensor:
    """up/gate weights: beta_i = ln(1 + relu(kurt(v_i))) for each column v_i."""
    return torch.log1p(kurtosis(v, dim=-2).clamp_min(0))


def circuit_specificity(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """QK weights: beta_i = ln(1 + relu(kurt(u_i)) * relu(kurt(v_i)))."""
    return torch.log1p(kurtosis(u, dim=-2).clamp_min(0) * kurtosis(v, dim=-2).clamp_min(0))


def readout_complement(gram: torch.Tensor, energy: float) -> tuple[torch.Tensor, int]:
    """The orthogonal complement Q of P, where P (d x k_U) holds W_U's top right singular vectors.

    `gram` is W_U^T W_U (lower triangle, from gram_of_columns). Its eigenvectors form a complete
    orthonormal basis [P, Q] of the residual stream, so ||P^T u||^2 = ||u||^2 - ||Q^T u||^2 with Q only
    d - k_U wide (k_U is close to d). Returns Q and k_U.
    """
    values, vectors = torch.linalg.eigh(gram)
    sigma = values.flip(-1).clamp_min(0).sqrt()
    k_u = int(energy_rank(sigma, energy))
    return vectors.flip(-1)[:, k_u:], k_u


def writing_density(u: torch.Tensor, complement: torch.Tensor) -> torch.Tensor:
    """down/OV weights: beta_i = ||P^T u_i||_2, computed as sqrt(||u_i||^2 - ||Q^T u_i||^2) (see readout_complement)."""
    inside = u.square().sum(dim=-2) - (complement.T @ u).square().sum(dim=-2)
    return inside.clamp_min(0).sqrt()
