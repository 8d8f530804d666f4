"""``kprune.prune``: the whole K-prune run in one call, a thin front of the loop in ``kprune.iterate``."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
from torch import nn

from kprune.arch import family_of, task_of
from kprune.config import KPruneConfig
from kprune.iterate import iterate, unit_flops
from kprune.models import check_finite_activations, check_finite_weights, model_batch, resolve_device
from kprune.record import PruneResult
from kprune.sample import make_batches, resolve_seq_len
from kprune.sublayer import encoder_flops_of, sublayers

logger = logging.getLogger(__name__)


def prune(
    model: nn.Module,
    sample: Mapping[str, torch.Tensor],
    flops_keep: float | None = None,
    *,
    config: KPruneConfig | None = None,
    device: str | torch.device = "auto",
    offload: bool | None = None,
    progress: bool = True,
    keep_teacher: bool = True,
    **options,
) -> PruneResult:
    """Prune a fine-tuned encoder to ``flops_keep`` of its FLOPs with K-prune, without retraining.

    model: a transformers *ForSequenceClassification / *ForQuestionAnswering model (BERT, RoBERTa,
        XLM-R, DistilBERT, ELECTRA); it is the teacher and is not modified (it may be moved to ``device``),
        unless keep_teacher is False: the loop then lets each of its encoder sublayers go once it has passed
        it, so the prune holds about one model instead of two, and the teacher is unusable afterwards (for
        a model loaded only to be pruned; the command line does this).
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
    check_finite_weights(model)
    device = resolve_device(device)
    teacher = model.to(device).eval()
    batches = [model_batch(model, batch) for batch in make_batches(sample, config.batch_size, device)]
    check_finite_activations(teacher, batches[0])
    seq_len = resolve_seq_len(config.seq_len, [batch["attention_mask"] for batch in batches])
    warn_about_the_inputs(teacher, batches, config.flops_keep, seq_len)
    return iterate(teacher, batches, config, offload=offload, progress=progress, keep_teacher=keep_teacher)


def smallest_flops_keep(model: nn.Module, seq_len: float) -> float:
    """The budget below which no unit fits: the cheapest head or neuron as a fraction of the FLOPs."""
    cheapest = min(unit_flops(sub, seq_len) for sub in sublayers(model) if sub.num_units)
    return cheapest / encoder_flops_of(model, seq_len)


def min_sample_tokens(model: nn.Module) -> int:
    """The documented minimum sample: as many tokens as the widest output projection has inputs (a layer's
    FFN neurons); fewer leave the least squares of that projection underdetermined (the ridge alone)."""
    return max(sub.output.in_features for sub in sublayers(model))


def warn_about_the_inputs(model: nn.Module, batches, flops_keep: float, seq_len: float) -> None:
    """Log a warning for a budget that keeps no unit and for a sample below the minimum."""
    smallest = smallest_flops_keep(model, seq_len)
    if flops_keep < smallest:
        logger.warning(
            "flops_keep %.3g is below the cheapest unit (%.3g of the FLOPs at %.1f tokens): every head and "
            "neuron will be pruned and the model will predict from its embeddings alone",
            flops_keep,
            smallest,
            seq_len,
        )
    tokens, minimum = int(sum(batch["attention_mask"].sum() for batch in batches)), min_sample_tokens(model)
    if tokens < minimum:
        logger.warning(
            "the sample holds %d tokens, fewer than the %d inputs of the widest output projection (a layer's "
            "FFN neurons): its least squares are underdetermined and rest on the ridge alone; use at least "
            "%d tokens (the paper uses 100,000)",
            tokens,
            minimum,
            minimum,
        )
