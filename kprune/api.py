"""``kprune.prune``: the whole K-prune run in one call."""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from kprune.arch import QUESTION_ANSWERING, encoder_input, family_of, task_of
from kprune.config import KPruneConfig
from kprune.iterate import PruneState, StepRecord, run_step, teacher_step
from kprune.sample import average_length, make_batches
from kprune.sublayer import encoder_flops_of, sublayers

logger = logging.getLogger(__name__)


@dataclass
class PruneRecord:
    """What was kept and why: enough to rebuild the structure and to report the run."""

    source: str
    family: str
    task: str
    config: dict
    seq_len: float
    num_sequences: int
    num_tokens: int
    flops_original: float
    flops_budget: float
    flops_final: float
    heads: list[list[int]]  # kept head indices per layer (indices of the input model)
    neurons: list[list[int]]  # kept neuron indices per layer
    steps: list[StepRecord] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def flops_kept(self) -> float:
        return self.flops_final / self.flops_original

    def to_dict(self) -> dict:
        return {**asdict(self), "flops_kept": self.flops_kept}


@dataclass
class PruneResult:
    model: nn.Module
    record: PruneRecord


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@torch.no_grad()
def model_logits(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The model's own forward: (B, C) logits, or (B, S, 2) start/end logits for QA."""
    outputs = model(**batch)
    if task_of(model) == QUESTION_ANSWERING:
        return torch.stack([outputs.start_logits, outputs.end_logits], dim=-1)
    return outputs.logits


def model_batch(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch without inputs the model does not take (DistilBERT has no segment embeddings)."""
    if family_of(model).name == "distilbert":
        return {name: value for name, value in batch.items() if name != "token_type_ids"}
    return batch


def build_record(
    teacher: nn.Module,
    student: nn.Module,
    config: Mapping,
    batches: Sequence[Mapping[str, torch.Tensor]],
    seq_len: float,
    budget: float,
    steps: list[StepRecord],
    seconds: float,
) -> PruneRecord:
    """The record of a finished run, from its steps (one per sublayer, bottom-up); ``config`` holds the
    hyperparameters (a baseline's names its method)."""
    return PruneRecord(
        source=str(getattr(teacher.config, "_name_or_path", "") or type(teacher).__name__),
        family=family_of(teacher).name,
        task=task_of(teacher),
        config=dict(config),
        seq_len=seq_len,
        num_sequences=sum(len(batch["input_ids"]) for batch in batches),
        num_tokens=int(sum(batch["attention_mask"].sum() for batch in batches)),
        flops_original=encoder_flops_of(teacher, seq_len),
        flops_budget=budget,
        flops_final=encoder_flops_of(student, seq_len),
        heads=[step.kept_units for step in steps[0::2]],
        neurons=[step.kept_units for step in steps[1::2]],
        steps=list(steps),
        seconds=seconds,
    )


def prune(
    model: nn.Module,
    sample: Mapping[str, torch.Tensor],
    flops_keep: float | None = None,
    *,
    config: KPruneConfig | None = None,
    device: str | torch.device = "auto",
    progress: bool = True,
    **options,
) -> PruneResult:
    """Prune a fine-tuned encoder to ``flops_keep`` of its FLOPs with K-prune, without retraining.

    model: a transformers *ForSequenceClassification / *ForQuestionAnswering model (BERT, RoBERTa,
        XLM-R, DistilBERT, ELECTRA); it is the teacher and is not modified (it may be moved to ``device``).
    sample: a tokenizer's padded output for a few thousand task inputs (labels are not needed).
    flops_keep: fraction of FLOPs to keep, in (0, 1]; or pass ``config`` (a KPruneConfig).
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
    task = task_of(model)
    device = resolve_device(device)
    started = time.perf_counter()

    teacher = model.to(device).eval()
    student = copy.deepcopy(teacher).requires_grad_(False)
    batches = [model_batch(model, batch) for batch in make_batches(sample, config.batch_size, device)]
    seq_len = config.seq_len or average_length(sample)
    with torch.no_grad():
        teacher_logits = [model_logits(teacher, batch) for batch in batches]
        hidden = [encoder_input(teacher, batch) for batch in batches]
    flops_original = encoder_flops_of(student, seq_len)
    budget = config.flops_keep * flops_original
    state, teacher_hidden = PruneState(0, hidden, budget), hidden

    total = len(sublayers(student))
    for _ in tqdm(range(total), desc="K-prune sublayers", disable=not progress):
        targets, teacher_hidden = teacher_step(teacher, state.sublayer, teacher_hidden, batches)
        state = run_step(state, student, batches, teacher_logits, targets, task, seq_len, config)

    record = build_record(
        model, student, config.to_dict(), batches, seq_len, budget, state.steps, time.perf_counter() - started
    )
    logger.info(
        "K-prune kept %.1f%% of FLOPs (budget %.1f%%) in %.1fs",
        100 * record.flops_kept,
        100 * config.flops_keep,
        record.seconds,
    )
    return PruneResult(student, record)
