"""Task metrics of a model on labelled rows: what `kprune eval`, the pipeline and the benchmark report."""

from __future__ import annotations

import inspect
import math

import numpy as np
import torch
from scipy import stats
from sklearn.metrics import f1_score
from torch import nn

from kprune.api import model_logits
from kprune.arch import CLASSIFICATION


@torch.no_grad()
def predict(
    model: nn.Module, inputs: dict[str, torch.Tensor], batch_size: int, device: torch.device
) -> torch.Tensor:
    """The model's logits for every row, in row order, batch by batch with padding trimmed."""
    accepted = inspect.signature(model.forward).parameters  # DistilBERT takes no token_type_ids
    lengths = inputs["attention_mask"].sum(1)
    logits = []
    for start in range(0, len(lengths), batch_size):
        width = int(lengths[start : start + batch_size].max())
        batch = {
            name: value[start : start + batch_size, :width].to(device)
            for name, value in inputs.items()
            if name in accepted
        }
        logits.append(model_logits(model, batch).cpu())
    return torch.cat(logits)


def _finite_or_none(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None  # JSON has no NaN


def task_metrics(task: str, logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float | None]:
    """Accuracy and macro F1 for classification; mse, Pearson and Spearman for regression."""
    if task == CLASSIFICATION:
        predicted = logits.argmax(-1).numpy()
        truth = labels.numpy()
        return {
            "accuracy": float(np.mean(predicted == truth)),
            "macro_f1": float(f1_score(truth, predicted, average="macro", zero_division=0)),
        }
    predicted = logits.reshape(len(labels)).double().numpy()  # (B, 1) -> (B,), never broadcast
    truth = labels.double().numpy()
    constant = np.ptp(predicted) == 0 or np.ptp(truth) == 0  # correlations are undefined
    return {
        "mse": float(np.mean((predicted - truth) ** 2)),
        "pearson": None if constant else _finite_or_none(stats.pearsonr(predicted, truth).statistic),
        "spearman": None if constant else _finite_or_none(stats.spearmanr(predicted, truth).statistic),
    }
