"""Knowledge-preserving weight tuning: least-squares refit of one sublayer's output projection.

Solves min_W ||F W^T - R||^2 over the sample's tokens, with F the kept units' features (inputs of the output
projection) and R the target (teacher residual sum - student input - output bias). Tokens arrive in batches,
so only the Gram statistics G = F^T F, C = F^T R and ||R||^2 are kept, summed in float64.

Two solvers:
- ``solve_output_projection`` (the paper): the whole sample, a small ridge towards zero, accepted when its
  in-sample error is lower (which least squares always is).
- ``solve_towards_current`` (the default): the sample's sequences are split into a fit and a check part;
  over a grid of strengths s, the ridge towards the current weight W0,
  ``min_W ||F W^T - R||^2 + lam ||W - W0||^2`` with lam = s * mean(diag(G_fit)), is solved on the fit part
  (one Cholesky factorisation of G_fit + lam I each); the strength with the lowest check-part error wins,
  or no tuning at all when W0 is better on the check part; the winner is refitted on the whole sample at
  that strength.
"""

import functools
import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

# Singular values of G below this fraction of the largest are treated as zero by the lstsq fallback: the
# normal equations square F's condition number, so the default (machine epsilon) would invert round-off.
LSTSQ_RELATIVE_CUTOFF = 1e-12


# The current weight already reproduces the target up to round-off: an unpruned sublayer shows about 1e-8
# (MiniLM) from the float32 sums of LeastSquaresStats; below this, tuning (and Kwon et al.'s rescaling)
# has nothing to gain.
EXACT_RELATIVE_ERROR = 1e-6


class LeastSquaresStats:
    """Running float64 sums G = F^T F (k, k), C = F^T R (k, d), ||R||^2 and the number of rows.

    Rows are summed in float32 (float64 when a batch's features or target are) into pending sums that join
    the float64 ones every ``PENDING_ROWS`` rows, when the working precision changes, and before any read."""

    # float32 round-off over at most this many rows; a flush per batch (about 900 rows of short sentences)
    # cast a fresh k x k float32 product into float64 each time.
    PENDING_ROWS = 4096
    # G is symmetric: it is summed as up to four column strips, each against the columns from its own on
    # (the upper block triangle: 62.5% of the products at four strips), and mirrored when flushed.
    # Both together, 20 batches of 870 rows, alone on 2 cores: 0.56x the time of per-batch products added
    # into float64 at k = 3,072 (a BERT-base FFN), 0.70x at 1,536, the same at 768.
    GRAM_STRIPS, MIN_STRIP_WIDTH = 4, 256
    # Rows of the pending sums cast to float64 at a time when they join the float64 ones (a CPU addition
    # of mixed precisions casts its whole input first): a k x k float64 temporary at every flush was 11 MB
    # at the peak of a MiniLM prune, and its strips' casts, of as many sizes, fragmented the heap.
    FLUSH_ROWS = 64

    def __init__(self, num_features: int, out_dim: int, device: torch.device | str | None = None) -> None:
        if num_features < 0 or out_dim <= 0:
            raise ValueError(f"need num_features >= 0 and out_dim > 0, got {num_features} and {out_dim}")
        self._gram = torch.zeros(num_features, num_features, dtype=torch.float64, device=device)
        self._cross = torch.zeros(num_features, out_dim, dtype=torch.float64, device=device)
        # A tensor on the statistics' device: reading it per batch would wait for a GPU at every batch.
        self._target_sq_sum = torch.zeros((), dtype=torch.float64, device=device)
        self._pending: tuple[Tensor, Tensor, Tensor] | None = None  # gram, cross, ||R||^2 not yet in float64
        self._pending_rows = 0
        self.num_rows = 0

    def _strips(self) -> list[tuple[int, int]]:
        """Column ranges of the Gram strips: one strip below 2 * MIN_STRIP_WIDTH features."""
        k = self.num_features
        width = max(self.MIN_STRIP_WIDTH, -(-k // self.GRAM_STRIPS))
        return [(start, min(start + width, k)) for start in range(0, k, width)]

    def _flush(self, more_rows: bool = False) -> None:
        """Add the pending sums into the float64 ones; more_rows: zero them for the next rows (they are kept,
        not allocated again), else let them go."""
        if self._pending is not None:
            gram, cross, target_sq = self._pending
            # A GPU casts as it adds: one block there.
            step = self.FLUSH_ROWS if gram.device.type == "cpu" else max(self.num_features, 1)
            for start in range(0, self.num_features, step):
                rows = slice(start, start + step)
                self._gram[rows] += gram[rows]  # the upper block triangle (the pending lower blocks are zero)
                self._cross[rows] += cross[rows]
            for start, stop in self._strips():  # the lower blocks mirror the upper ones, as float64 sums too
                self._gram[stop:, start:stop] = self._gram[start:stop, stop:].T
            self._target_sq_sum += target_sq
            if more_rows:
                for pending in self._pending:
                    pending.zero_()
            else:
                self._pending = None
            self._pending_rows = 0

    @property
    def gram(self) -> Tensor:
        self._flush()
        return self._gram

    @property
    def cross(self) -> Tensor:
        self._flush()
        return self._cross

    @property
    def target_sq_sum(self) -> Tensor:
        """||R||^2 as a float64 tensor on the statistics' device."""
        self._flush()
        return self._target_sq_sum

    @property
    def target_sq(self) -> float:
        """||R||^2 over the rows added so far."""
        return float(self.target_sq_sum)

    @property
    def num_features(self) -> int:
        return self._gram.shape[0]

    @property
    def out_dim(self) -> int:
        return self._cross.shape[1]

    def add(self, features: Tensor, target: Tensor) -> None:
        """Accumulate a batch of rows: features (n, k) and target (n, d), any float dtype and device; no
        rows add nothing (and allocate nothing)."""
        if features.dim() != 2 or features.shape[1] != self.num_features:
            raise ValueError(f"features must be (n, {self.num_features}), got {tuple(features.shape)}")
        if target.dim() != 2 or target.shape != (features.shape[0], self.out_dim):
            raise ValueError(
                f"target must have shape ({features.shape[0]}, {self.out_dim}), got {tuple(target.shape)}"
            )
        if not len(features):
            return
        # Products in float32 (float64 if either input is): faster than float64 products and casts.
        work = torch.float64 if torch.float64 in (features.dtype, target.dtype) else torch.float32
        if self._pending is not None and self._pending[0].dtype != work:
            self._flush()
        if self._pending is None:
            self._pending = (
                self._gram.new_zeros(self._gram.shape, dtype=work),
                self._cross.new_zeros(self._cross.shape, dtype=work),
                self._target_sq_sum.new_zeros((), dtype=work),
            )
        features = features.detach().to(device=self._gram.device, dtype=work)
        target = target.detach().to(device=self._gram.device, dtype=work)
        gram, cross, target_sq = self._pending
        for start, stop in self._strips():
            gram[start:stop, start:].addmm_(features[:, start:stop].T, features[:, start:])
        cross.addmm_(features.T, target)
        target_sq += target.square().sum()
        self._pending_rows += features.shape[0]
        self.num_rows += features.shape[0]
        if self._pending_rows >= self.PENDING_ROWS:
            self._flush(more_rows=True)

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
        selected._gram = self.gram[index][:, index]
        selected._cross = self.cross[index]
        selected._target_sq_sum = self.target_sq_sum
        selected.num_rows = self.num_rows
        return selected

    def __add__(self, other: "LeastSquaresStats") -> "LeastSquaresStats":
        """The statistics of both sets of rows."""
        total = LeastSquaresStats(self.num_features, self.out_dim, device=self.gram.device)
        total._gram, total._cross = self.gram + other.gram, self.cross + other.cross
        total._target_sq_sum = self.target_sq_sum + other.target_sq_sum
        total.num_rows = self.num_rows + other.num_rows
        return total

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
    With a check part (``solve_towards_current``): strength is the chosen relative strength s (None: no
    tuning won), check_error_before / check_error_after the check part's error (or its check_loss) of the
    current weight and of the fit-part solution at that strength (equal when no tuning won).
    """

    error_before: float
    error_after: float
    target_norm: float
    ridge: float
    solver: str
    kept_current_weight: bool = False
    strength: float | None = None
    check_error_before: float | None = None
    check_error_after: float | None = None

    @property
    def relative_error_before(self) -> float:
        return self.error_before / self.target_norm if self.target_norm > 0 else 0.0

    @property
    def relative_error_after(self) -> float:
        return self.error_after / self.target_norm if self.target_norm > 0 else 0.0


def ridged(gram: Tensor, lam: float) -> Tensor:
    """G + lam I, without building an identity matrix: two fewer k x k float64 matrices at the peak of a
    wide FFN's solve (k = 3072 on BERT-base: 75 MB each)."""
    system = gram.clone()
    system.diagonal().add_(lam)
    return system


def solve_normal_equations(build_system: Callable[[], Tensor], right: Tensor) -> tuple[Tensor, str]:
    """X with S @ X = right for the symmetric positive semi-definite S that build_system() returns (a new
    tensor, factored in place: one k x k matrix besides the caller's statistics), and the solver used:
    Cholesky, or lstsq (with a warning, on S built again) when S is not positive definite (rank-deficient
    features and no ridge)."""
    # LAPACK works on column-major matrices: the symmetric system's transposed view is one, so its factor
    # takes its place, and two triangular solves read it there (factoring the row-major system, or
    # cholesky_solve, copies it first: one more k x k matrix each, 75 MB at k = 3,072).
    factor = build_system().mT
    info = torch.empty((), dtype=torch.int32, device=factor.device)
    torch.linalg.cholesky_ex(factor, out=(factor, info))
    if int(info) == 0:
        half = torch.linalg.solve_triangular(factor, right, upper=False)
        return torch.linalg.solve_triangular(factor.mT, half, upper=True), "cholesky"
    del factor
    logger.warning(
        "Cholesky failed (normal equations not positive definite, k=%d); falling back to lstsq", len(right)
    )
    # On CPU: CUDA's lstsq only offers 'gels', which assumes full rank; 'gelsd' handles rank deficiency.
    system = build_system().cpu()
    solution = torch.linalg.lstsq(system, right.cpu(), rcond=LSTSQ_RELATIVE_CUTOFF, driver="gelsd")
    return solution.solution.to(right.device), "lstsq"


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

    mean_diagonal = float(stats.gram.diagonal().mean())
    lam = ridge * mean_diagonal if mean_diagonal > 0 else 0.0
    solution, solver = solve_normal_equations(lambda: ridged(stats.gram, lam), stats.cross)
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


def tuning_rows(attention_mask: Tensor, first_token_only: bool) -> Tensor:
    """Bool (B, S): the rows the tuning fits: every real token, or each sequence's first token."""
    if not first_token_only:
        return attention_mask.bool()
    rows = torch.zeros_like(attention_mask, dtype=torch.bool)
    rows[:, 0] = True
    return rows


def host_masks(batches: Sequence[Mapping[str, Tensor]]) -> list[Tensor]:
    """Each batch's attention mask on the host. The tunings choose their rows there: choosing them on a GPU
    (a boolean index) waits for it at every batch; the loop reads these once."""
    return [batch["attention_mask"].cpu() for batch in batches]


def gather_rows(batch: Tensor, taken: Tensor) -> Tensor:
    """The rows of a (B, S, ...) tensor where the host's bool (B, S) ``taken`` holds, in order: (n, ...)."""
    index = taken.flatten().nonzero().squeeze(1).to(batch.device, non_blocking=True)
    return batch.flatten(0, 1).index_select(0, index)


def check_sequences(num_sequences: int, fraction: float, seed: int) -> Tensor:
    """Bool (num_sequences,): the sequences of the check part, a seeded random ``fraction`` of them (at least
    one, and at least one left to fit when there are two or more)."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"the check fraction must be in (0, 1), got {fraction}")
    count = min(max(1, round(fraction * num_sequences)), max(num_sequences - 1, 0))
    order = torch.randperm(num_sequences, generator=torch.Generator().manual_seed(seed))
    check = torch.zeros(num_sequences, dtype=torch.bool)
    check[order[:count]] = True
    return check


def ridge_towards(
    stats: LeastSquaresStats, current_weight: Tensor, strengths: Sequence[float]
) -> Iterator[Tensor]:
    """W(s)^T = (G + lam I)^-1 (C + lam W0^T), lam = s * mean(diag(G)), for every s > 0, float64 (d, k), one
    Cholesky factorisation each, yielded one at a time. One eigendecomposition of G shared by every s
    rose 3.2 k x k matrices above G at its peak (its copy of G, its vectors and LAPACK's workspace: 232 MB
    at k = 3,072, at the peak of a wide FFN's tuning) and took longer on the default grid of seven: alone,
    1.7x the time at k = 1,305 and 3,072."""
    w0 = current_weight.detach().to(stats.cross).T  # (k, d)
    mean_diagonal = float(stats.gram.diagonal().mean())
    for strength in strengths:
        lam = strength * mean_diagonal
        system = functools.partial(ridged, stats.gram, lam)
        yield solve_normal_equations(system, stats.cross + lam * w0)[0].T


def solve_towards_current(
    fit: LeastSquaresStats,
    check: LeastSquaresStats,
    current_weight: Tensor,
    strengths: Sequence[float],
    check_loss: Callable[[Tensor], float] | None = None,
) -> tuple[Tensor, TuneReport]:
    """The output projection (d, k) that cannot hurt on held-out sequences, in current_weight's dtype/device.

    fit, check: the statistics of the two parts of the sample; strengths: relative ridge strengths s > 0.
    The strength (or no tuning) with the lowest check error is chosen on the fit part, then the weight is
    refitted on fit + check at that strength (Cholesky; lstsq fallback). The whole sample's errors are the
    two parts' sums, and its normal equations are built only for that last solve (k x k float64 matrices
    are the peak memory of a wide FFN's tuning). check_loss(weight), when given, replaces the check part's
    reconstruction error as the criterion (the head's tuning judges its candidates by the logits)."""
    if not strengths or not all(math.isfinite(s) and s > 0 for s in strengths):
        raise ValueError(f"strengths must be finite numbers > 0, got {strengths!r}")
    check_before = check.error(current_weight)  # also checks current_weight's shape
    error_before = fit.error(current_weight) + check_before
    if check_loss is None:
        check_loss = check.error
    else:
        check_before = check_loss(current_weight)
    target_sq = fit.target_sq + check.target_sq

    def unchanged(solver: str, rejected: bool = False) -> tuple[Tensor, TuneReport]:
        report = TuneReport(
            error_before,
            error_before,
            target_sq,
            0.0,
            solver,
            rejected,
            None,
            check_before,
            check_before,
        )
        return current_weight.clone(), report

    if fit.num_features == 0:
        return unchanged("none")
    if error_before <= EXACT_RELATIVE_ERROR * target_sq:
        return unchanged("exact")
    if fit.num_rows == 0 or check.num_rows == 0 or float(fit.gram.diagonal().mean()) <= 0:
        return unchanged("no-check")  # nothing to fit, or nothing to check it on: tuning could hurt
    check_errors = [check_loss(w) for w in ridge_towards(fit, current_weight, strengths)]
    best = min(range(len(strengths)), key=check_errors.__getitem__)
    if not check_errors[best] < check_before:
        return unchanged("check-rejected", rejected=True)

    lam = strengths[best] * float((fit.gram.diagonal() + check.gram.diagonal()).mean())
    right = fit.cross + check.cross + lam * current_weight.detach().to(fit.cross).T

    def whole_sample_system() -> Tensor:
        system = fit.gram + check.gram
        system.diagonal().add_(lam)
        return system

    solution, solver = solve_normal_equations(whole_sample_system, right)
    new_weight = solution.T.to(device=current_weight.device, dtype=current_weight.dtype).contiguous()
    report = TuneReport(
        error_before,
        fit.error(new_weight) + check.error(new_weight),
        target_sq,
        lam,
        solver,
        False,
        strengths[best],
        check_before,
        check_errors[best],
    )
    if not torch.isfinite(new_weight).all():
        logger.warning("Tuned output projection is not finite; keeping the current weight")
        return unchanged("not-finite", rejected=True)
    return new_weight, report
