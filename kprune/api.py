"""``kprune.prune``: the whole K-prune run in one call, a thin front of the loop in ``kprune.iterate``."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from kprune.arch import family_of, task_of
from kprune.config import KPruneConfig
from kprune.iterate import iterate
from kprune.models import model_batch, resolve_device
from kprune.record import PruneResult
from kprune.sample import make_batches


def prune(
    model: nn.Module,
    sample: Mapping[str, torch.Tensor],
    flops_keep: float | None = None,
    *,
    config: KPruneConfig | None = None,
    device: str | torch.device = "auto",
    offload: bool | None = None,
    progress: bool = True,
    **options,
) -> PruneResult:
    """Prune a fine-tuned encoder to ``flops_keep`` of its FLOPs with K-prune, without retraining.

    model: a transformers *ForSequenceClassification / *ForQuestionAnswering model (BERT, RoBERTa,
        XLM-R, DistilBERT, ELECTRA); it is the teacher and is not modified (it may be moved to ``device``).
    sample: a tokenizer's padded output for a few thousand task inputs (labels are not needed).
    flops_keep: fraction of FLOPs to keep, in (0, 1]; or pass ``config`` (a KPruneConfig).
    offload: keep the whole-sample hidden states in temporary files rather than RAM (default: on the
        CPU; see kprune.memory). It changes the memory a prune needs, never its result.
    options: other KPruneConfig fields (lam_pred, lam_rep, mu, temperature, ...).
    Returns the physically smaller model and a record of what was kept.
    """
    if (flops_keep is None) == (config is None):
        raise ValueError("pass either flops_keep (fraction of FLOPs kept) or config, not both")
    if config is None:
        config = KPruneConfig(flops_keep=flops_keep, **options)
    elif options:
        raise ValueError(f"options {sorted(options)} go into the config when a config is given")
    family_of(model)  # an unsupported family fails here, before any work
    task_of(model)
    device = resolve_device(device)
    teacher = model.to(device).eval()
    batches = [model_batch(model, batch) for batch in make_batches(sample, config.batch_size, device)]
    return iterate(teacher, batches, config, offload=offload, progress=progress)
