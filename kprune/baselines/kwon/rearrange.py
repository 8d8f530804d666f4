"""Kwon et al., step 3: per-layer mask rearrangement with the layer's block of the empirical Fisher."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def fisher_objective(keep: Tensor, fisher: Tensor) -> float:
    """Second-order loss estimate of pruning the units where ``keep`` is False: 1_P^T F 1_P."""
    pruned = (~keep.bool()).double().to(fisher.device)
    return float(pruned @ fisher.double() @ pruned)


def rearrange_mask(keep: Tensor, fisher: Tensor) -> Tensor:
    """Same number of kept units, chosen greedily to lower ``fisher_objective`` (Kwon et al.'s rearrangement).

    Starting from the pruned set P of ``keep``, the kept units are visited by increasing Fisher diagonal;
    each is added to P and then the unit of P whose removal leaves the smallest objective leaves it again
    (the newly added one on ties, so P only changes on a strict improvement). The objective therefore never
    increases. Each visit is one vectorised update of F 1_P.
    """
    keep = keep.bool().cpu()
    fisher = fisher.double().cpu()
    units = keep.numel()
    if fisher.shape != (units, units):
        raise ValueError(f"fisher must be ({units}, {units}), got {tuple(fisher.shape)}")
    if keep.all() or not keep.any():
        return keep.clone()
    diagonal = fisher.diagonal()
    in_pruned = ~keep
    row_sums = fisher[in_pruned].sum(0)  # (F 1_P)_i; F is symmetric, so rows serve as columns
    kept = keep.nonzero().flatten()
    visit = kept[torch.argsort(diagonal[kept], stable=True)]
    for unit in visit.tolist():
        in_pruned[unit] = True
        row_sums += fisher[unit]
        # objective(P \ {i}) = objective(P) - 2 (F 1_P)_i + F_ii
        removal = torch.where(in_pruned, diagonal - 2 * row_sums, math.inf)
        leaving = int(torch.argmin(removal))
        if removal[unit] <= removal[leaving]:
            leaving = unit
        in_pruned[leaving] = False
        row_sums -= fisher[leaving]
    return ~in_pruned
