"""Pieces the baselines share: masked forwards, labelled batches, unit costs and the run record.

Masks are per-sublayer vectors (units,) or per-example matrices (B, units) that multiply each unit's
features before the output projection, exactly where kprune's surgery cuts. A mask entry of 0 silences a
unit, any other value scales its output; ``apply_masks`` turns such masks into a physically smaller model.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from kprune.arch import ATTENTION, encoder_input, head_dim_of, task_logits
from kprune.flops import head_flops, neuron_flops
from kprune.models import model_batch
from kprune.record import StepRecord
from kprune.sample import make_batches
from kprune.sublayer import Sublayer, sublayers

Masks = Sequence[torch.Tensor | None]  # one entry per sublayer; None = every unit at 1


def check_flops_keep(flops_keep: float) -> None:
    if not (isinstance(flops_keep, int | float) and 0.0 < flops_keep <= 1.0):
        raise ValueError(f"flops_keep must be in (0, 1] (the fraction of FLOPs kept), got {flops_keep!r}")


def unit_costs(model: nn.Module, seq_len: float) -> tuple[float, float]:
    """FLOPs of one head and of one FFN neuron (kprune.flops), for sequences of ``seq_len`` tokens."""
    hidden = model.config.hidden_size
    return head_flops(hidden, head_dim_of(model), seq_len), neuron_flops(hidden, seq_len)


def shared_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters (frozen) and buffers share the model's memory, so computing on
    it copies no weight. Pruning a sublayer of the copy (``apply_masks``) gives it new, smaller weights and
    leaves the model's as they are; ``own_memory`` then copies whatever the two still share."""
    memo = {id(p): nn.Parameter(p.detach(), requires_grad=False) for p in model.parameters()}
    memo.update({id(buffer): buffer for buffer in model.buffers()})
    return copy.deepcopy(model, memo)


def own_memory(copied: nn.Module, model: nn.Module) -> None:
    """Give ``copied`` its own copy of every parameter and buffer whose memory is still ``model``'s (a
    tensor held by several modules stays one tensor)."""
    shared = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    copies: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id -> (original, kept alive; its copy)
    for module in copied.modules():
        for tensors in (module._parameters, module._buffers):
            for name, tensor in tensors.items():
                if tensor is None or tensor.untyped_storage().data_ptr() not in shared:
                    continue
                if id(tensor) not in copies:
                    clone = tensor.detach().clone()
                    if isinstance(tensor, nn.Parameter):
                        clone = nn.Parameter(clone, requires_grad=tensor.requires_grad)
                    copies[id(tensor)] = (tensor, clone)
                tensors[name] = copies[id(tensor)][1]


def sublayer_cost(sub: Sublayer, costs: tuple[float, float]) -> float:
    return costs[0] if sub.kind == ATTENTION else costs[1]


def mask_features(features: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Features (B, S, units, width) times a mask (units,) or (B, units)."""
    if mask is None:
        return features
    if mask.dim() == 1:
        return features * mask[None, None, :, None].to(features.dtype)
    return features * mask[:, None, :, None].to(features.dtype)


def masked_sublayer(
    sub: Sublayer, hidden: torch.Tensor, attention_mask: torch.Tensor, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(pre-LayerNorm residual sum, output) of one sublayer with its units multiplied by ``mask``."""
    residual = sub.residual_sum(hidden, mask_features(sub.features(hidden, attention_mask), mask))
    return residual, sub.layer_norm(residual)


def masked_logits(model: nn.Module, batch: Mapping[str, torch.Tensor], masks: Masks) -> torch.Tensor:
    """Logits of ``model`` with each sublayer's units multiplied by its mask (differentiable in the masks)."""
    subs = sublayers(model)
    if len(masks) != len(subs):
        raise ValueError(f"got {len(masks)} masks for {len(subs)} sublayers")
    hidden = encoder_input(model, dict(batch))
    for sub, mask in zip(subs, masks, strict=True):
        _, hidden = masked_sublayer(sub, hidden, batch["attention_mask"], mask)
    return task_logits(model, hidden)


@torch.no_grad()
def apply_masks(model: nn.Module, masks: Masks) -> None:
    """Physically prune ``model`` in place: units with mask 0 are removed, the others keep their output
    columns multiplied by their mask value, so the result computes ``masked_logits(model, ., masks)``."""
    subs = sublayers(model)
    if len(masks) != len(subs):
        raise ValueError(f"got {len(masks)} masks for {len(subs)} sublayers")
    for sub, mask in zip(subs, masks, strict=True):
        if mask is None:
            continue
        if mask.shape != (sub.num_units,):
            raise ValueError(
                f"mask of sublayer {sub.index} has shape {tuple(mask.shape)}, not ({sub.num_units},)"
            )
        keep = mask != 0
        weight = sub.output.weight
        columns = keep.to(weight.device).repeat_interleave(sub.width)
        scale = mask.to(device=weight.device, dtype=weight.dtype)[keep.to(weight.device)]
        sub.keep_units(keep, weight[:, columns] * scale.repeat_interleave(sub.width))


def select_rows(sample: Mapping[str, torch.Tensor], rows: torch.Tensor) -> dict[str, torch.Tensor]:
    return {name: torch.as_tensor(value)[rows] for name, value in sample.items()}


def subsample(
    sample: Mapping[str, torch.Tensor], labels: torch.Tensor | None, num_samples: int | None, seed: int
) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """At most ``num_samples`` sequences (and their labels), drawn without replacement with ``seed``."""
    total = torch.as_tensor(sample["attention_mask"]).shape[0]
    if num_samples is None or num_samples >= total:
        return dict(sample), labels
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    rows = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:num_samples].sort().values
    return select_rows(sample, rows), (labels[rows] if labels is not None else None)


def model_batches(
    model: nn.Module,
    sample: Mapping[str, torch.Tensor],
    batch_size: int,
    device: torch.device,
    labels: torch.Tensor | None = None,
) -> tuple[list[dict[str, torch.Tensor]], list[torch.Tensor] | None]:
    """kprune's length-sorted batches for ``model`` and, if given, the labels of each batch's rows.

    ``make_batches`` orders the sequences by a stable sort on their lengths; the labels follow the same
    order, and every batch is checked against the sample rows it claims to hold.
    """
    batches = [model_batch(model, batch) for batch in make_batches(sample, batch_size, device)]
    if labels is None:
        return batches, None
    attention_mask = torch.as_tensor(sample["attention_mask"])
    if labels.shape[0] != attention_mask.shape[0]:
        raise ValueError(f"{labels.shape[0]} labels for {attention_mask.shape[0]} sequences")
    order = torch.argsort(attention_mask.sum(1), stable=True)
    input_ids = torch.as_tensor(sample["input_ids"])
    label_batches = []
    for number, batch in enumerate(batches):
        rows = order[number * batch_size : (number + 1) * batch_size]
        length = batch["input_ids"].shape[1]
        if not torch.equal(batch["input_ids"].cpu(), input_ids[rows, :length]):
            raise RuntimeError("labels could not be aligned with kprune.sample.make_batches")
        label_batches.append(labels[rows].to(device))
    return batches, label_batches


def step_records(
    model: nn.Module,
    keeps: Sequence[torch.Tensor],
    costs: tuple[float, float],
    budget_flops: float,
    lost: Sequence[float] | None = None,
    errors: Sequence[tuple[float, float, float]] | None = None,
) -> list[StepRecord]:
    """One StepRecord per sublayer, so a baseline reports like kprune.prune.

    lost: importance of the pruned units (the baseline's own score) as ``predictive_lost``; errors:
    (before, after, ||target||^2) of any layer-wise reconstruction. Quantities a method does not measure
    are NaN (representational knowledge always is, for the baselines).
    """
    records, left = [], budget_flops
    nan = float("nan")
    for sub, keep in zip(sublayers(model), keeps, strict=True):
        kept = int(keep.sum())
        cost = sublayer_cost(sub, costs)
        left -= kept * cost
        before, after, target = errors[sub.index] if errors is not None else (nan, nan, nan)
        records.append(
            StepRecord(
                sublayer=sub.index,
                layer=sub.layer,
                kind=sub.kind,
                units_before=sub.num_units,
                units_kept=kept,
                kept_units=keep.nonzero().flatten().tolist(),
                sublayer_flops=kept * cost,
                flops_left=left,
                predictive_lost=lost[sub.index] if lost is not None else nan,
                representational_lost=nan,
                error_before=before,
                error_after=after,
                relative_error_before=before / target if target > 0 else nan,
                relative_error_after=after / target if target > 0 else nan,
                seconds=0.0,
            )
        )
    return records
