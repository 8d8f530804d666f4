"""Magnitude baseline: keep the heads and neurons with the largest weights per FLOP, no tuning.

Score of a head = sum of squared weights of its d_h rows of the query, key and value projections and of its
d_h columns of the output projection; score of a neuron = sum of squared weights of its up-projection row
and down-projection column (biases are not counted). Scores are divided by the unit's FLOPs and ranked
globally with kprune's mask search under the same budget as K-prune; the kept units are cut out unchanged.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Mapping

import torch
from torch import nn

from kprune.baselines.common import (
    check_flops_keep,
    model_batches,
    step_records,
    sublayer_cost,
    unit_costs,
)
from kprune.models import resolve_device
from kprune.record import PruneResult, build_record
from kprune.sample import resolve_seq_len
from kprune.search import search_mask
from kprune.sublayer import Sublayer, encoder_flops_of, sublayers

logger = logging.getLogger(__name__)

METHOD = "magnitude"


@torch.no_grad()
def weight_magnitudes(sub: Sublayer) -> torch.Tensor:
    """Sum of squared weights of each unit of a sublayer: (units,), float64."""
    # Rows of the input projections, grouped by unit: (units, width, d) -> one sum per unit.
    rows = sum(
        sub.part(name).weight.detach().double().pow(2).view(sub.num_units, sub.width, -1).sum((1, 2))
        for name in sub.input_parts
    )
    columns = sub.output_column_norms().double().sum(1)
    return (rows + columns).cpu()


def magnitude_prune(
    model: nn.Module,
    sample: Mapping[str, torch.Tensor] | None = None,
    flops_keep: float | None = None,
    *,
    seq_len: float | None = None,
    device: str | torch.device = "auto",
) -> PruneResult:
    """Prune to ``flops_keep`` of the encoder's FLOPs by weight magnitude per FLOP (no data, no tuning).

    sample: the tokenized sample (only its average length is used, as the FLOPs model's seq_len, so the
        budget means the same as in kprune.prune); may be None when ``seq_len`` is given.
    The model is not modified; the result is a physically smaller copy on ``device``.
    """
    if flops_keep is None:
        raise ValueError("flops_keep (fraction of FLOPs kept, in (0, 1]) is required")
    check_flops_keep(flops_keep)
    if sample is None and seq_len is None:
        raise ValueError("pass a sample or seq_len: the FLOPs model needs the average sequence length")
    started = time.perf_counter()
    device = resolve_device(device)
    seq_len = resolve_seq_len(seq_len, () if sample is None else sample["attention_mask"])
    pruned = copy.deepcopy(model).to(device).eval().requires_grad_(False)
    costs = unit_costs(pruned, seq_len)
    budget = flops_keep * encoder_flops_of(pruned, seq_len)

    subs = sublayers(pruned)
    magnitudes = [weight_magnitudes(sub) for sub in subs]
    scores = torch.cat([m / sublayer_cost(sub, costs) for sub, m in zip(subs, magnitudes, strict=True)])
    unit_flops = torch.cat(
        [torch.full((sub.num_units,), sublayer_cost(sub, costs), dtype=torch.float64) for sub in subs]
    )
    keep = search_mask(scores, unit_flops, budget).split([sub.num_units for sub in subs])
    lost = [float(m[~k].sum()) for m, k in zip(magnitudes, keep, strict=True)]
    steps = step_records(pruned, keep, costs, budget, lost=lost)
    for sub, sub_keep in zip(subs, keep, strict=True):
        sub.keep_units(sub_keep)

    batches = model_batches(model, sample, 32, torch.device("cpu"))[0] if sample is not None else []
    config = {"method": METHOD, "flops_keep": flops_keep, "seq_len": seq_len, "device": str(device)}
    record = build_record(
        model, pruned, config, batches, seq_len, budget, steps, time.perf_counter() - started
    )
    logger.info("magnitude kept %.1f%% of FLOPs (budget %.1f%%)", 100 * record.flops_kept, 100 * flops_keep)
    return PruneResult(pruned, record)
