"""Local task data: read a table, map its columns, draw a calibration sample, encode labels.

Everything goes through ``datasets`` (its own offline loaders) and the model's fast tokenizer, called
on whole columns at once. Nothing is ever downloaded.

    table = load_table("train.csv")
    table, skipped = drop_incomplete_rows(table, ["text"])
    sample = draw_sample(table, tokenizer, num_tokens=100_000)   # input of kprune.prune
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import datasets
import numpy as np
import pyarrow.compute as pc
import torch
from torch import nn

from kprune.arch import REGRESSION, task_of

logger = logging.getLogger(__name__)

# Suffix -> (datasets packaged loader, its options). A new local format is one entry.
TABLE_FORMATS: dict[str, tuple[str, dict]] = {
    ".csv": ("csv", {}),
    ".tsv": ("csv", {"delimiter": "\t"}),
    ".json": ("json", {}),
    ".jsonl": ("json", {}),
    ".parquet": ("parquet", {}),
}
TEXT_DTYPES = ("string", "large_string")
DEFAULT_NUM_TOKENS = 100_000
_LENGTH_CHUNK = 4096  # rows tokenized at once while measuring lengths


def load_table(path: str | Path) -> datasets.Dataset:
    """One table from a local CSV, TSV, JSON, JSON Lines or Parquet file, or a ``save_to_disk`` folder."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data file not found: {path}")
    if path.is_dir():
        table = datasets.load_from_disk(str(path))
        if isinstance(table, datasets.DatasetDict):
            raise ValueError(
                f"{path} holds the splits {sorted(table)}; pass one split's folder, e.g. {path / 'train'}"
            )
        return table
    suffix = path.suffix.lower()
    if suffix not in TABLE_FORMATS:
        raise ValueError(
            f"cannot read {path}: unknown extension {suffix!r}; "
            f"use one of {', '.join(TABLE_FORMATS)} or a datasets save_to_disk folder"
        )
    loader, options = TABLE_FORMATS[suffix]
    return datasets.load_dataset(loader, data_files=str(path), split="train", **options)


def check_columns(
    table: datasets.Dataset, columns: Sequence[str | None], text_columns: Sequence[str]
) -> None:
    """Raise one ValueError naming every missing column and the available ones."""
    missing = [name for name in columns if name is not None and name not in table.column_names]
    if missing:
        raise ValueError(
            f"column {', '.join(map(repr, missing))} not in the data; "
            f"available columns: {', '.join(table.column_names)}"
        )
    for name in text_columns:
        dtype = getattr(table.features[name], "dtype", None)
        if dtype not in TEXT_DTYPES:
            raise ValueError(f"column {name!r} must hold text, it holds {table.features[name]}")


def drop_incomplete_rows(
    table: datasets.Dataset, text_columns: Sequence[str], other_columns: Sequence[str] = ()
) -> tuple[datasets.Dataset, int]:
    """Drop rows whose text is null or blank or whose other columns (e.g. the label) are null.

    Returns the kept rows and how many were dropped (also logged: never silent).
    """
    check_columns(table, [*text_columns, *other_columns], text_columns)
    columns = table.with_format("arrow")
    complete = np.ones(len(table), dtype=bool)
    for name in text_columns:
        text = columns[name]
        has_text = pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(text)), 0)  # null stays null
        complete &= pc.fill_null(has_text, False).to_numpy()
    for name in other_columns:
        complete &= pc.is_valid(columns[name]).to_numpy()
    dropped = int((~complete).sum())
    if not dropped:
        return table, 0
    needed = ", ".join(map(repr, [*text_columns, *other_columns]))
    logger.warning("skipped %d of %d rows: empty or missing %s", dropped, len(table), needed)
    return table.select(np.flatnonzero(complete)), dropped


def text_columns(text_column: str, text_pair_column: str | None = None) -> list[str]:
    return [name for name in (text_column, text_pair_column) if name is not None]


def _texts(table: datasets.Dataset, text_column: str, text_pair_column: str | None, tokenizer):
    """The texts (and pair texts) as lists, for one call of a fast tokenizer."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"kprune needs a fast (Rust) tokenizer, got {type(tokenizer).__name__}")
    pairs = list(table[text_pair_column]) if text_pair_column is not None else None
    return list(table[text_column]), pairs


def tokenize(
    table: datasets.Dataset,
    tokenizer,
    text_column: str = "text",
    text_pair_column: str | None = None,
    max_length: int = 128,
) -> dict[str, torch.Tensor]:
    """Tokenize every row at once: right-padded (N, S) tensors, truncated to ``max_length`` tokens.

    How many rows were truncated is logged.
    """
    if len(table) == 0:
        raise ValueError("no rows to tokenize")
    check_columns(table, [text_column, text_pair_column], text_columns(text_column, text_pair_column))
    texts, pairs = _texts(table, text_column, text_pair_column, tokenizer)
    encoded = tokenizer(
        texts, pairs, truncation=True, max_length=max_length, padding=True, return_tensors="pt"
    )
    # A fast tokenizer keeps the cut-off tokens of a truncated row as overflowing encodings.
    truncated = sum(bool(encoding.overflowing) for encoding in encoded.encodings)
    logger.info("tokenized %d rows; %d truncated to max_length %d", len(texts), truncated, max_length)
    return dict(encoded)


def choose_sample_rows(
    table: datasets.Dataset,
    tokenizer,
    num_tokens: int = DEFAULT_NUM_TOKENS,
    seed: int = 0,
    text_column: str = "text",
    text_pair_column: str | None = None,
    max_length: int = 128,
) -> list[int]:
    """Indices of a seeded random subset of rows holding about ``num_tokens`` tokens (after truncation).

    Rows are taken in a seeded random order until their tokens reach ``num_tokens``, or all rows are
    taken: the paper's ``min(num_tokens / average length, len(table))`` rows, with the average measured
    on the rows drawn. Lengths are measured in chunks, so a large table is only tokenized as far as needed.
    """
    if num_tokens <= 0:
        raise ValueError(f"num_tokens must be positive, got {num_tokens}")
    if len(table) == 0:
        raise ValueError("the data has no rows to sample from")
    order = np.random.default_rng(seed).permutation(len(table))
    lengths: list[int] = []
    for start in range(0, len(order), _LENGTH_CHUNK):
        chunk = table.select(order[start : start + _LENGTH_CHUNK])
        texts, pairs = _texts(chunk, text_column, text_pair_column, tokenizer)
        encoded = tokenizer(
            texts,
            pairs,
            truncation=True,
            max_length=max_length,
            return_length=True,
            return_attention_mask=False,
            return_token_type_ids=False,
        )
        lengths.extend(encoded["length"])
        if sum(lengths) >= num_tokens:
            break
    # The first row whose running total reaches num_tokens closes the sample.
    num_rows = int(np.searchsorted(np.cumsum(lengths), num_tokens)) + 1
    if num_rows > len(lengths):
        logger.info("the data holds only %d tokens; the sample takes all %d rows", sum(lengths), len(table))
    return sorted(order[: min(num_rows, len(lengths))].tolist())


def draw_sample(
    table: datasets.Dataset,
    tokenizer,
    num_tokens: int = DEFAULT_NUM_TOKENS,
    seed: int = 0,
    text_column: str = "text",
    text_pair_column: str | None = None,
    max_length: int = 128,
) -> dict[str, torch.Tensor]:
    """A tokenized calibration sample of about ``num_tokens`` tokens from seeded random rows (see
    :func:`choose_sample_rows`): the ``sample`` argument of :func:`kprune.prune`."""
    check_columns(table, [text_column, text_pair_column], text_columns(text_column, text_pair_column))
    rows = choose_sample_rows(table, tokenizer, num_tokens, seed, text_column, text_pair_column, max_length)
    sample = tokenize(table.select(rows), tokenizer, text_column, text_pair_column, max_length)
    logger.info(
        "sample: %d of %d rows, %d tokens", len(rows), len(table), int(sample["attention_mask"].sum())
    )
    return sample


def has_label_names(config) -> bool:
    """Whether a model config names its labels (transformers' defaults are LABEL_0, LABEL_1, ...)."""
    return any(name != f"LABEL_{index}" for index, name in config.id2label.items())


def encode_labels(values: Sequence, model: nn.Module) -> torch.Tensor:
    """A label column as the model's targets: floats for regression, class ids for classification.

    String labels are mapped through the model's ``config.label2id`` (the model must name its labels);
    integer labels must be class ids in [0, num_labels).
    """
    values = np.asarray(list(values))
    if task_of(model) == REGRESSION:
        if not np.issubdtype(values.dtype, np.number):
            raise ValueError(f"a regression model needs numeric labels, got {values.dtype} values")
        return torch.as_tensor(values, dtype=torch.float32)
    config = model.config
    if np.issubdtype(values.dtype, np.integer):
        ids = values
    elif values.dtype.kind in "UO":  # strings
        if not has_label_names(config):
            raise ValueError(
                "the labels are strings but the model does not name its labels (config.label2id is "
                "LABEL_0, LABEL_1, ...); use integer class ids"
            )
        names, inverse = np.unique(values.astype(str), return_inverse=True)
        unknown = [name for name in names.tolist() if name not in config.label2id]
        if unknown:
            raise ValueError(
                f"unknown labels {unknown[:10]}; the model's labels are {sorted(config.label2id)}"
            )
        ids = np.array([config.label2id[name] for name in names])[inverse]
    else:
        raise ValueError(f"classification labels must be class ids or label names, got {values.dtype}")
    out_of_range = (ids < 0) | (ids >= config.num_labels)
    if out_of_range.any():
        raise ValueError(
            f"labels {sorted(set(ids[out_of_range].tolist()))[:10]} are not class ids of a "
            f"{config.num_labels}-class model"
        )
    return torch.as_tensor(ids, dtype=torch.long)
