"""Fine-tune a pretrained encoder into the teacher of the embedded default.

K-prune needs a task-fine-tuned model, and none ships in a package, so the default pipeline makes
one: a plain AdamW loop with linear warm-up and decay over tokenized, right-padded rows. The
embeddings can stay frozen (a third of MiniLM's weights, and the part that overfits a small corpus).
"""

from __future__ import annotations

import inspect
import logging
import math
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from kprune.sample import MODEL_INPUTS

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FinetuneConfig:
    epochs: float = 2.0
    batch_size: int = 32
    learning_rate: float = 1e-4
    weight_decay: float = 0.01
    warmup_fraction: float = 0.1
    freeze_embeddings: bool = True
    seed: int = 0


def model_to_finetune(base: str, seed: int, **head) -> nn.Module:
    """The pretrained encoder ``base`` with a new sequence-classification head (``head``: num_labels,
    id2label, problem_type, ...) whose initial weights come from ``seed``. from_pretrained draws a new
    head from the process's random state: without the seed, every run fine-tuned another teacher."""
    import transformers  # here: every params check imports this module (FinetuneConfig), not transformers

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return transformers.AutoModelForSequenceClassification.from_pretrained(base, **head)


def finetune(
    model: nn.Module,
    inputs: dict[str, torch.Tensor],
    labels: torch.Tensor,
    config: FinetuneConfig,
    device: torch.device,
    progress: bool = True,
) -> list[float]:
    """Train ``model`` in place on (inputs, labels) with cross-entropy (or MSE for one output).

    inputs: right-padded (N, S) tensors; labels: (N,) class ids or floats. Returns the mean loss of
    each epoch. Padding is trimmed per batch, so short batches cost little.
    """
    if len(labels) == 0:
        raise ValueError("no training rows to fine-tune on")
    if config.freeze_embeddings:
        model.base_model.embeddings.requires_grad_(False)
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(labels) / config.batch_size)
    total_steps = max(1, round(config.epochs * steps_per_epoch))
    warmup = round(config.warmup_fraction * total_steps)

    def learning_rate_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, learning_rate_factor)
    generator = torch.Generator().manual_seed(config.seed)
    lengths = inputs["attention_mask"].sum(1)
    accepted = [name for name in MODEL_INPUTS if name in inspect.signature(model.forward).parameters]
    model.to(device).train()
    epoch_losses: list[float] = []
    step = 0
    bar = tqdm(total=total_steps, desc="fine-tune teacher", disable=not progress)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)  # dropout
        while step < total_steps:
            order = torch.randperm(len(labels), generator=generator)
            losses = []
            for start in range(0, len(order), config.batch_size):
                if step == total_steps:
                    break
                index = order[start : start + config.batch_size]
                width = int(lengths[index].max())
                batch = {name: inputs[name][index, :width].to(device) for name in accepted if name in inputs}
                loss = model(**batch, labels=labels[index].to(device)).loss
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                losses.append(loss.item())
                step += 1
                bar.update()
                bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.3f}")
            epoch_losses.append(sum(losses) / len(losses))
            logger.info("fine-tune epoch %d: mean loss %.4f", len(epoch_losses), epoch_losses[-1])
    bar.close()
    model.eval()
    return epoch_losses
