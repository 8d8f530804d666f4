"""Knowledge-preserving mask search: keep the best-scored units that fit a FLOPs budget.

One stable sort and one cumulative sum replace the reference code's quadratic loop over thresholds.
"""

import math

import torch
from torch import Tensor

# Relative slack on the budget so that float round-off in the cumulative sum cannot drop a unit that fits
# exactly (e.g. a budget computed as the sum of the kept units' FLOPs).
BUDGET_RELATIVE_TOLERANCE = 1e-9


def budget_limit(budget: float) -> float:
    """The most a search may keep for ``budget``: the budget plus its round-off slack."""
    return budget * (1 + BUDGET_RELATIVE_TOLERANCE)


def search_mask(scores: Tensor, unit_flops: Tensor, budget: float) -> Tensor:
    """Keep-mask (bool, original order) of the longest score-ranked prefix whose FLOPs fit the budget.

    Units are ranked by score, descending, ties broken by lower index first. The kept set is the longest
    prefix of that ranking whose total FLOPs is <= budget_limit(budget); ranking stops
    at the first unit that does not fit (a threshold on the score, as in the paper, not a knapsack fill).
    """
    if scores.dim() != 1 or unit_flops.dim() != 1:
        raise ValueError(
            f"scores and unit_flops must be 1-D, got {tuple(scores.shape)} and {tuple(unit_flops.shape)}"
        )
    if scores.shape != unit_flops.shape:
        raise ValueError(
            f"scores and unit_flops must have the same length, got {scores.numel()} and {unit_flops.numel()}"
        )
    if torch.isnan(scores).any():
        raise ValueError("scores contain NaN")
    if not (torch.isfinite(unit_flops).all() and (unit_flops > 0).all()):
        raise ValueError("unit_flops must be finite and > 0")
    if not (math.isfinite(budget) and budget >= 0):
        raise ValueError(f"budget must be a finite number >= 0, got {budget!r}")

    ranking = torch.argsort(scores, descending=True, stable=True)
    cumulative_flops = torch.cumsum(unit_flops[ranking].to(torch.float64), dim=0)
    limit = budget_limit(budget)
    keep = torch.empty_like(scores, dtype=torch.bool)
    # All costs are > 0, so the cumulative sum never decreases and the ranks within the limit form a prefix.
    keep[ranking] = cumulative_flops <= limit
    return keep
