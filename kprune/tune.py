"""Knowledge-preserving weight tuning: least-squares refit of one sublayer's output projection.

Solves min_W ||F W^T - R||^2 over all sample tokens, with F the kept units' features (inputs of the output
projection) and R the target (teacher residual sum - student input - output bias). Tokens arrive in batches,
so only the Gram statistics G = F^T F, C = F^T R and ||R||^2 are kept, in float64.
"""

import logging
import math
from dataclasses import dataclass

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

# Singular values of G below this fraction of the largest are treated as zero by the lstsq fallback: the
# normal equations square F's condition number, so the default (machine epsilon) would invert round-off.
LSTSQ_RELATIVE_CUTOFF = 1e-12


# The current weight already reproduces the target up to float round-off.
EXACT_RELATIVE_ERROR = 1e-10


class LeastSquaresStats:
    """Running float64 sums G = F^T F (k, k), C = F^T R (k, d), ||R||^2 and the number of rows."""

    def __init__(self, num_features: int, out_dim: int, device: torch.device | str | None = None) -> None:
        if num_features < 0 or out_dim <= 0:
            raise ValueError(f"need num_features >= 0 and out_dim > 0, got {num_features} and {out_dim}")
        self.gram = torch.zeros(num_features, num_features, dtype=torch.float64, device=device)
        self.cross = torch.zeros(num_features, out_dim, dtype=torch.float64, device=device)
        self.target_sq = 0.0
        self.num_rows = 0

    @property
    def num_features(self) -> int:
        return self.gram.shape[0]

    @property
    def out_dim(self) -> int:
        return self.cross.shape[1]

    def add(self, features: Tensor, target: Tensor) -> None:
        """Accumulate a batch of rows: features (n, k) and target (n, d), any float dtype and device."""
        if features.dim() != 2 or features.shape[1] != self.num_features:
            raise ValueError(f"features must be (n, {self.num_features}), got {tuple(features.shape)}")
        if target.dim() != 2 or target.shape != (features.shape[0], self.out_dim):
            raise ValueError(
                f"target must have shape ({features.shape[0]}, {self.out_dim}), got {tuple(target.shape)}"
            )
        features = features.detach().to(device=self.gram.device, dtype=torch.float64)
        target = target.detach().to(device=self.gram.device, dtype=torch.float64)
        self.gram.addmm_(features.T, features)
        self.cross.addmm_(features.T, target)
        self.target_sq += float(target.square().sum())
        self.num_rows += features.shape[0]

    def select(self, keep: Tensor) -> "LeastSquaresStats":
        """Statistics of the kept features only (keep: bool mask of length k, or feature indices)."""
        if keep.dtype == torch.bool:
            if keep.shape != (self.num_features,):
                raise ValueError(f"bool keep mask must be ({self.num_features},), got {tuple(keep.shape)}")
            index = keep.nonzero().squeeze(1)
        else:
            index = keep.reshape(-1).long()
        index = index.to(self.gram.device)
        selected = LeastSquaresStats(index.numel(), self.out_dim, device=self.gram.device)
        selected.gram = self.gram[index][:, index]
        selected.cross = self.cross[index]
        selected.target_sq = self.target_sq
        selected.num_rows = self.num_rows
        return selected

    def error(self, weight: Tensor) -> float:
        """||F W^T - R||^2 for weight W (d, k), from the statistics: tr(W G W^T) - 2 tr(W C) + ||R||^2."""
        if weight.shape != (self.out_dim, self.num_features):
            raise ValueError(
                f"weight must have shape ({self.out_dim}, {self.num_features}), got {tuple(weight.shape)}"
            )
        w = weight.detach().to(device=self.gram.device, dtype=torch.float64)
        quadratic = (w @ self.gram * w).sum()
        linear = (w * self.cross.T).sum()
        # Cancellation can leave a tiny negative number when the fit is (near) exact.
        return max(float(quadratic - 2 * linear) + self.target_sq, 0.0)


@dataclass
class TuneReport:
    """Reconstruction errors ||F W^T - R||^2 before (pruned, untuned) and after tuning.

    ridge is the absolute value lam added to G's diagonal; solver is "cholesky", "lstsq" (fallback),
    "exact" (the current weight already reconstructs the target) or "none" (no kept features);
    kept_current_weight says the solution was rejected (not better, or not finite).
    """

    error_before: float
    error_after: float
    target_norm: float
    ridge: float
    solver: str
    kept_current_weight: bool = False

    @property
    def relative_error_before(self) -> float:
        return self.error_before / self.target_norm if self.target_norm > 0 else 0.0

    @property
    def relative_error_after(self) -> float:
        return self.error_after / self.target_norm if self.target_norm > 0 else 0.0


def solve_output_projection(
    stats: LeastSquaresStats, current_weight: Tensor, ridge: float = 1e-4
) -> tuple[Tensor, TuneReport]:
    """Least-squares output projection (d, k) for the kept features, in current_weight's dtype and device.

    Solves (G + lam I) W^T = C in float64 with the relative ridge lam = ridge * mean(diag(G)), by Cholesky,
    falling back to lstsq (with a warning) when G + lam I is not positive definite. current_weight (d, k) is
    the pruned, untuned projection; it is returned unchanged (with a warning) if the solution is not better.
    """
    if not (math.isfinite(ridge) and ridge >= 0):
        raise ValueError(f"ridge must be a finite number >= 0, got {ridge!r}")
    error_before = stats.error(current_weight)  # also checks current_weight's shape
    if stats.num_features == 0:
        report = TuneReport(error_before, error_before, stats.target_sq, 0.0, "none")
        return current_weight.clone(), report
    if error_before <= EXACT_RELATIVE_ERROR * stats.target_sq:
        # Nothing to reconstruct (e.g. nothing pruned yet): a ridge solution could only be worse.
        report = TuneReport(error_before, error_before, stats.target_sq, 0.0, "exact")
        return current_weight.clone(), report

    gram, cross = stats.gram, stats.cross
    mean_diagonal = float(gram.diagonal().mean())
    lam = ridge * mean_diagonal if mean_diagonal > 0 else 0.0
    system = gram + lam * torch.eye(stats.num_features, dtype=gram.dtype, device=gram.device)
    cholesky_factor, info = torch.linalg.cholesky_ex(system)
    if int(info) == 0:
        solution, solver = torch.cholesky_solve(cross, cholesky_factor), "cholesky"
    else:
        logger.warning(
            "Cholesky failed (G + lam I not positive definite, k=%d, lam=%.3g); falling back to lstsq",
            stats.num_features,
            lam,
        )
        # On CPU: CUDA's lstsq only offers 'gels', which assumes full rank; 'gelsd' handles rank deficiency.
        solution = torch.linalg.lstsq(
            system.cpu(), cross.cpu(), rcond=LSTSQ_RELATIVE_CUTOFF, driver="gelsd"
        ).solution.to(gram.device)
        solver = "lstsq"

    new_weight = solution.T.to(device=current_weight.device, dtype=current_weight.dtype).contiguous()
    error_after = stats.error(new_weight)  # of the weight as returned, after any cast to a lower precision
    if not (torch.isfinite(new_weight).all() and error_after <= error_before):
        logger.warning(
            "Tuned output projection is not better (error %.6g -> %.6g, solver %s, lam=%.3g); "
            "keeping the current weight",
            error_before,
            error_after,
            solver,
            lam,
        )
        kept = TuneReport(error_before, error_before, stats.target_sq, lam, solver, kept_current_weight=True)
        return current_weight.clone(), kept
    report = TuneReport(error_before, error_after, stats.target_sq, lam, solver)
    return new_weight, report
