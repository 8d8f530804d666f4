"""The calibration sample: a tokenized batch cut into length-sorted, padding-trimmed batches."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def make_batches(
    sample: Mapping[str, torch.Tensor], batch_size: int, device: torch.device | str = "cpu"
) -> list[dict[str, torch.Tensor]]:
    """Split a right-padded tokenized sample (N, S) into batches of similar length, padding trimmed.

    Sorting by length (stable, so deterministic) keeps padding, and so wasted compute, small.
    """
    if "input_ids" not in sample or "attention_mask" not in sample:
        raise ValueError(
            "the sample must hold 'input_ids' and 'attention_mask' tensors (a tokenizer's output)"
        )
    attention_mask = torch.as_tensor(sample["attention_mask"])
    if attention_mask.dim() != 2 or attention_mask.shape[0] == 0:
        raise ValueError(
            f"the sample is empty or not (sequences, length): shape {tuple(attention_mask.shape)}"
        )
    lengths = attention_mask.sum(1)
    if (lengths == 0).any():
        raise ValueError(f"{int((lengths == 0).sum())} sequences of the sample have no tokens")
    order = torch.argsort(lengths, stable=True)
    batches = []
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        length = int(lengths[index].max())
        batches.append(
            {
                name: torch.as_tensor(sample[name])[index, :length].to(device)
                for name in MODEL_INPUTS
                if name in sample
            }
        )
    return batches


def average_length(sample: Mapping[str, torch.Tensor]) -> float:
    """Mean number of real (non-padding) tokens per sequence."""
    return float(torch.as_tensor(sample["attention_mask"]).sum(1).double().mean())


REFERENCE = "reference"


def resolve_seq_len(
    seq_len: float | str | None,
    attention_masks: Sequence[torch.Tensor] = (),
    reference_length: float | None = None,
) -> float:
    """Tokens per sequence of the FLOPs model, resolved the same way by every entry point.

    None (the default everywhere): the mean real length of the calibration sample, whose attention masks
    (one (N, S) tensor, or one per batch) are given; "reference": the paper's value for the task
    (``reference_length``, from ``TaskSpec.reference_length``); a number: itself.
    """
    if seq_len is None:
        if not len(attention_masks):
            raise ValueError("seq_len=None measures the sample, but no sample was given")
        masks = [attention_masks] if isinstance(attention_masks, torch.Tensor) else attention_masks
        lengths = torch.cat([torch.as_tensor(mask).sum(1).cpu() for mask in masks]).double()
        value = float(lengths.mean())
    elif seq_len == REFERENCE:
        if reference_length is None:
            raise ValueError("this task has no reference sequence length (the paper's); give a number")
        value = float(reference_length)
    else:
        value = float(seq_len)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"seq_len must be a finite number > 0, got {seq_len!r}")
    return value
