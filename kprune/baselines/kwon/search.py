"""Kwon et al., step 2: the global mask search (the best head count, the rest of the budget in neurons)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from kprune.search import budget_limit


def search_heads_and_neurons(
    head_importance: Tensor,
    neuron_importance: Tensor,
    head_cost: float,
    neuron_cost: float,
    budget: float,
) -> tuple[Tensor, Tensor]:
    """Keep-masks (heads, neurons) of maximal total importance whose FLOPs fit ``budget``.

    For every head count h (0..all), the h most important heads plus as many of the most important neurons
    as the remaining budget allows; the best h wins (ties: fewer heads). Importances must be >= 0, which
    makes this the exact optimum over all subsets: every head costs ``head_cost``, every neuron
    ``neuron_cost``. Vectorised over h: two sorts and two cumulative sums.
    """
    for name, values in (("head_importance", head_importance), ("neuron_importance", neuron_importance)):
        if values.dim() != 1 or not torch.isfinite(values).all() or (values < 0).any():
            raise ValueError(f"{name} must be a 1-D tensor of finite values >= 0")
    if not (head_cost > 0 and neuron_cost > 0 and math.isfinite(budget) and budget >= 0):
        raise ValueError("unit costs must be > 0 and the budget a finite number >= 0")
    head_sorted, head_order = torch.sort(head_importance.double().cpu(), descending=True, stable=True)
    neuron_sorted, neuron_order = torch.sort(neuron_importance.double().cpu(), descending=True, stable=True)
    zero = torch.zeros(1, dtype=torch.float64)
    head_total = torch.cat([zero, head_sorted.cumsum(0)])  # importance of the best h heads, h = 0..H
    neuron_total = torch.cat([zero, neuron_sorted.cumsum(0)])

    limit = budget_limit(budget)
    head_counts = torch.arange(head_importance.numel() + 1, dtype=torch.float64)
    left = limit - head_counts * head_cost
    neuron_counts = torch.floor(left / neuron_cost).clamp(0, neuron_importance.numel())
    neuron_counts -= (neuron_counts * neuron_cost > left).double()  # floor round-off
    neuron_counts = neuron_counts.clamp_min(0).long()
    total = head_total + neuron_total[neuron_counts]
    total[left < 0] = -math.inf  # the heads alone do not fit
    best = int(torch.argmax(total))  # first maximum: the fewest heads among ties

    keep_heads = torch.zeros(head_importance.numel(), dtype=torch.bool)
    keep_heads[head_order[:best]] = True
    keep_neurons = torch.zeros(neuron_importance.numel(), dtype=torch.bool)
    keep_neurons[neuron_order[: int(neuron_counts[best])]] = True
    return keep_heads, keep_neurons
