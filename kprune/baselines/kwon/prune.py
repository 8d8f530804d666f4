"""Kwon et al.'s method end to end: its options, its four steps in order, and the pruned model."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from kprune.baselines.common import (
    apply_masks,
    check_flops_keep,
    model_batches,
    own_memory,
    shared_copy,
    step_records,
    subsample,
    unit_costs,
)
from kprune.baselines.kwon.fisher import (
    OffloadedGradients,
    fisher_block,
    fisher_diagonal,
    mask_gradients,
)
from kprune.baselines.kwon.labels import task_labels
from kprune.baselines.kwon.rearrange import rearrange_mask
from kprune.baselines.kwon.rescale import MAX_SCALE, RescaleReport, rescale_masks
from kprune.baselines.kwon.search import search_heads_and_neurons
from kprune.config import MICRO_BATCH_TOKENS
from kprune.memory import offload_default
from kprune.models import resolve_device
from kprune.record import PruneResult, build_record
from kprune.sample import resolve_seq_len
from kprune.sublayer import encoder_flops_of, sublayers

logger = logging.getLogger(__name__)

METHOD = "kwon2022-mask-tuning"
NUM_SAMPLES = 2048  # sequences used by Kwon et al.


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
