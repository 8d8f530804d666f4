"""The calibration sample: a tokenized batch cut into length-sorted, padding-trimmed batches."""

from __future__ import annotations

from collections.abc import Mapping

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
