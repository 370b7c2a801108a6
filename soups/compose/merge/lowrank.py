"""Low-rank algebra for merges: exact weighted sums of LoRAs and truncated SVDs.

- The weighted sum of LoRA updates is a LoRA (LoRA Soups, https://arxiv.org/abs/2410.13025):
  sum_i w_i s_i B_i A_i = [B_1 ... B_k] [w_1 s_1 A_1; ...; w_k s_k A_k], rank sum(r_i).
- Its truncated SVD never needs the dense out x in matrix: with B = Q_b R_b and A^T = Q_a R_a
  (thin QR), B A = Q_b (R_b R_a^T) Q_a^T, so the SVD of the small R x R core gives the SVD of
  B A exactly (Golub & Van Loan, Matrix Computations, 4th ed., sec. 5.4 and 8.6).
- A dense dW (after TIES / DARE) is truncated by block subspace iteration with Rayleigh-Ritz
  (Halko, Martinsson & Tropp 2011, https://arxiv.org/abs/0909.4061, alg. 4.4), iterated until
  every kept singular triplet has a residual at float32 round-off, else LAPACK's full SVD.

A truncated factorisation U S V^T is returned as a LoRA with scaling 1 and sqrt(S) on each
factor (B = U sqrt(S), A = sqrt(S) V^T), which keeps both factors on the same scale.
"""

from __future__ import annotations

from collections.abc import Sequence

from soups.adapters import LoraModule
from soups.lazy import lazy

torch = lazy("torch")  # imported on first use (soups/lazy.py)

# Dense SVD by LAPACK when the short side is at most this or the block would be over half of
# it: iterating saves nothing there.
LAPACK_MAX_SIDE = 512
MAX_ITERATIONS = 30
# Converged when every kept triplet's residual ||W^T u - s v|| <= RESIDUAL_TOL * s_1: about
# what float32 matmuls over a few thousand terms reach; tighter would never stop.
RESIDUAL_TOL = 2e-6


def concatenate(modules: Sequence[LoraModule], weights: Sequence[float]) -> LoraModule:
    """Exact weighted sum as one LoRA: A (sum r_i, in) = [w_i s_i A_i], B (out, sum r_i) =
    [B_i], scaling 1 (PEFT's `cat` layout: the weights and scalings folded into A)."""
    a = torch.cat([m.A * (w * m.scaling) for m, w in zip(modules, weights, strict=True)])
    b = torch.cat([m.B for m in modules], dim=1)
    return LoraModule(A=a, B=b, scaling=1.0)


def _as_lora(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor) -> LoraModule:
    root = s.sqrt()
    return LoraModule(A=(root[:, None] * vh).float().contiguous(),
                      B=(u * root).float().contiguous(), scaling=1.0)


def factor_svd(module: LoraModule) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of dW = s B A from the factors alone (thin QR of B and A^T, SVD of the small
    core), in float64: U (out, m), S (m,) descending, V^T (m, in), m = min(out, in, R)."""
    b = module.B.double() * module.scaling
    a = module.A.double()
    q_b, r_b = torch.linalg.qr(b)        # (out, p), (p, R)
    q_a, r_a = torch.linalg.qr(a.T)      # (in, q), (q, R)
    u, s, vh = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)
    return q_b @ u, s, vh @ q_a.T


def numerical_rank(s: torch.Tensor, shape: tuple[int, int]) -> int:
    """How many of the descending singular values `s` of a float64 matrix of `shape` are not
    round-off: above s_1 * max(shape) * eps, LAPACK's (and numpy's matrix_rank) threshold."""
    if s.numel() == 0 or s[0] <= 0:
        return 0
    return int((s > s[0] * max(shape) * torch.finfo(torch.float64).eps).sum())


def truncate_lora(module: LoraModule, rank: int) -> LoraModule:
    """Rank-`rank` truncated SVD of dW = s B A from the factors alone, in float64; the rank is
    capped at what dW can have."""
    u, s, vh = factor_svd(module)
    keep = min(rank, s.numel())
    return _as_lora(u[:, :keep], s[:keep], vh[:keep])


def compact_lora(module: LoraModule, rank: int | None = None) -> LoraModule:
    """dW = s B A refactorised exactly by its SVD without the zero singular values (so its
    rank is dW's own), truncated to `rank` when given; rank 1 with zero factors when dW = 0
    (PEFT needs a rank of at least 1)."""
    u, s, vh = factor_svd(module)
    keep = max(1, numerical_rank(s, (module.B.shape[0], module.A.shape[1])))
    keep = min(keep, rank) if rank is not None else keep
    return _as_lora(u[:, :keep], s[:keep], vh[:keep])


def truncate_dense(delta: torch.Tensor, rank: int, block: int | None = None) -> LoraModule:
    """Rank-`rank` truncated SVD of a dense dW (out, in) as a LoRA.

    `block` (default rank + 16) is the subspace size: give at least the rank of the signal
    (e.g. the sum of the merged LoRAs' ranks) plus a margin, so the iteration converges in a
    few steps."""
    out_features, in_features = delta.shape
    side = min(out_features, in_features)
    rank = min(rank, side)
    block = min(side, max(block or 0, rank) + 16)
    if side <= LAPACK_MAX_SIDE or 2 * block > side:
        return _lapack(delta, rank)
    found = _subspace_iteration(delta, rank, block)
    return _lapack(delta, rank) if found is None else _as_lora(*found)


def _lapack(delta: torch.Tensor, rank: int) -> LoraModule:
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    return _as_lora(u[:, :rank], s[:rank], vh[:rank])


def _subspace_iteration(w: torch.Tensor, rank: int, block: int):
    """Top `rank` singular triplets of w (m, n) or None if not converged.

    Each round: Z = orth(W^T Q), W Z = Q R (thin QR), R = U_r S V_r^T gives Ritz triplets
    u = Q U_r, v = Z V_r with W v = s u exactly; the round converges when W^T u = s v holds
    to round-off (checked with the next round's W^T Q, so a round costs two matmuls)."""
    generator = torch.Generator().manual_seed(0)  # a fixed start: merges are deterministic
    q = torch.linalg.qr(w @ torch.randn(w.shape[1], block, generator=generator)).Q
    ritz = None
    for _ in range(MAX_ITERATIONS):
        p = w.T @ q                                          # (n, block)
        if ritz is not None:
            z, u_r, s, vh_r = ritz
            v = z @ vh_r[:rank].T                            # (n, rank)
            residual = (p @ u_r[:, :rank] - v * s[:rank]).norm(dim=0)
            if residual.max() <= RESIDUAL_TOL * s[0]:
                return q @ u_r[:, :rank], s[:rank], v.T
        z = torch.linalg.qr(p).Q
        q, r = torch.linalg.qr(w @ z)
        u_r, s, vh_r = torch.linalg.svd(r)
        ritz = (z, u_r, s, vh_r)
    return None
