"""Kwon et al., step 1: per-example gradients of the task loss w.r.t. every unit's mask, and the empirical
Fisher (its diagonal is a unit's importance, its per-layer blocks drive the rearrangement)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from kprune.arch import task_of
from kprune.baselines.common import masked_logits
from kprune.baselines.kwon.labels import task_loss
from kprune.config import MICRO_BATCH_TOKENS
from kprune.knowledge import micro_batches
from kprune.memory import OffloadedStates
from kprune.sublayer import sublayers


def mask_gradients(
    model: nn.Module,
    batches: Sequence[Mapping[str, Tensor]],
    label_batches: Sequence[Tensor],
    max_tokens: int = MICRO_BATCH_TOKENS,
    offload: bool = False,
) -> Sequence[Tensor]:
    """Per-example gradients of the task loss w.r.t. every unit's mask at 1: per sublayer, one (N, units)
    float32 CPU tensor, rows in batch order.

    One backward pass per micro-batch of at most ``max_tokens`` padded tokens (each example has its own
    mask variables, so the split changes nothing but round-off), which bounds the autograd graph: it
    holds about 20 activations of the hidden or FFN width per token and layer, some 0.5 MB per token on
    a BERT-base, so a whole batch's graph would dominate the memory. With ``offload`` the gradients go to
    a temporary file (kprune.memory) as they come, and indexing the result by sublayer reads that
    sublayer's back (call its ``close`` when done); otherwise they are filled into tensors in RAM.
    """
    pieces = _gradient_pieces(model, batches, label_batches, max_tokens)
    subs = sublayers(model)
    if offload:
        return OffloadedGradients(OffloadedStates(g for grads in pieces for g in grads), len(subs))
    total = sum(int(batch["attention_mask"].shape[0]) for batch in batches)
    gradients = [torch.zeros(total, sub.num_units, dtype=torch.float32) for sub in subs]
    start = 0
    for grads in pieces:
        count = grads[0].shape[0]
        for store, grad in zip(gradients, grads, strict=True):
            store[start : start + count] = grad
        start += count
    return gradients


def _gradient_pieces(
    model: nn.Module,
    batches: Sequence[Mapping[str, Tensor]],
    label_batches: Sequence[Tensor],
    max_tokens: int,
) -> Iterator[list[Tensor]]:
    """Per micro-batch, in batch order: every sublayer's per-example mask gradients (rows, units), float32
    on the CPU (zeros where no unit of a sublayer affects the loss)."""
    task = task_of(model)
    subs = sublayers(model)
    dtype = next(model.parameters()).dtype
    for batch, labels in zip(batches, label_batches, strict=True):
        for rows in micro_batches(*batch["attention_mask"].shape, max_tokens):
            micro = {name: value[rows] for name, value in batch.items()}
            count = rows.stop - rows.start
            with torch.enable_grad():  # not across the yield: the caller keeps its own grad mode
                masks = [
                    torch.ones(count, sub.num_units, dtype=dtype, device=labels.device, requires_grad=True)
                    for sub in subs
                ]
                logits = masked_logits(model, micro, masks)
                loss = task_loss(task, logits, labels[rows], micro["attention_mask"]).sum()
                grads = torch.autograd.grad(loss, masks, allow_unused=True)
            del logits, loss, masks
            yield [
                torch.zeros(count, sub.num_units, dtype=torch.float32)
                if grad is None
                else grad.detach().float().cpu()
                for sub, grad in zip(subs, grads, strict=True)
            ]


class OffloadedGradients(Sequence):
    """Per-example mask gradients in a temporary file, one slot per (micro-batch, sublayer); indexing by
    sublayer reads its (N, units) tensor back."""

    def __init__(self, states: OffloadedStates, num_sublayers: int) -> None:
        self.states = states
        self.num_sublayers = num_sublayers

    def __len__(self) -> int:
        return self.num_sublayers

    def __getitem__(self, index: int) -> Tensor:
        if not 0 <= index < self.num_sublayers:
            raise IndexError(index)
        slots = range(index, len(self.states), self.num_sublayers)
        return torch.cat([self.states[slot] for slot in slots])

    def close(self) -> None:
        self.states.close()


def fisher_diagonal(gradients: Tensor) -> Tensor:
    """Empirical Fisher diagonal sum_n g_n^2 of per-example gradients (N, units): (units,) float64."""
    return gradients.double().pow(2).sum(0)


def fisher_block(gradients: Tensor) -> Tensor:
    """Empirical Fisher block sum_n g_n g_n^T of one sublayer's units: (units, units) float64."""
    gradients = gradients.double()
    return gradients.T @ gradients
