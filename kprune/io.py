"""Save and load pruned models.

transformers 5 has no per-layer head pruning in its configs, so a pruned model is stored as the
source config (``config.json``), the weights (``pruned.safetensors``) and ``kprune.json`` with the
number of heads and neurons each layer kept. Loading builds the plain transformers model from the
config, cuts each layer to those counts, then loads the weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model
from torch import nn

from kprune.atomic import atomic_folder
from kprune.sublayer import set_unit_counts, unit_counts

WEIGHTS_FILE = "pruned.safetensors"
META_FILE = "kprune.json"
FORMAT = "kprune-pruned-model"
FORMAT_VERSION = 1


def save_pruned(model: nn.Module, directory: str | Path, *, record=None, tokenizer=None) -> Path:
    """Write a pruned model (and optionally its PruneRecord and tokenizer) to ``directory``.

    The folder is written as a sibling and swapped in whole (kprune.atomic): an interrupted save leaves
    the previous model intact. A non-empty folder not written by kprune is refused, never replaced.
    """
    directory = Path(directory)
    if directory.is_dir() and any(directory.iterdir()) and not is_pruned_folder(directory):
        raise FileExistsError(f"{directory} is a non-empty folder not written by kprune; choose another")
    with atomic_folder(directory) as temporary:
        _write_pruned(model, temporary, record, tokenizer)
    return directory


def _write_pruned(model: nn.Module, directory: Path, record, tokenizer) -> None:
    heads, neurons = unit_counts(model)
    meta = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "architecture": type(model).__name__,
        "heads_per_layer": heads,
        "neurons_per_layer": neurons,
        "record": record.to_dict() if record is not None else None,
    }
    model.config.save_pretrained(directory)
    save_model(model, str(directory / WEIGHTS_FILE))
    (directory / META_FILE).write_text(json.dumps(meta, indent=1))
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


def read_meta(directory: str | Path) -> dict:
    path = Path(directory) / META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a kprune pruned-model folder (no {META_FILE})")
    try:
        meta = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is damaged (not JSON: {error}); prune again into a new folder") from error
    if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path}: unknown format {meta.get('format')!r} version {meta.get('version')!r}")
    return meta


def load_pruned(directory: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a pruned model saved by :func:`save_pruned` as a plain transformers model, in eval mode."""
    directory = Path(directory)
    meta = read_meta(directory)
    config = transformers.AutoConfig.from_pretrained(directory)
    model_class = getattr(transformers, meta["architecture"], None)
    if model_class is None:
        raise ValueError(f"transformers has no model class {meta['architecture']!r}")
    model = model_class(config)
    weights = directory / WEIGHTS_FILE
    try:
        set_unit_counts(model, meta["heads_per_layer"], meta["neurons_per_layer"])
        load_model(model, str(weights), strict=True, device=str(device))
    except SafetensorError as error:
        raise ValueError(
            f"{weights} is unreadable or truncated ({error}); prune again or restore it"
        ) from error
    except (ValueError, RuntimeError, KeyError) as error:  # shapes or names that differ from the weights
        detail = str(error).strip().splitlines()[-1].strip()
        raise ValueError(
            f"{directory / META_FILE} does not match {weights} ({detail}); prune again or restore both"
        ) from error
    return model.to(device).eval()


def is_pruned_folder(path: str | Path) -> bool:
    return (Path(path) / META_FILE).is_file()
