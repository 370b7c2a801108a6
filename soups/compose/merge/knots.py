"""KnOTS: align LoRA updates in one shared basis by a joint SVD, then merge them there.

Stoica et al., "Model merging with SVD to tie the KnOTS", ICLR 2025,
https://arxiv.org/abs/2410.19735 (reference code: https://github.com/gstoica27/KnOTS,
`task_merger.py` `SVDMerger`). Per module, with dW_i = s_i B_i A_i (out x in):

    [dW_1 ... dW_k] = U S [V_1^T ... V_k^T]      one SVD of the column-wise concatenation
    dW_merged = U merge_i(S V_i^T)               merge the aligned task rows, rebuild

U S is a basis every task is written in, so an entrywise merge (TIES, DARE) compares
coefficients of the same basis direction rather than raw LoRA entries, which the paper shows
are poorly aligned between LoRAs. As the reference code does by default (`s_on_V=True`), the
merged rows carry S: S V_i^T is dW_i written in the orthonormal basis U, exactly.

Computed from the factors: [dW_1 ... dW_k] = [B_1 ... B_k] blockdiag(s_1 A_1, ..., s_k A_k)
is itself a LoRA of rank R = sum r_i, so its SVD comes from thin QRs and an R x R core
(`lowrank.factor_svd`), never from the dense out x (k in) matrix. The rows S V_i^T are
(R x in) each, the size of the inputs' A factors; no out x in matrix is formed at any step.

Where this differs from the reference code: TIES trims per module (PEFT's and this project's
convention; the code ranks one vector of the whole model per task); each adapter has its own
weight (the code scales every task by the first coefficient); singular values are dropped
as round-off relative to the largest (the code: below an absolute 1e-5).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from soups.adapters import LoraModule
from soups.compose.merge.lowrank import compact_lora, factor_svd, numerical_rank
from soups.lazy import lazy

torch = lazy("torch")  # imported on first use (soups/lazy.py)

# (task rows (k, t, in) float32, weights (k,) float32) -> merged rows (t, in): a merge of
# sparsify.py (the weighted sum, TIES, DARE-TIES).
RowMerge = Callable[["torch.Tensor", "torch.Tensor"], "torch.Tensor"]  # strings: lazy torch


def aligned_rows(modules: Sequence[LoraModule]) -> tuple[torch.Tensor, torch.Tensor]:
    """The joint SVD: U (out, t) and the task rows S V_i^T stacked (k, t, in), float64, with
    t the number of nonzero singular values of [dW_1 ... dW_k] (at least 1), so that
    dW_i = U @ rows[i] exactly; each column of U has its largest-magnitude entry positive."""
    in_features = modules[0].A.shape[1]
    joint = LoraModule(A=torch.block_diag(*(m.A.double() * m.scaling for m in modules)),
                       B=torch.cat([m.B.double() for m in modules], dim=1), scaling=1.0)
    u, s, vh = factor_svd(joint)  # (out, m), (m,), (m, k in)
    # Zero singular values carry nothing (their rows of S V^T are 0); dropping them keeps t
    # the concatenation's rank, which is also what the sparsifiers count entries of.
    keep = max(1, numerical_rank(s, (joint.B.shape[0], joint.A.shape[1])))
    u, s, vh = u[:, :keep], s[:keep], vh[:keep]
    # An SVD fixes each triplet only up to (u, v) ~ (-u, -v). TIES with frequency votes is
    # not equivariant to that flip (a tie of votes elects +), so one sign is chosen: the
    # largest-magnitude entry of each u is positive, whichever way the SVD was computed.
    flip = torch.where(u.gather(0, u.abs().argmax(dim=0, keepdim=True)) < 0, -1.0, 1.0)
    u, vh = u * flip, vh * flip.T
    rows = (s[:, None] * vh).reshape(keep, len(modules), in_features)
    return u, rows.transpose(0, 1)  # the columns of V^T come in blocks of in, one per task


def knots(modules: Sequence[LoraModule], weights: Sequence[float], merge: RowMerge,
          rank: int | None = None) -> LoraModule:
    """KnOTS merge of k modules (A_i (r_i, in), B_i (out, r_i)) with one weight each: U times
    `merge` of the aligned rows, factorised exactly (rank <= sum r_i, zero singular values
    dropped) and truncated to `rank` when given."""
    u, rows = aligned_rows(modules)
    # The sparsifiers select in float32 (magnitude_trim's threshold is a float32 value), as
    # every other merge of this project does.
    merged = merge(rows.float().contiguous(), torch.tensor(weights, dtype=torch.float32))
    return compact_lora(LoraModule(A=merged.double(), B=u, scaling=1.0), rank)
