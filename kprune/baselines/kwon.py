"""Kwon et al. 2022, "A Fast Post-Training Pruning Framework for Transformers" (Mask-Tuning), in kprune terms.

Every head and FFN neuron gets a mask variable m (1 = kept). With the task loss L on true labels:

1. **Fisher importance.** Per-example gradients g_n = dL_n/dm at m = 1 over the sample (2048 sequences
   by default); the importance of a unit is the empirical Fisher diagonal sum_n g_n[i]^2.
2. **Mask search.** Heads and neurons are ranked separately by importance. For every head count h, the
   h best heads are kept and the rest of the FLOPs budget is filled with the best neurons; the
   configuration with the largest total importance wins (an exact optimum, all units of a kind cost the same).
3. **Mask rearrangement.** Per layer and kind, the unit count stays but the choice of units is revised
   with the layer's block of the empirical Fisher, F = sum_n g_n g_n^T: removing the set P costs about
   1_P^T F 1_P (second order), and a greedy pass swaps units while that estimate decreases.
4. **Mask rescaling.** Sublayer by sublayer, bottom-up, each kept unit gets a scale s_i by least squares so
   that X_S + sum_i s_i W_i f_i + b reproduces the reconstruction target's pre-LayerNorm output
   X_T + Sub_T(X_T) over all sample tokens; X_S is the input of the pruned, already rescaled model.

The scaled masks are then baked into a physically smaller model with kprune's surgery (the scales multiply
the kept units' output-projection columns), so the result is evaluated exactly like K-prune's.

What follows the reference code (WoosukKwon/retraining-free-pruning) and what does not:

- The constraint is a fraction of FLOPs kept computed with kprune.flops (the reference's MAC model counts
  the same heads and neurons at half the value, so fractions agree) at the same seq_len as K-prune.
- The reconstruction target is, as in the reference code, the model pruned by the same search to the
  intermediate budget sqrt(flops_keep) (their two-step schedule); ``teacher_keep=1.0`` targets the unpruned
  model instead. Attention rescaling fits an extra constant offset over all outputs (discarded after the
  fit: LayerNorm removes it), the first layer's attention is not rescaled, the last FFN of a
  classification/regression model is fitted on the first ([CLS]) token only, and rescaling stops for the
  remaining sublayers as soon as a solution has a scale outside [-max_scale, max_scale] (reference: 10).
- Fisher gradients are per example (the paper's definition; the reference code squares mini-batch
  gradients). The reference solves the normal equations with LSMR, damped towards scale 1; here they
  are solved in float64 by Cholesky with a small relative ridge towards scale 1 (lstsq fallback).
- The search also considers zero heads and never lets the neuron count go negative (the reference loop
  starts at one head and would slice with a negative neuron count under tiny budgets).
- QA loss ignores padding positions (masked out of the start/end softmax), so it does not depend on batching.

Memory: the method computes on the model's own weights (a frozen twin that shares them; the pruned result
gets its own copy), the Fisher's backward passes and the rescaling's passes go through micro-batches of at
most ``micro_batch_tokens`` padded tokens, and the whole-sample data (per-example gradients, the student's
and the target's hidden states) are kept in temporary files on the CPU (``offload``, as kprune.prune).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kprune.arch import ATTENTION, CLASSIFICATION, QUESTION_ANSWERING, REGRESSION, encoder_input, task_of
from kprune.baselines.common import (
    apply_masks,
    check_flops_keep,
    masked_logits,
    masked_sublayer,
    model_batches,
    own_memory,
    shared_copy,
    step_records,
    subsample,
    unit_costs,
)
from kprune.memory import OffloadedStates, offload_default
from kprune.models import resolve_device
from kprune.record import PruneResult, build_record
from kprune.sample import resolve_seq_len
from kprune.search import BUDGET_RELATIVE_TOLERANCE
from kprune.sublayer import Sublayer, encoder_flops_of, sublayers

logger = logging.getLogger(__name__)

METHOD = "kwon2022-mask-tuning"
NUM_SAMPLES = 2048  # sequences used by Kwon et al.
MAX_SCALE = 10.0  # the reference stops rescaling when a scale leaves [-10, 10]
EXACT_RELATIVE_ERROR = 1e-10  # a sublayer already reproducing its target is left at scale 1
MICRO_BATCH_TOKENS = 256  # padded tokens per pass of the Fisher and of the rescaling: bounds their memory


# ---------------------------------------------------------------------------------------------- labels


def task_labels(model: nn.Module, sample: Mapping[str, Tensor], labels: Tensor | None = None) -> Tensor:
    """The sample's true labels as the loss needs them.

    classification: class ids (N,); regression: targets (N,); QA: (N, 2) start and end positions.
    Without ``labels`` they are read from the sample: "labels", or "start_positions" and "end_positions".
    """
    task = task_of(model)
    if labels is None:
        if task == QUESTION_ANSWERING and "start_positions" in sample and "end_positions" in sample:
            labels = torch.stack(
                [torch.as_tensor(sample["start_positions"]), torch.as_tensor(sample["end_positions"])], 1
            )
        elif "labels" in sample:
            labels = torch.as_tensor(sample["labels"])
        else:
            raise ValueError(
                "Kwon et al. need true labels: pass labels= (class ids for classification, float targets "
                "for regression, (N, 2) start/end positions for QA) or put them in the sample as 'labels' "
                "('start_positions' and 'end_positions' for QA)"
            )
    labels = torch.as_tensor(labels)
    num = torch.as_tensor(sample["attention_mask"]).shape[0]
    if task == CLASSIFICATION:
        if labels.is_floating_point() or labels.dim() != 1:
            raise ValueError(
                f"classification needs class ids of shape (N,), got {labels.dtype} {tuple(labels.shape)}"
            )
        if ((labels < 0) | (labels >= model.config.num_labels)).any():
            raise ValueError(f"class ids must be in [0, {model.config.num_labels})")
        labels = labels.long()
    elif task == REGRESSION:
        if labels.dim() == 2 and labels.shape[1] == 1:
            labels = labels[:, 0]
        if labels.dim() != 1:
            raise ValueError(f"regression needs targets of shape (N,), got {tuple(labels.shape)}")
        labels = labels.float()
    else:
        if labels.dim() != 2 or labels.shape[1] != 2 or labels.is_floating_point():
            raise ValueError(
                f"QA needs integer (start, end) positions of shape (N, 2), got {tuple(labels.shape)}"
            )
        labels = labels.long()
    if labels.shape[0] != num:
        raise ValueError(f"{labels.shape[0]} labels for {num} sequences")
    return labels


def task_loss(task: str, logits: Tensor, labels: Tensor, attention_mask: Tensor) -> Tensor:
    """Per-example task loss (B,) with true labels: cross-entropy, squared error, or QA's mean of the start
    and end cross-entropies over the sequence's real tokens (positions outside it are ignored, as in
    transformers)."""
    if task == CLASSIFICATION:
        return F.cross_entropy(logits, labels, reduction="none")
    if task == REGRESSION:
        return (logits.reshape(labels.shape[0], -1)[:, 0] - labels).pow(2)
    if task == QUESTION_ANSWERING:
        valid = attention_mask.bool()
        logits = logits.masked_fill(~valid[:, :, None], torch.finfo(logits.dtype).min)
        lengths = valid.sum(1, keepdim=True)
        positions = labels.masked_fill((labels < 0) | (labels >= lengths), -100)
        losses = [
            F.cross_entropy(logits[..., end], positions[:, end], ignore_index=-100, reduction="none")
            for end in (0, 1)
        ]
        return (losses[0] + losses[1]) / 2
    raise ValueError(f"unknown task {task!r}")


# ---------------------------------------------------------------------------------------------- Fisher


def micro_batches(rows: int, length: int, max_tokens: int) -> list[slice]:
    """Consecutive row slices of a (rows, length) batch with at most ``max_tokens`` padded tokens each (at
    least one row)."""
    step = max(1, max_tokens // max(length, 1))
    return [slice(start, min(start + step, rows)) for start in range(0, rows, step)]


def mask_gradients(
    model: nn.Module,
    batches: Sequence[Mapping[str, Tensor]],
    label_batches: Sequence[Tensor],
    max_tokens: int = MICRO_BATCH_TOKENS,
    offload: bool = False,
) -> Sequence[Tensor]:
    """Per-example gradients of the task loss w.r.t. every unit's mask at 1: per sublayer, one (N, units)
    float32 CPU tensor, rows in batch order.

    One backward pass per micro-batch of at most ``max_tokens`` padded tokens (each example has its own
    mask variables, so the split changes nothing but round-off), which bounds the autograd graph: it
    holds about 20 activations of the hidden or FFN width per token and layer, some 0.5 MB per token on
    a BERT-base, so a whole batch's graph would dominate the memory. With ``offload`` the gradients go to
    a temporary file (kprune.memory) as they come, and indexing the result by sublayer reads that
    sublayer's back (call its ``close`` when done); otherwise they are filled into tensors in RAM.
    """
    pieces = _gradient_pieces(model, batches, label_batches, max_tokens)
    subs = sublayers(model)
    if offload:
        return OffloadedGradients(OffloadedStates(g for grads in pieces for g in grads), len(subs))
    total = sum(int(batch["attention_mask"].shape[0]) for batch in batches)
    gradients = [torch.zeros(total, sub.num_units, dtype=torch.float32) for sub in subs]
    start = 0
    for grads in pieces:
        count = grads[0].shape[0]
        for store, grad in zip(gradients, grads, strict=True):
            store[start : start + count] = grad
        start += count
    return gradients


def _gradient_pieces(
    model: nn.Module,
    batches: Sequence[Mapping[str, Tensor]],
    label_batches: Sequence[Tensor],
    max_tokens: int,
) -> Iterator[list[Tensor]]:
    """Per micro-batch, in batch order: every sublayer's per-example mask gradients (rows, units), float32
    on the CPU (zeros where no unit of a sublayer affects the loss)."""
    task = task_of(model)
    subs = sublayers(model)
    dtype = next(model.parameters()).dtype
    for batch, labels in zip(batches, label_batches, strict=True):
        for rows in micro_batches(*batch["attention_mask"].shape, max_tokens):
            micro = {name: value[rows] for name, value in batch.items()}
            count = rows.stop - rows.start
            with torch.enable_grad():  # not across the yield: the caller keeps its own grad mode
                masks = [
                    torch.ones(count, sub.num_units, dtype=dtype, device=labels.device, requires_grad=True)
                    for sub in subs
                ]
                logits = masked_logits(model, micro, masks)
                loss = task_loss(task, logits, labels[rows], micro["attention_mask"]).sum()
                grads = torch.autograd.grad(loss, masks, allow_unused=True)
            del logits, loss, masks
            yield [
                torch.zeros(count, sub.num_units, dtype=torch.float32)
                if grad is None
                else grad.detach().float().cpu()
                for sub, grad in zip(subs, grads, strict=True)
            ]


class OffloadedGradients(Sequence):
    """Per-example mask gradients in a temporary file, one slot per (micro-batch, sublayer); indexing by
    sublayer reads its (N, units) tensor back."""

    def __init__(self, states: OffloadedStates, num_sublayers: int) -> None:
        self.states = states
        self.num_sublayers = num_sublayers

    def __len__(self) -> int:
        return self.num_sublayers

    def __getitem__(self, index: int) -> Tensor:
        if not 0 <= index < self.num_sublayers:
            raise IndexError(index)
        slots = range(index, len(self.states), self.num_sublayers)
        return torch.cat([self.states[slot] for slot in slots])

    def close(self) -> None:
        self.states.close()


def fisher_diagonal(gradients: Tensor) -> Tensor:
    """Empirical Fisher diagonal sum_n g_n^2 of per-example gradients (N, units): (units,) float64."""
    return gradients.double().pow(2).sum(0)


def fisher_block(gradients: Tensor) -> Tensor:
    """Empirical Fisher block sum_n g_n g_n^T of one sublayer's units: (units, units) float64."""
    gradients = gradients.double()
    return gradients.T @ gradients


# ---------------------------------------------------------------------------------------------- search


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

    limit = budget * (1 + BUDGET_RELATIVE_TOLERANCE)
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


# ---------------------------------------------------------------------------------------------- rearrange


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


# ---------------------------------------------------------------------------------------------- rescale


class ScaleStats:
    """Normal equations of min_{s, o} sum over rows ||sum_i s_i W_i f_i + o 1 - r||^2 for one sublayer's
    kept units (W_i: unit i's output columns, f_i its features, r the target, o an optional offset).

    Accumulated over batches in float64: the features' Gram matrix, cross[i] = sum <W_i f_i, r>,
    the feature sums, the sum, count and squared norm of r's entries. Then
    gram[i, j] = sum <W_i f_i, W_j f_j> = blockwise sums of (W^T W) * (F^T F) and
    offset_gram[i] = sum <W_i f_i, 1>.
    """

    def __init__(self, weight: Tensor, width: int) -> None:
        """weight: the kept units' output columns (d, units * width)."""
        self.weight = weight.detach().double()
        self.width = width
        self.units = self.weight.shape[1] // width
        zeros = dict(dtype=torch.float64, device=weight.device)
        self.feature_gram = torch.zeros(self.weight.shape[1], self.weight.shape[1], **zeros)
        self.feature_sum = torch.zeros(self.weight.shape[1], **zeros)
        self.cross = torch.zeros(self.units, **zeros)
        self.target_sum = 0.0
        self.entries = 0
        self.target_sq = 0.0
        self.rows = 0
        self._gram: Tensor | None = None

    def add(self, features: Tensor, target: Tensor) -> None:
        """One batch of rows: features (n, units, width) and target (n, d)."""
        rows = features.shape[0]
        self._gram = None
        flat = features.reshape(rows, -1).double()
        target = target.double()
        self.feature_gram += flat.T @ flat
        self.feature_sum += flat.sum(0)
        self.cross += (flat * (target @ self.weight)).view(rows, self.units, self.width).sum((0, 2))
        self.target_sum += float(target.sum())
        self.entries += target.numel()
        self.target_sq += float(target.square().sum())
        self.rows += rows

    @property
    def gram(self) -> Tensor:
        if self._gram is None:  # cached until the next add
            products = (self.weight.T @ self.weight) * self.feature_gram
            self._gram = products.view(self.units, self.width, self.units, self.width).sum((1, 3))
        return self._gram

    @property
    def offset_gram(self) -> Tensor:
        return (self.feature_sum * self.weight.sum(0)).view(self.units, self.width).sum(1)

    def error(self, scales: Tensor, offset: bool = False) -> float:
        """||sum_i s_i W_i f_i (+ o) - r||^2; with ``offset`` at the best constant o for these scales."""
        s = scales.double().to(self.cross.device)
        value = float(s @ self.gram @ s - 2 * s @ self.cross) + self.target_sq
        if offset and self.entries > 0:
            residual_sum = float(s @ self.offset_gram) - self.target_sum  # sum of the residual's entries
            value -= residual_sum**2 / self.entries
        return max(value, 0.0)


def solve_scales(stats: ScaleStats, ridge: float = 1e-6, offset: bool = False) -> tuple[Tensor, str]:
    """Least-squares scales (units,) float64 and the solver used.

    Solves the normal equations in float64, with ``offset`` a free constant added to every output entry
    (discarded), and a relative ridge lam = ridge * mean(diag(gram)) pulling the scales towards 1
    (the reference damps its LSMR solve towards 1 too); ridge=0 is plain least squares.
    """
    units = stats.units
    if units == 0:
        return torch.zeros(0, dtype=torch.float64), "none"
    gram = stats.gram
    mean_diagonal = float(gram.diagonal().mean())
    lam = ridge * mean_diagonal if mean_diagonal > 0 else 0.0
    system = gram + lam * torch.eye(units, dtype=torch.float64, device=gram.device)
    rhs = stats.cross + lam
    if offset:
        column = stats.offset_gram[:, None]
        corner = torch.tensor([[float(stats.entries)]], dtype=torch.float64, device=system.device)
        system = torch.cat([torch.cat([system, column], 1), torch.cat([column.T, corner], 1)], 0)
        rhs = torch.cat([rhs, rhs.new_tensor([stats.target_sum])])
    factor, info = torch.linalg.cholesky_ex(system)
    if int(info) == 0:
        solution, solver = torch.cholesky_solve(rhs[:, None], factor)[:, 0], "cholesky"
    else:
        logger.warning("rescaling: normal equations not positive definite (%d units); using lstsq", units)
        solution = torch.linalg.lstsq(system.cpu(), rhs.cpu()[:, None], rcond=1e-12, driver="gelsd")
        solution, solver = solution.solution[:, 0].to(system.device), "lstsq"
    return solution[:units], solver


@dataclass
class RescaleReport:
    """How one sublayer was rescaled. status: "rescaled", "exact" (already reproduces its target),
    "no-units", "first-attention" (not rescaled, as in the reference), "out-of-bounds" (a scale outside
    [-max_scale, max_scale]: kept at 1, and rescaling stopped), "stopped" (after an out-of-bounds one) or
    "off" (rescaling switched off).
    Errors are ||pruned output - target||^2 before (scales 1) and after; for attention they are taken
    up to the best constant offset, which is what the fit minimises (LayerNorm removes such an offset)."""

    status: str
    error_before: float = float("nan")
    error_after: float = float("nan")
    target_sq: float = float("nan")
    solver: str = "none"
    rows: int = 0  # token rows of the fit (only [CLS] rows for a classifier's last FFN)


@torch.no_grad()
def rescale_masks(
    model: nn.Module,
    keeps: Sequence[Tensor],
    target_keeps: Sequence[Tensor],
    batches: Sequence[Mapping[str, Tensor]],
    ridge: float = 1e-6,
    max_scale: float = MAX_SCALE,
    max_tokens: int = MICRO_BATCH_TOKENS,
    offload: bool = False,
) -> tuple[list[Tensor], list[RescaleReport]]:
    """Scaled masks per sublayer (0 for pruned units, the least-squares scale for kept ones) and reports.

    The reconstruction target is ``model`` with only ``target_keeps`` units (0/1 masks); the student is
    ``model`` with ``keeps``, rescaled sublayer by sublayer, bottom-up, each fit on the inputs produced by
    the already rescaled sublayers below it.

    Memory: the only whole-sample data are the student's and the target's hidden states, in RAM or with
    ``offload`` in temporary files (kprune.memory, as K-prune's). Per sublayer, one pass over the
    batches computes the target's pre-LayerNorm outputs, adds them to the normal equations and advances
    the target's hidden states; a second pass advances the student's once the scales are known. Both go
    through micro-batches of at most ``max_tokens`` padded tokens, so every temporary has about the same,
    bounded size (the temporaries of whole length-sorted batches grow batch after batch, which fragments
    glibc's heap).
    """
    pieces = [
        {name: value[rows] for name, value in batch.items()}
        for batch in batches
        for rows in micro_batches(*batch["attention_mask"].shape, max_tokens)
    ]
    attention_masks = [piece["attention_mask"] for piece in pieces]
    shapes = [tuple(mask.shape) for mask in attention_masks]
    student = _states((encoder_input(model, dict(piece)) for piece in pieces), shapes, offload)
    target = _states(iter(student), shapes, offload)
    try:
        return _rescale(model, keeps, target_keeps, student, target, attention_masks, ridge, max_scale)
    finally:
        for states in (student, target):
            if isinstance(states, OffloadedStates):
                states.close()


class StateBuffer:
    """Whole-sample hidden states in RAM, in one buffer: indexing gives a micro-batch's (B, S, d) view and
    assigning copies into it, so advancing the states allocates nothing that outlives a micro-batch.
    (A new tensor per micro-batch and sublayer, interleaved with the temporaries, fragments glibc's heap:
    the rescaling of 20k tokens on a BERT-base peaked at 2.2 GB RSS instead of 1.26 GB.)"""

    def __init__(self, states: Iterable[Tensor], shapes: Sequence[tuple[int, int]]) -> None:
        """states: one (B, S, d) tensor per entry of shapes (B, S), copied in."""
        sizes = [rows * length for rows, length in shapes]
        self.views: list[Tensor] = []
        for number, state in enumerate(states):
            if number == 0:
                buffer = state.new_empty(sum(sizes), state.shape[-1])
                parts = buffer.split(sizes)
                self.views = [part.view(*shape, -1) for part, shape in zip(parts, shapes, strict=True)]
            self[number] = state

    def __len__(self) -> int:
        return len(self.views)

    def __getitem__(self, index: int) -> Tensor:
        return self.views[index]

    def __setitem__(self, index: int, state: Tensor) -> None:
        if state.shape != self.views[index].shape:
            raise ValueError(f"state {index} is {tuple(self.views[index].shape)}, got {tuple(state.shape)}")
        self.views[index].copy_(state)

    def __iter__(self) -> Iterator[Tensor]:
        return iter(self.views)


HiddenStates = StateBuffer | OffloadedStates  # one (B, S, d) tensor per micro-batch


def _states(states: Iterable[Tensor], shapes: Sequence[tuple[int, int]], offload: bool) -> HiddenStates:
    return OffloadedStates(states) if offload else StateBuffer(states, shapes)


def _rescale(
    model: nn.Module,
    keeps: Sequence[Tensor],
    target_keeps: Sequence[Tensor],
    student: HiddenStates,
    target: HiddenStates,
    attention_masks: Sequence[Tensor],
    ridge: float,
    max_scale: float,
) -> tuple[list[Tensor], list[RescaleReport]]:
    """rescale_masks on the micro-batches' hidden states; each slot is overwritten as its states advance."""
    subs = sublayers(model)
    task = task_of(model)
    masks = [keep.to(torch.float64).clone() for keep in keeps]
    reports: list[RescaleReport] = []
    dtype = student[0].dtype
    stopped = False
    for sub, keep, target_keep in zip(subs, keeps, target_keeps, strict=True):
        device = sub.output.weight.device
        target_mask = target_keep.to(device=device, dtype=dtype)
        kept = keep.nonzero().flatten()
        if stopped:
            status = "stopped"
        elif kept.numel() == 0:
            status = "no-units"
        elif sub.kind == ATTENTION and sub.layer == 0:
            status = "first-attention"
        else:
            status = None
        cls_only = task != QUESTION_ANSWERING and sub.index == len(subs) - 1
        stats = _new_scale_stats(sub, kept) if status is None else None
        for number, attention_mask in enumerate(attention_masks):
            residual = masked_sublayer(sub, target[number], attention_mask, target_mask)[0]
            if stats is not None:
                _add_scale_rows(stats, sub, kept, student[number], residual, attention_mask, cls_only)
            target[number] = sub.layer_norm(residual)
        if stats is None:
            reports.append(RescaleReport(status))
        else:
            offset = sub.kind == ATTENTION
            ones = torch.ones(kept.numel(), dtype=torch.float64)
            before = stats.error(ones, offset)
            if before <= EXACT_RELATIVE_ERROR * stats.target_sq:
                reports.append(RescaleReport("exact", before, before, stats.target_sq, rows=stats.rows))
            else:
                scales, solver = solve_scales(stats, ridge, offset)
                scales = scales.cpu()
                if torch.isfinite(scales).all() and scales.abs().max() <= max_scale:
                    masks[sub.index][kept] = scales
                    after = stats.error(scales, offset)
                    reports.append(
                        RescaleReport("rescaled", before, after, stats.target_sq, solver, stats.rows)
                    )
                else:
                    logger.warning(
                        "rescaling sublayer %d: a scale is outside [-%g, %g] (largest |s| = %.3g); "
                        "it and every sublayer above keep scale 1, as in the reference code",
                        sub.index,
                        max_scale,
                        max_scale,
                        float(scales.abs().max()),
                    )
                    reports.append(
                        RescaleReport("out-of-bounds", before, before, stats.target_sq, solver, stats.rows)
                    )
                    stopped = True
            del stats  # before the next sublayer's are allocated
        mask = masks[sub.index].to(device=device, dtype=dtype)
        for number, attention_mask in enumerate(attention_masks):
            student[number] = masked_sublayer(sub, student[number], attention_mask, mask)[1]
    return masks, reports


def _new_scale_stats(sub: Sublayer, kept: Tensor) -> ScaleStats:
    """Empty normal equations of the scales of one sublayer's ``kept`` units."""
    columns = torch.zeros(sub.num_units, dtype=torch.bool, device=kept.device)
    columns[kept] = True
    columns = columns.repeat_interleave(sub.width).to(sub.output.weight.device)
    return ScaleStats(sub.output.weight[:, columns], sub.width)


def _add_scale_rows(
    stats: ScaleStats,
    sub: Sublayer,
    kept: Tensor,
    hidden: Tensor,
    residual: Tensor,
    attention_mask: Tensor,
    cls_only: bool,
) -> None:
    """One batch's rows of the normal equations: its real tokens ([CLS] only if cls_only), the student's
    features of the kept units against the target's residual minus the student's input and the bias."""
    bias = sub.output.bias if sub.output.bias is not None else 0.0
    rows = attention_mask.bool()
    if cls_only:
        rows = torch.zeros_like(rows)
        rows[:, 0] = True
    features = sub.features(hidden, attention_mask)[:, :, kept.to(hidden.device)]
    stats.add(features[rows], (residual - hidden - bias)[rows])


# ---------------------------------------------------------------------------------------------- the run


@dataclass(frozen=True)
class KwonConfig:
    """Options of Kwon et al.'s method.

    flops_keep: fraction of FLOPs kept, in (0, 1] (the reference's ``--constraint``), with kprune's FLOPs
        model at ``seq_len`` (None: the sample's average length, as kprune.prune).
    num_samples: sequences used (a seeded random subset when the sample is larger; None = all).
    teacher_keep: FLOPs fraction of the rescaling target; None = sqrt(flops_keep) as in the reference
        code, 1.0 = the unpruned model.
    rearrange, rescale: switch the two refinement steps (for ablations).
    ridge: relative ridge of the rescaling least squares, towards scale 1; max_scale: bound on the scales.
    batch_size: sequences per batch; seed: of the subset of the sample.
    micro_batch_tokens: padded tokens per pass of the Fisher gradients and of the rescaling (a batch is
        split into row slices of at most this many tokens, at least one row); bounds the memory of the
        autograd graph and of the temporaries, and changes nothing but round-off.
    """

    flops_keep: float
    seq_len: float | None = None
    num_samples: int | None = NUM_SAMPLES
    teacher_keep: float | None = None
    rearrange: bool = True
    rescale: bool = True
    ridge: float = 1e-6
    max_scale: float = MAX_SCALE
    batch_size: int = 32
    seed: int = 0
    micro_batch_tokens: int = MICRO_BATCH_TOKENS

    def __post_init__(self) -> None:
        check_flops_keep(self.flops_keep)
        if self.teacher_keep is not None:
            check_flops_keep(self.teacher_keep)
            if self.teacher_keep < self.flops_keep:
                raise ValueError(
                    f"teacher_keep ({self.teacher_keep}) must be >= flops_keep ({self.flops_keep})"
                )
        if self.seq_len is not None and not (math.isfinite(self.seq_len) and self.seq_len > 0):
            raise ValueError(f"seq_len must be a finite number > 0, got {self.seq_len!r}")
        if self.num_samples is not None and self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1 or None, got {self.num_samples}")
        if not (
            self.ridge >= 0 and self.max_scale > 0 and self.batch_size >= 1 and self.micro_batch_tokens >= 1
        ):
            raise ValueError("need ridge >= 0, max_scale > 0, batch_size >= 1 and micro_batch_tokens >= 1")

    @property
    def target_keep(self) -> float:
        return math.sqrt(self.flops_keep) if self.teacher_keep is None else self.teacher_keep

    def to_dict(self) -> dict:
        return {"method": METHOD, **asdict(self)}


@dataclass
class KwonMasks:
    """Everything Kwon et al.'s method decided, per sublayer (attention of layer 0, FFN of layer 0, ...)."""

    masks: list[Tensor]  # final mask values: 0 = pruned, else the unit's scale
    keep: list[Tensor]  # kept units after rearrangement
    searched: list[Tensor]  # kept units of the global search, before rearrangement
    target_keep: list[Tensor]  # units of the rescaling target (the search at config.target_keep)
    fisher: list[Tensor]  # Fisher diagonal (importance) of every unit
    reports: list[RescaleReport]
    seq_len: float
    budget: float
    config: KwonConfig


def _config(flops_keep: float | None, config: KwonConfig | None, options: dict) -> KwonConfig:
    if (flops_keep is None) == (config is None):
        raise ValueError("pass either flops_keep (fraction of FLOPs kept) or config, not both")
    if config is None:
        return KwonConfig(flops_keep=flops_keep, **options)
    if options:
        raise ValueError(f"options {sorted(options)} go into the config when a config is given")
    return config


def kwon_masks(
    model: nn.Module,
    sample: Mapping[str, Tensor],
    flops_keep: float | None = None,
    *,
    labels: Tensor | None = None,
    config: KwonConfig | None = None,
    device: str | torch.device = "auto",
    offload: bool | None = None,
    **options,
) -> KwonMasks:
    """Kwon et al.'s masks for ``model`` (not modified); arguments as :func:`kwon_prune`."""
    config = _config(flops_keep, config, options)
    return _kwon_masks(_work_model(model, device), sample, labels, config, offload)[0]


def kwon_prune(
    model: nn.Module,
    sample: Mapping[str, Tensor],
    flops_keep: float | None = None,
    *,
    labels: Tensor | None = None,
    config: KwonConfig | None = None,
    device: str | torch.device = "auto",
    offload: bool | None = None,
    **options,
) -> PruneResult:
    """Prune to ``flops_keep`` of the encoder's FLOPs with Kwon et al. 2022 (Mask-Tuning), no retraining.

    model: a fine-tuned *ForSequenceClassification (classification or regression) or
        *ForQuestionAnswering model; not modified.
    sample: a tokenizer's padded output; labels: true labels (see :func:`task_labels`), or in the sample.
    flops_keep: fraction of FLOPs kept, in (0, 1]; or pass ``config`` (a KwonConfig).
    options: other KwonConfig fields (seq_len, num_samples, teacher_keep, rearrange, rescale, ...).
    device: "auto" = cuda if available, else cpu; the result lives there.
    offload: keep the whole-sample data, the Fisher's per-example gradients and the rescaling's hidden
        states (the student's and the target's), in temporary files rather than RAM (default: on the CPU,
        as kprune.prune; see kprune.memory). It changes the memory a prune needs, never its result.
    Returns the physically smaller model and a PruneRecord (``config["method"] == "kwon2022-mask-tuning"``;
    each step's ``predictive_lost`` is the Fisher importance of its pruned units, its errors the rescaling's).
    """
    config = _config(flops_keep, config, options)
    started = time.perf_counter()
    pruned = _work_model(model, device)
    result, batches = _kwon_masks(pruned, sample, labels, config, offload)
    costs = unit_costs(pruned, result.seq_len)
    lost = [float(f[~k].sum()) for f, k in zip(result.fisher, result.keep, strict=True)]
    errors = [(r.error_before, r.error_after, r.target_sq) for r in result.reports]
    steps = step_records(pruned, result.keep, costs, result.budget, lost=lost, errors=errors)
    apply_masks(pruned, result.masks)  # new weights for every sublayer
    own_memory(pruned, model)  # embeddings, LayerNorms, head: still the model's
    record_config = {
        **config.to_dict(),
        "seq_len": result.seq_len,
        "teacher_keep": config.target_keep,
        "device": str(next(pruned.parameters()).device),
        "rescale_status": [report.status for report in result.reports],
    }
    record = build_record(
        model,
        pruned,
        record_config,
        batches,
        result.seq_len,
        result.budget,
        steps,
        time.perf_counter() - started,
    )
    logger.info(
        "Kwon et al. kept %.1f%% of FLOPs (budget %.1f%%) in %.1fs",
        100 * record.flops_kept,
        100 * config.flops_keep,
        record.seconds,
    )
    return PruneResult(pruned, record)


def _work_model(model: nn.Module, device: str | torch.device) -> nn.Module:
    """The model on the device, frozen, in eval mode; on the model's own device its weights are shared,
    not copied (nothing here writes to them, and pruning replaces them)."""
    return shared_copy(model).to(resolve_device(device)).eval().requires_grad_(False)


def _kwon_masks(
    work: nn.Module,
    sample: Mapping[str, Tensor],
    labels: Tensor | None,
    config: KwonConfig,
    offload: bool | None = None,
) -> tuple[KwonMasks, list[dict[str, Tensor]]]:
    """The method on ``work`` (the model's frozen twin, on the device): its masks and the batches used."""
    labels = task_labels(work, sample, labels)
    # on the whole sample, like kprune.prune
    seq_len = resolve_seq_len(config.seq_len, sample["attention_mask"])
    sample, labels = subsample(sample, labels, config.num_samples, config.seed)
    device = next(work.parameters()).device
    offload = offload_default(device) if offload is None else offload
    batches, label_batches = model_batches(work, sample, config.batch_size, device, labels)

    subs = sublayers(work)
    gradients = mask_gradients(work, batches, label_batches, config.micro_batch_tokens, offload)
    del label_batches
    fisher = [fisher_diagonal(g) for g in gradients]
    head_cost, neuron_cost = unit_costs(work, seq_len)
    flops_original = encoder_flops_of(work, seq_len)

    def search(fraction: float) -> list[Tensor]:
        if fraction >= 1.0:  # nothing to prune (the search could drop units of zero importance on a tie)
            return [torch.ones(sub.num_units, dtype=torch.bool) for sub in subs]
        heads, neurons = search_heads_and_neurons(
            torch.cat(fisher[0::2]),
            torch.cat(fisher[1::2]),
            head_cost,
            neuron_cost,
            fraction * flops_original,
        )
        per_head = heads.split([sub.num_units for sub in subs[0::2]])
        per_neuron = neurons.split([sub.num_units for sub in subs[1::2]])
        return [keep for pair in zip(per_head, per_neuron, strict=True) for keep in pair]

    searched = search(config.flops_keep)
    target_keep = search(config.target_keep)
    if config.rearrange:
        keep = [rearrange_mask(k, fisher_block(g)) for k, g in zip(searched, gradients, strict=True)]
    else:
        keep = [k.clone() for k in searched]
    if isinstance(gradients, OffloadedGradients):
        gradients.close()
    del gradients  # (sequences, units) per sublayer; the rescaling does not need them
    if config.rescale:
        masks, reports = rescale_masks(
            work,
            keep,
            target_keep,
            batches,
            config.ridge,
            config.max_scale,
            config.micro_batch_tokens,
            offload,
        )
    else:
        masks, reports = [k.double() for k in keep], [RescaleReport("off") for _ in keep]
    budget = config.flops_keep * flops_original
    result = KwonMasks(masks, keep, searched, target_keep, fisher, reports, seq_len, budget, config)
    return result, batches
