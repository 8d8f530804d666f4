"""Kwon et al., the loss: the sample's true labels and the per-example task loss their Fisher is taken of."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kprune.arch import CLASSIFICATION, QUESTION_ANSWERING, REGRESSION, task_of


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
