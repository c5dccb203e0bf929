"""Low-rank factorisations of a combined LoRA delta.

``lowrank_svd`` factors ``sum_i B_i @ A_i`` without building it: with ``B = [B_1 ... B_n]`` (out, R) and
``A = [A_1; ...; A_n]`` (R, in), ``B = Qb Rb`` and ``A^T = Qa Ra`` (thin QR), so ``B @ A = Qb (Rb Ra^T) Qa^T``
and the SVD of the small (R, R) core gives the SVD of the delta. Cost O((out + in) R^2), memory O((out + in) R).

``dense_svd`` factors a materialised delta the way PEFT's ``add_weighted_adapter`` does (used when pruning has to
see the full delta, and for ``svd_clamp`` whose result depends on the SVD's sign convention).
"""

from __future__ import annotations

import torch


def _split_factors(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, rank: int, clamp: float | None):
    """PEFT's convention: lora_B = U[:, :rank] diag(S), lora_A = Vh[:rank]; optional quantile clamp."""
    B = U[:, :rank] @ torch.diag(S[:rank])
    A = Vh[:rank, :]
    if clamp is not None:
        high = torch.quantile(torch.cat([B.flatten(), A.flatten()]), clamp)
        B, A = B.clamp(-high, high), A.clamp(-high, high)
    return A, B


def _pad_rank(A: torch.Tensor, B: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad to ``rank`` when the delta has fewer singular values (the product is unchanged)."""
    missing = rank - A.shape[0]
    if missing > 0:
        A = torch.cat([A, A.new_zeros(missing, A.shape[1])], dim=0)
        B = torch.cat([B, B.new_zeros(B.shape[0], missing)], dim=1)
    return A, B


def lowrank_svd(
    As: list[torch.Tensor], Bs: list[torch.Tensor], rank: int, clamp: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-``rank`` factors (A, B) of ``sum_i Bs[i] @ As[i]`` (exact when rank >= sum of ranks), float32 out.

    The scalings and weights must already be folded into ``As``. Computed in float64 (the matrices are thin).
    """
    B = torch.cat([b.to(torch.float64) for b in Bs], dim=1)
    A = torch.cat([a.to(torch.float64) for a in As], dim=0)
    Qb, Rb = torch.linalg.qr(B)
    Qa, Ra = torch.linalg.qr(A.T)
    Uc, S, Vhc = torch.linalg.svd(Rb @ Ra.T)
    U, Vh = Qb @ Uc, Vhc @ Qa.T
    A_out, B_out = _split_factors(U.float(), S.float(), Vh.float(), rank, clamp)
    return _pad_rank(A_out, B_out, rank)


def dense_svd(
    delta: torch.Tensor, rank: int, clamp: float | None = None, full_matrices: bool = True, driver: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's factorisation of a full delta (out, in): SVD, keep ``rank`` triplets, fold S into B."""
    U, S, Vh = torch.linalg.svd(delta, full_matrices=full_matrices, driver=driver)
    A, B = _split_factors(U, S, Vh, rank, clamp)
    return _pad_rank(A, B, rank)
