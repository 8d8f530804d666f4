"""The K-prune iteration (Algorithm 1 of the paper) as explicit steps over explicit tensors.

For sublayer t = 0 .. 2L-1, bottom-up:

    knowledge = measure(t)            every unit of sublayers >= t, on the current (partly pruned) student
    keep      = search(t, knowledge)  global ranking under the FLOPs left; applied to sublayer t only
    weight    = tune(t, keep)         least-squares output projection against the teacher's residual sum
    prune(t, keep, weight)            physical removal; the FLOPs kept leave the budget
    advance(t)                        the student's (and teacher's) hidden states move to sublayer t+1

The student's input to sublayer t is carried from step to step, so nothing is recomputed from the
embeddings. Each step takes and returns tensors, so a pipeline can persist and resume between them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from kprune.arch import ATTENTION
from kprune.config import KPruneConfig
from kprune.flops import head_flops, neuron_flops
from kprune.knowledge import Knowledge, measure_knowledge, unit_scores
from kprune.search import search_mask
from kprune.sublayer import Sublayer, sublayers
from kprune.tune import LeastSquaresStats, TuneReport, solve_output_projection

logger = logging.getLogger(__name__)

Batches = Sequence[dict[str, torch.Tensor]]


@dataclass
class StepRecord:
    """What one iteration decided and how well the tuning reconstructed the teacher."""

    sublayer: int
    layer: int
    kind: str
    units_before: int
    units_kept: int
    kept_units: list[int]
    flops_kept: float
    budget_left: float  # FLOPs the sublayers above may still use
    predictive_lost: float  # knowledge of the pruned units
    representational_lost: float
    error_before: float  # ||F W^T - R||^2 without tuning
    error_after: float
    relative_error_before: float
    relative_error_after: float
    seconds: float


@dataclass
class PruneState:
    """What the iteration carries from sublayer t to t+1."""

    sublayer: int
    student_hidden: list[torch.Tensor]  # the student's input to `sublayer`, per batch
    budget_left: float  # FLOPs the sublayers >= `sublayer` may use
    steps: list[StepRecord] = field(default_factory=list)


def unit_flops(sub: Sublayer, seq_len: float) -> float:
    hidden = sub.output.out_features
    if sub.kind == ATTENTION:
        return head_flops(hidden, sub.width, seq_len)
    return neuron_flops(hidden, seq_len)


def step_generator(seed: int, t: int) -> torch.Generator:
    """The random generator of step t: a function of the seed and the step only."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, t]).generate_state(1)[0]))


def measure(
    student: nn.Module,
    t: int,
    student_hidden: Sequence[torch.Tensor],
    batches: Batches,
    teacher_logits: Sequence[torch.Tensor],
    task: str,
    config: KPruneConfig,
) -> list[Knowledge]:
    """Knowledge of every unit of sublayers t, t+1, ..., 2L-1.

    The random projections (QA, many classes) are seeded by (config.seed, t) alone, so a step gives the
    same result whether the run went straight through or resumed at t.
    """
    return measure_knowledge(
        student,
        sublayers(student)[t:],
        student_hidden,
        [batch["attention_mask"] for batch in batches],
        teacher_logits,
        task,
        temperature=config.temperature,
        projections=config.projections,
        generator=step_generator(config.seed, t),
        predictive=config.predictive_knowledge,
    )


def search(
    student: nn.Module,
    t: int,
    knowledge: Sequence[Knowledge],
    budget_left: float,
    seq_len: float,
    config: KPruneConfig,
) -> torch.Tensor:
    """Keep-mask of sublayer t from the global ranking of all units of sublayers >= t."""
    subs = sublayers(student)[t:]
    scores, costs = [], []
    for sub, known in zip(subs, knowledge, strict=True):
        cost = unit_flops(sub, seq_len)
        scores.append(
            unit_scores(known, cost, sub.kind == ATTENTION, config.lam_pred, config.lam_rep, config.mu)
        )
        costs.append(torch.full((sub.num_units,), cost, dtype=torch.float64))
    keep = search_mask(torch.cat(scores), torch.cat(costs), max(budget_left, 0.0))
    return keep[: subs[0].num_units]


@torch.no_grad()
def teacher_step(
    teacher: nn.Module, t: int, teacher_hidden: Sequence[torch.Tensor], batches: Batches
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The teacher's pre-LayerNorm residual sums at sublayer t (tuning targets) and its input to t+1."""
    sub = Sublayer(teacher, t)
    targets, next_hidden = [], []
    for hidden, batch in zip(teacher_hidden, batches, strict=True):
        target = sub.residual_sum(hidden, sub.features(hidden, batch["attention_mask"]))
        targets.append(target)
        next_hidden.append(sub.layer_norm(target))
    return targets, next_hidden


@torch.no_grad()
def tune(
    student: nn.Module,
    t: int,
    keep: torch.Tensor,
    student_hidden: Sequence[torch.Tensor],
    batches: Batches,
    targets: Sequence[torch.Tensor],
    config: KPruneConfig,
) -> tuple[torch.Tensor | None, TuneReport]:
    """Least-squares output projection of sublayer t's kept units (None when tuning is off)."""
    sub = Sublayer(student, t)
    keep = keep.to(sub.output.weight.device)
    columns = keep.repeat_interleave(sub.width)
    bias = sub.output.bias if sub.output.bias is not None else 0.0
    stats = LeastSquaresStats(int(columns.sum()), sub.output.out_features, device=sub.output.weight.device)
    for hidden, batch, target in zip(student_hidden, batches, targets, strict=True):
        valid = batch["attention_mask"].bool()
        features = sub.features(hidden, batch["attention_mask"])[:, :, keep].flatten(2)
        stats.add(features[valid], (target - hidden - bias)[valid])
    current = sub.output.weight[:, columns]
    if not config.tune_weights:
        error = stats.error(current)
        return None, TuneReport(error, error, stats.target_sq, 0.0, "none")
    return solve_output_projection(stats, current, ridge=config.ridge)


@torch.no_grad()
def advance(student: nn.Module, t: int, student_hidden: Sequence[torch.Tensor], batches: Batches):
    """The (pruned) student's output of sublayer t, i.e. its input to sublayer t+1."""
    sub = Sublayer(student, t)
    return [
        sub.forward(hidden, batch["attention_mask"])
        for hidden, batch in zip(student_hidden, batches, strict=True)
    ]


def prune_sublayer(
    student: nn.Module,
    t: int,
    keep: torch.Tensor,
    weight: torch.Tensor | None,
    knowledge: Sequence[Knowledge],
    report: TuneReport,
    budget_left: float,
    seq_len: float,
    seconds: float,
) -> StepRecord:
    """Physically remove sublayer t's pruned units (setting its tuned output weight); what was decided."""
    sub = Sublayer(student, t)
    units_before, cost = sub.num_units, unit_flops(sub, seq_len)
    sub.keep_units(keep, weight)
    kept, pruned = int(keep.sum()), ~keep.cpu()
    return StepRecord(
        sublayer=t,
        layer=sub.layer,
        kind=sub.kind,
        units_before=units_before,
        units_kept=kept,
        kept_units=keep.nonzero().flatten().tolist(),
        flops_kept=kept * cost,
        budget_left=budget_left - kept * cost,
        predictive_lost=float(knowledge[0].predictive[pruned].sum()),
        representational_lost=float(knowledge[0].representational[pruned].sum()),
        error_before=report.error_before,
        error_after=report.error_after,
        relative_error_before=report.relative_error_before,
        relative_error_after=report.relative_error_after,
        seconds=seconds,
    )


def run_step(
    state: PruneState,
    student: nn.Module,
    batches: Batches,
    teacher_logits: Sequence[torch.Tensor],
    targets: Sequence[torch.Tensor],
    task: str,
    seq_len: float,
    config: KPruneConfig,
) -> PruneState:
    """One full iteration on sublayer ``state.sublayer``; returns the state for the next sublayer.

    ``targets`` are the teacher's pre-LayerNorm residual sums at this sublayer (see ``teacher_step``).
    """
    start = time.perf_counter()
    t = state.sublayer
    knowledge = measure(student, t, state.student_hidden, batches, teacher_logits, task, config)
    keep = search(student, t, knowledge, state.budget_left, seq_len, config)
    weight, report = tune(student, t, keep, state.student_hidden, batches, targets, config)
    record = prune_sublayer(
        student, t, keep, weight, knowledge, report, state.budget_left, seq_len, time.perf_counter() - start
    )
    student_next = advance(student, t, state.student_hidden, batches)
    logger.info(
        "sublayer %d (layer %d %s): kept %d/%d units, reconstruction error %.4g -> %.4g (relative), %.1fs",
        t,
        record.layer,
        record.kind,
        record.units_kept,
        record.units_before,
        record.relative_error_before,
        record.relative_error_after,
        record.seconds,
    )
    return PruneState(t + 1, student_next, record.budget_left, [*state.steps, record])
