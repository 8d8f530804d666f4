"""Kwon et al., step 4: layer-wise least-squares rescaling of the kept units towards a target."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from kprune.arch import ATTENTION, QUESTION_ANSWERING, encoder_input, task_of
from kprune.baselines.common import masked_sublayer
from kprune.config import MICRO_BATCH_TOKENS
from kprune.knowledge import micro_batches
from kprune.memory import HiddenStates, OffloadedStates, hidden_state_buffer
from kprune.sublayer import Sublayer, sublayers
from kprune.tune import (
    EXACT_RELATIVE_ERROR,
    LeastSquaresStats,
    gather_rows,
    host_masks,
    ridged,
    solve_normal_equations,
    tuning_rows,
)

logger = logging.getLogger(__name__)

MAX_SCALE = 10.0  # the reference stops rescaling when a scale leaves [-10, 10]


class ScaleStats:
    """Normal equations of min_{s, o} sum over rows ||sum_i s_i W_i f_i + o 1 - r||^2 for one sublayer's
    kept units (W_i: unit i's output columns, f_i its features, r the target, o an optional offset).

    The features' least-squares statistics (kprune.tune.LeastSquaresStats: F^T F, F^T R, ||R||^2, in float32
    over a few thousand rows at a time, float64 across) plus the feature sums and the sum of r's entries. Then
    gram[i, j] = sum <W_i f_i, W_j f_j> = blockwise sums of (W^T W) * (F^T F),
    cross[i] = sum <W_i f_i, r> = the blockwise sum of W^T * (F^T R), offset_gram[i] = sum <W_i f_i, 1>.
    """

    def __init__(self, weight: Tensor, width: int) -> None:
        """weight: the kept units' output columns (d, units * width)."""
        self.weight = weight.detach().double()
        self.width = width
        self.units = self.weight.shape[1] // width
        out_dim, num_features = self.weight.shape
        self.least_squares = LeastSquaresStats(num_features, out_dim, device=weight.device)
        self.feature_sum = torch.zeros(num_features, dtype=torch.float64, device=weight.device)
        # A tensor, as LeastSquaresStats' sums: reading a number per batch would wait for a GPU each time.
        self.target_sum_total = torch.zeros((), dtype=torch.float64, device=weight.device)
        self._gram: Tensor | None = None
        self._cross: Tensor | None = None

    def add(self, features: Tensor, target: Tensor) -> None:
        """One batch of rows: features (n, units, width) and target (n, d)."""
        self._gram = self._cross = None
        flat = features.reshape(features.shape[0], -1)
        self.least_squares.add(flat, target)
        self.feature_sum += flat.sum(0, dtype=torch.float64)
        self.target_sum_total += target.sum(dtype=torch.float64)

    @property
    def rows(self) -> int:
        return self.least_squares.num_rows

    @property
    def entries(self) -> int:
        """Entries of the target summed over (rows x d)."""
        return self.rows * self.weight.shape[0]

    @property
    def target_sq(self) -> float:
        return self.least_squares.target_sq

    @property
    def target_sum(self) -> float:
        return float(self.target_sum_total)

    @property
    def gram(self) -> Tensor:
        if self._gram is None:  # cached until the next add
            products = (self.weight.T @ self.weight) * self.least_squares.gram
            self._gram = products.view(self.units, self.width, self.units, self.width).sum((1, 3))
        return self._gram

    @property
    def cross(self) -> Tensor:
        if self._cross is None:
            products = (self.least_squares.cross * self.weight.T).sum(1)  # <W_f, (F^T R)_f> per feature f
            self._cross = products.view(self.units, self.width).sum(1)
        return self._cross

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
    rhs = stats.cross + lam
    if offset:
        rhs = torch.cat([rhs, rhs.new_tensor([stats.target_sum])])

    def system() -> Tensor:
        ridge_system = ridged(gram, lam)
        if not offset:
            return ridge_system
        column = stats.offset_gram[:, None]
        corner = torch.tensor([[float(stats.entries)]], dtype=torch.float64, device=gram.device)
        return torch.cat([torch.cat([ridge_system, column], 1), torch.cat([column.T, corner], 1)], 0)

    solution, solver = solve_normal_equations(system, rhs[:, None])
    return solution[:units, 0], solver


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
    rows_on_host = host_masks(pieces)  # read once: choosing rows on a GPU waits for it at every batch
    shapes = [tuple(mask.shape) for mask in attention_masks]
    student = hidden_state_buffer((encoder_input(model, dict(piece)) for piece in pieces), shapes, offload)
    target = hidden_state_buffer(iter(student), shapes, offload)
    try:
        return _rescale(
            model, keeps, target_keeps, student, target, attention_masks, rows_on_host, ridge, max_scale
        )
    finally:
        for states in (student, target):
            if isinstance(states, OffloadedStates):
                states.close()


def _rescale(
    model: nn.Module,
    keeps: Sequence[Tensor],
    target_keeps: Sequence[Tensor],
    student: HiddenStates,
    target: HiddenStates,
    attention_masks: Sequence[Tensor],
    host_attention_masks: Sequence[Tensor],
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
                rows = tuning_rows(host_attention_masks[number], cls_only)
                _add_scale_rows(stats, sub, kept, student[number], residual, attention_mask, rows)
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
    rows: Tensor,
) -> None:
    """One batch's rows of the normal equations (rows: the host's bool (B, S) of the tokens taken, see
    kprune.tune.tuning_rows), the student's features of the kept units against the target's residual
    minus the student's input and the bias."""
    bias = sub.output.bias if sub.output.bias is not None else 0.0
    features = sub.features(hidden, attention_mask)[:, :, kept.to(hidden.device)]
    stats.add(gather_rows(features, rows), gather_rows(residual - hidden - bias, rows))
