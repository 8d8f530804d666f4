"""Knowledge measurement: how much prediction and representation each unit carries (K-prune, Sec. 3.2).

Predictive knowledge of unit i is the second-order estimate of how much the distillation loss
``T^2 KL(p_teacher || p_student)`` grows when the unit's mask m_i goes from 1 to 0:  0.5 * F_ii.

F is the Fisher (generalised Gauss-Newton) matrix of that loss, computed per example as
``J^T H J``: J = d logits / d masks, H = the loss's Hessian in the logits, taken at the teacher's
soft labels p.  Unlike squared batch-mean gradients, this is not zero when the student equals the
teacher (iteration 0).  Writing H = R^T R, each row r of R costs one backward pass, and the
per-example gradients of ``r . logits`` give F_ii = sum over rows of squared gradients:

    classification:  H = diag(p) - p p^T  (rank C-1: exact with C-1 passes from its eigenvectors)
    regression:      H = 2 I / K          (MSE to the teacher's K outputs)
    QA:              H = 0.5 (H_start (+) H_end) over the valid positions; with hundreds of positions it
                     is sketched with random +-1 projections, which keep E[F_ii] exact.

Representational knowledge of unit i is what it adds to the sublayer's output, summed over its
features f and averaged over sample tokens:  mean_tokens sum_f x_f^2 ||W_out[:, f]||^2 / d. For a sublayer
whose output the head reads at the first token only (the last layer of a sequence classifier), the mean runs
over first tokens.

The two terms live on unrelated scales (a Fisher of the loss, a squared activation norm). With the "mean"
scale, each is divided by its mean over the candidate units before they are weighted, so lam_rep weighs
representational against predictive knowledge on equal footing; "raw" is the paper's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kprune.arch import CLASSIFICATION, QUESTION_ANSWERING, REGRESSION, task_logits
from kprune.config import (
    BATCH_GRADIENT,
    BFLOAT16,
    FISHER,
    FLOAT32,
    KNOWLEDGE_PRECISIONS,
    KNOWLEDGE_SCALES,
    MICRO_BATCH_TOKENS,
    PREDICTIVE_MODES,
    RAW_SCALE,
)
from kprune.sublayer import Sublayer


def distillation_loss(
    task: str,
    logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    attention_mask: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """Per-example loss (B,): T^2 KL(teacher || student) on soft labels; MSE for regression;
    for QA the mean of the start and end KL over the valid positions."""
    if task == REGRESSION:
        return (logits - teacher_logits).pow(2).mean(-1)
    if task == CLASSIFICATION:
        return _soft_kl(logits, teacher_logits, temperature, dim=-1)
    if task == QUESTION_ANSWERING:
        invalid = ~attention_mask.bool()[:, :, None]
        logits, teacher_logits = logits.masked_fill(invalid, -1e4), teacher_logits.masked_fill(invalid, -1e4)
        return _soft_kl(logits, teacher_logits, temperature, dim=1).mean(-1)
    raise ValueError(f"unknown task {task!r}")


def _soft_kl(logits, teacher_logits, temperature, dim):
    teacher_log_probs = F.log_softmax(teacher_logits / temperature, dim=dim)
    log_probs = F.log_softmax(logits / temperature, dim=dim)
    return temperature**2 * (teacher_log_probs.exp() * (teacher_log_probs - log_probs)).sum(dim)


@dataclass
class Knowledge:
    """Per-unit knowledge of one sublayer."""

    predictive: torch.Tensor  # (units,)
    representational: torch.Tensor  # (units,)


def loss_hessian_factor(
    task: str,
    teacher_logits: torch.Tensor,
    attention_mask: torch.Tensor,
    temperature: float,
    projections: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """R with R^T R = Hessian of the per-example distillation loss in the logits: (B, rows, *logit_shape),
    on teacher_logits' device, QA's on the attention mask's (the loop keeps the logits on the host: a
    classifier's factor comes from eigh, whose error check would wait for a GPU at every call)."""
    teacher_logits = teacher_logits.detach().double()
    if task == REGRESSION:
        outputs = teacher_logits.shape[1]
        eye = torch.eye(outputs, dtype=teacher_logits.dtype, device=teacher_logits.device)
        return (eye * (2.0 / outputs) ** 0.5).expand(teacher_logits.shape[0], outputs, outputs)
    if task == CLASSIFICATION:
        probs = F.softmax(teacher_logits / temperature, dim=-1)
        classes = probs.shape[1]
        if classes - 1 <= projections:
            hessian = torch.diag_embed(probs) - probs[:, :, None] * probs[:, None, :]
            # eigh sorts ascending: the first eigenvector is the null direction (all logits shifted equally)
            eigenvalues, eigenvectors = torch.linalg.eigh(hessian)
            rows = eigenvalues[:, 1:].clamp_min(0).sqrt()[:, :, None] * eigenvectors[:, :, 1:].transpose(1, 2)
            return rows
        return _projected_softmax_factor(probs, projections, generator)
    if task == QUESTION_ANSWERING:
        teacher_logits = teacher_logits.to(attention_mask.device, non_blocking=True)
        valid = attention_mask.bool()[:, :, None]
        masked = (teacher_logits / temperature).masked_fill(~valid, float("-inf"))
        probs = F.softmax(masked, dim=1)  # (B, S, 2): start and end distributions over valid positions
        start = _projected_softmax_factor(probs[..., 0], projections, generator)
        end = _projected_softmax_factor(probs[..., 1], projections, generator)
        return torch.stack([start, end], dim=-1) * 0.5**0.5
    raise ValueError(f"unknown task {task!r}")


def _projected_softmax_factor(probs: torch.Tensor, projections: int, generator) -> torch.Tensor:
    """Rows xi^T A^T / sqrt(k) for diag(p) - p p^T = A A^T, A = diag(sqrt p) - p sqrt(p)^T, xi = +-1."""
    signs = torch.randint(0, 2, (probs.shape[0], projections, probs.shape[1]), generator=generator)
    # non_blocking: a blocking copy to a GPU waits for the work queued before it
    signs = signs.to(device=probs.device, dtype=probs.dtype, non_blocking=True) * 2 - 1
    weighted = signs * probs.sqrt()[:, None, :]
    rows = weighted - weighted.sum(-1, keepdim=True) * probs[:, None, :]
    return rows / projections**0.5


class MaskProbe(torch.autograd.Function):
    """``features * mask[:, None, :, None]`` at mask = 1 (one mask variable per example and unit) without
    the products: the forward passes the features on, the backward passes the gradient on unchanged and
    gives the mask its gradient, the features' product with it summed over positions and width. Two fewer
    full-size products per sublayer and micro-batch than the multiplication's autograd."""

    @staticmethod
    def forward(ctx, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(features)
        ctx.mask_dtype = mask.dtype
        return features.view_as(features)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        (features,) = ctx.saved_tensors
        # Summed in the mask's precision: bfloat16 features (under autocast) are not rounded again.
        return grad, (grad * features).sum((1, 3), dtype=ctx.mask_dtype)


def micro_batches(rows: int, length: int, max_tokens: int) -> list[slice]:
    """Consecutive row slices of a (rows, length) batch with at most max_tokens padded tokens each
    (at least one row): they bound the autograd graph of one measurement."""
    step = max(1, max_tokens // max(length, 1))
    return [slice(start, min(start + step, rows)) for start in range(0, rows, step)]


def measure_knowledge(
    model: torch.nn.Module,
    subs: Sequence[Sublayer],
    hidden_batches: Sequence[torch.Tensor],
    attention_masks: Sequence[torch.Tensor],
    teacher_logits: Sequence[torch.Tensor],
    task: str,
    temperature: float = 2.0,
    projections: int = 8,
    generator: torch.Generator | None = None,
    predictive: str = FISHER,
    max_tokens: int = MICRO_BATCH_TOKENS,
    first_token_only: Sequence[bool] | None = None,
    precision: str = FLOAT32,
) -> list[Knowledge]:
    """Knowledge of every unit of ``subs`` (the current sublayer and all above it, bottom-up).

    ``hidden_batches[b]`` is the student's input to ``subs[0]`` for batch b and ``teacher_logits[b]`` the
    teacher's logits of it, on any device (on the host, a classifier's Hessian factor is computed there
    and copied without waiting for a GPU); the forward runs from
    there to the logits with one mask variable per (example, unit), so one backward pass per Hessian
    row yields per-example gradients. Each batch goes through in micro-batches of at most ``max_tokens``
    padded tokens, which bounds the autograd graph; per-example gradients do not depend on the split.
    ``predictive="batch-gradient"`` reproduces the reference code (squared gradients of the batch-mean
    loss, zero while the student equals the teacher), for ablations. ``first_token_only[i]``: the
    representational knowledge of ``subs[i]`` is averaged over the first tokens only (the positions its
    output reaches the head by); from the first such sublayer up, the other positions are not computed.
    ``precision="bfloat16"``: the forward and backward matrix products in bfloat16 (autocast), for speed.
    """
    first_token_only = list(first_token_only) if first_token_only is not None else [False] * len(subs)
    if len(first_token_only) != len(subs):
        raise ValueError(f"first_token_only has {len(first_token_only)} entries for {len(subs)} sublayers")
    if first_token_only != sorted(first_token_only):
        raise ValueError(f"first_token_only must hold for the top sublayers only, got {first_token_only}")
    if predictive not in PREDICTIVE_MODES:
        raise ValueError(f"predictive must be one of {PREDICTIVE_MODES}, got {predictive!r}")
    if precision not in KNOWLEDGE_PRECISIONS:
        raise ValueError(f"precision must be one of {KNOWLEDGE_PRECISIONS}, got {precision!r}")
    # Sums on the model's device, read once at the end: a read per micro-batch would wait for a GPU each time.
    device = subs[0].output.weight.device if subs else torch.device("cpu")
    predictive_sums = [torch.zeros(sub.num_units, dtype=torch.float64, device=device) for sub in subs]
    representational = [torch.zeros(sub.num_units, dtype=torch.float64, device=device) for sub in subs]
    output_scale = [sub.output_column_norms().double() / sub.output.out_features for sub in subs]
    examples = 0
    tokens = torch.zeros((), dtype=torch.int64, device=device)
    for hidden, attention_mask, logits_t in zip(hidden_batches, attention_masks, teacher_logits, strict=True):
        # The reference's gradient is of the mean loss of the whole batch: summed over micro-batches first.
        batch_gradients = [torch.zeros(sub.num_units, dtype=torch.float64, device=device) for sub in subs]
        for rows in micro_batches(*attention_mask.shape, max_tokens):
            squared_features, squared_gradients = _measure_micro_batch(
                model,
                subs,
                hidden[rows],
                attention_mask[rows],
                logits_t[rows],
                task,
                temperature,
                projections,
                generator,
                predictive,
                len(attention_mask),
                first_token_only,
                precision,
            )
            for position in range(len(subs)):
                representational[position] += (squared_features[position] * output_scale[position]).sum(-1)
                if predictive == FISHER:
                    predictive_sums[position] += squared_gradients[position]
                else:
                    batch_gradients[position] += squared_gradients[position]
        if predictive == BATCH_GRADIENT:
            for position, gradient in enumerate(batch_gradients):
                predictive_sums[position] += gradient.pow(2)
        examples += hidden.shape[0]
        tokens += attention_mask.sum()
    tokens = int(tokens)
    return [
        Knowledge(
            predictive=(0.5 * pred / examples).cpu(),
            representational=(rep / (examples if first else tokens)).cpu(),
        )
        for pred, rep, first in zip(predictive_sums, representational, first_token_only, strict=True)
    ]


def _measure_micro_batch(
    model,
    subs,
    hidden,
    attention_mask,
    logits_t,
    task,
    temperature,
    projections,
    generator,
    predictive,
    batch_rows,
    first_token_only,
    precision,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per sublayer: the squared features summed over valid tokens (units, width), and the gradients of
    the mask: per-example squares summed (Fisher), or the plain sum of the batch-mean loss's gradient
    (batch-gradient, squared by the caller once the whole batch is in). float64, on hidden's device."""
    dtype = hidden.dtype
    token_weights = attention_mask.flatten().to(dtype)
    masks = [hidden.new_ones(hidden.shape[0], sub.num_units, requires_grad=True) for sub in subs]
    squared_features = []
    # bfloat16: autocast runs the linear layers' products in bfloat16; LayerNorms, and the residual sums
    # (a bfloat16 product plus the float32 stream), stay in float32. The backward follows the forward.
    with torch.autocast(hidden.device.type, dtype=torch.bfloat16, enabled=precision == BFLOAT16):
        for sub, mask, first in zip(subs, masks, first_token_only, strict=True):
            # From the first sublayer whose output the head reads at the first token only, the forward (and
            # so the backward) carries that token alone: the other positions cannot reach the logits.
            features = sub.features(hidden, attention_mask, first_token_only=first)
            if first:
                hidden = hidden[:, :1]
            # Valid tokens' squares summed by one matrix-vector product, in float32 within a micro-batch
            # and float64 across them: no gathered or float64 copy of the features.
            with torch.autocast(hidden.device.type, enabled=False):
                flat = features.detach().to(dtype).flatten(0, 1).flatten(1)
                squares = flat * flat
                squared = squares.sum(0) if first else token_weights @ squares
            squared_features.append(squared.view(sub.num_units, sub.width).double())
            hidden = sub.layer_norm(sub.residual_sum(hidden, MaskProbe.apply(features, mask)))
        logits = task_logits(model, hidden).to(dtype)
    gradients = [torch.zeros(sub.num_units, dtype=torch.float64, device=hidden.device) for sub in subs]
    if not logits.requires_grad:  # no unit is left above: nothing to measure
        return squared_features, gradients
    if predictive == FISHER:
        factor = loss_hessian_factor(task, logits_t, attention_mask, temperature, projections, generator)
        factor = factor.to(device=logits.device, dtype=logits.dtype, non_blocking=True)
        outputs = [(row * logits).sum() for row in factor.unbind(1)]
    else:
        logits_t = logits_t.to(logits.device, non_blocking=True)
        loss = distillation_loss(task, logits, logits_t, attention_mask, temperature)
        outputs = [loss.sum() / batch_rows]
    for number, output in enumerate(outputs):
        # allow_unused: a sublayer with no units left has a mask no output depends on
        grads = torch.autograd.grad(output, masks, retain_graph=number < len(outputs) - 1, allow_unused=True)
        for position, grad in enumerate(grads):
            if grad is not None:
                grad = grad.double()
                gradients[position] += (grad.pow(2) if predictive == FISHER else grad).sum(0)
    return squared_features, gradients


def knowledge_scales(knowledge: Sequence[Knowledge], scale: str = RAW_SCALE) -> tuple[float, float]:
    """Divisors of the predictive and representational terms: 1 ("raw"), or each term's mean over every
    candidate unit of ``knowledge`` ("mean"; 1 where that mean is 0, as the batch-gradient's at t=0)."""
    if scale not in KNOWLEDGE_SCALES:
        raise ValueError(f"scale must be one of {KNOWLEDGE_SCALES}, got {scale!r}")
    if scale == RAW_SCALE:
        return 1.0, 1.0
    means = [float(torch.cat([getattr(known, term) for known in knowledge]).double().mean())
             for term in ("predictive", "representational")]  # fmt: skip
    return tuple(mean if mean > 0 else 1.0 for mean in means)


def unit_scores(
    knowledge: Knowledge,
    unit_flops: float,
    is_head: bool,
    lam_pred: float = 1.0,
    lam_rep: float = 2.5e-4,
    mu: float = 1.0,
    scales: tuple[float, float] = (1.0, 1.0),
) -> torch.Tensor:
    """Knowledge per FLOP, each term over its scale (``knowledge_scales``); heads weighted by ``mu``
    (see KPruneConfig.mu)."""
    predictive, representational = knowledge.predictive, knowledge.representational
    if scales != (1.0, 1.0):  # the raw path computes exactly what the paper preset always did
        predictive, representational = predictive / scales[0], representational / scales[1]
    score = (lam_pred * predictive + lam_rep * representational) / unit_flops
    return score * mu if is_head else score
