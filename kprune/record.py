"""What a prune run decided: one StepRecord per sublayer, one PruneRecord per run (K-prune and baselines).

Names say their unit: ``flops_keep`` and ``flops_kept`` are fractions of the teacher's FLOPs;
``budget_flops``, ``flops_left``, ``sublayer_flops``, ``flops_original`` and ``flops_final`` are FLOPs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from kprune.arch import family_of, task_of
from kprune.sublayer import encoder_flops_of
from kprune.tune import TuneReport


@dataclass
class StepRecord:
    """What one iteration decided and how well the tuning reconstructed the teacher."""

    sublayer: int
    layer: int
    kind: str
    units_before: int
    units_kept: int
    kept_units: list[int]
    sublayer_flops: float  # FLOPs of the units this sublayer keeps
    flops_left: float  # FLOPs the sublayers above may still use
    predictive_lost: float  # knowledge of the pruned units
    representational_lost: float
    error_before: float  # ||F W^T - R||^2 without tuning
    error_after: float
    relative_error_before: float
    relative_error_after: float
    seconds: float
    # Tuning checked on held-out sequences (None without a check part): the relative ridge strength chosen
    # (None: no tuning won) and the check part's error before and after.
    tune_strength: float | None = None
    check_error_before: float | None = None
    check_error_after: float | None = None
    # False: the knowledge of the layer's attention step was reused, not measured (rescore "layer").
    knowledge_measured: bool = True


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
    budget_flops: float
    flops_final: float
    heads: list[list[int]]  # kept head indices per layer (indices of the input model)
    neurons: list[list[int]]  # kept neuron indices per layer
    steps: list[StepRecord] = field(default_factory=list)
    seconds: float = 0.0
    # The head's tuning (kprune.tune.TuneReport's fields; None: not tuned).
    head_tuning: dict | None = None

    @property
    def flops_kept(self) -> float:
        """Fraction of the teacher's FLOPs the pruned model keeps."""
        return self.flops_final / self.flops_original

    def to_dict(self) -> dict:
        return {**asdict(self), "flops_kept": self.flops_kept}

    @classmethod
    def from_dict(cls, fields: Mapping) -> PruneRecord:
        """The inverse of ``to_dict`` (which adds the derived ``flops_kept``)."""
        fields = {name: value for name, value in fields.items() if name != "flops_kept"}
        return cls(**{**fields, "steps": [StepRecord(**step) for step in fields["steps"]]})


@dataclass
class PruneResult:
    model: nn.Module
    record: PruneRecord


def build_record(
    teacher: nn.Module,
    student: nn.Module,
    config: Mapping,
    batches: Sequence[Mapping[str, torch.Tensor]],
    seq_len: float,
    budget_flops: float,
    steps: list[StepRecord],
    seconds: float,
    head_tuning: TuneReport | None = None,
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
        budget_flops=budget_flops,
        flops_final=encoder_flops_of(student, seq_len),
        heads=[step.kept_units for step in steps[0::2]],
        neurons=[step.kept_units for step in steps[1::2]],
        steps=list(steps),
        seconds=seconds,
        head_tuning=None if head_tuning is None else asdict(head_tuning),
    )
