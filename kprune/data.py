"""Task data: load a task's splits from the hub or local files, check and clean them, draw the
calibration sample, measure lengths, encode labels.

Everything goes through ``datasets`` (``load_dataset`` for hub names, its packaged loaders for local
CSV / TSV / JSON(L) / Parquet files and ``save_to_disk`` folders) and the model's fast tokenizer,
called on whole columns at once. A task is a :class:`kprune.tasks.TaskSpec`: its columns, labels and
kind. What a pipeline needs, from a task name or local paths:

    task = get_task("glue/mrpc")                      # or custom_task(kind, text_column=...), or
                                                      # get_task("squad").with_columns(context_column=...)
    data = load_task_data(task)                       # hub; or train="train.csv", dev="dev.jsonl"
    check_model_for_task(task, model, tokenizer, max_length=128)
    sample = calibration_sample(task, data.train, tokenizer, num_tokens=100_000, seed=0)  # kprune.prune input
    seq_len = average_token_length(task, data.dev["validation"], tokenizer)               # FLOPs model
    dev = kprune.evaluate.evaluation_set(task, data.dev["validation"], tokenizer)
    metrics = kprune.evaluate.evaluate_model(model, dev)

Bad data never fails deep in torch: a missing column, an unknown label, an empty split or a length
over the model's positions is one ValueError; rows with empty text or a missing label/answer are
skipped, logged and counted (``TaskData.skipped``); text longer than max_length is truncated (QA:
cut into windows) and counted in the log.
"""

from __future__ import annotations

import codecs
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch import nn

from kprune import squad
from kprune.arch import QUESTION_ANSWERING, REGRESSION, family_of, task_of
from kprune.config import DEFAULT_NUM_TOKENS
from kprune.tasks import TaskSpec

logger = logging.getLogger(__name__)

# Suffix -> (datasets packaged loader, its options). A new local format is one entry.
# CSV: only an empty cell is missing; pandas would also take the words NaN, null, NA, n/a, ... for nulls.
CSV_NULLS = {"keep_default_na": False, "na_values": [""]}
TABLE_FORMATS: dict[str, tuple[str, dict]] = {
    ".csv": ("csv", CSV_NULLS),
    ".tsv": ("csv", {"delimiter": "\t", **CSV_NULLS}),
    ".json": ("json", {}),
    ".jsonl": ("json", {}),
    ".parquet": ("parquet", {}),
}
TEXT_DTYPES = ("string", "large_string")
_LENGTH_CHUNK = 4096  # rows tokenized at once while measuring lengths


def load_table(path: str | Path) -> datasets.Dataset:
    """One table from a local CSV, TSV, JSON, JSON Lines or Parquet file, or a ``save_to_disk`` folder.

    A .json file in the official SQuAD layout (articles > paragraphs > questions) becomes one row per
    question with the hub's columns: id, title, context, question, answers.
    """
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
    if loader != "parquet":
        check_text_file(path)
    if suffix == ".json" and squad.is_official_json(path):
        return squad.read_official_json(path)
    try:
        return datasets.load_dataset(loader, data_files=str(path), split="train", **options)
    except ValueError as error:
        if "corresponds to no data" not in str(error):  # datasets' words for a table without rows
            raise
        only = " (only a header line)" if loader == "csv" else ""
        raise ValueError(f"data file {path} has no rows{only}; it needs one row per example") from error
    except datasets.exceptions.DatasetGenerationError as error:
        raise ValueError(f"cannot read {path} as {suffix[1:].upper()}: {_root_cause(error)}") from error


def check_text_file(path: Path, chunk_bytes: int = 1 << 20) -> None:
    """One ValueError if a text data file is empty (or blank) or not UTF-8, naming the first bad byte."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    blank, offset = True, 0
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_bytes), b""):
            try:
                text = decoder.decode(chunk)
            except UnicodeDecodeError as error:
                position = offset + error.start
                raise ValueError(
                    f"data file {path} is not UTF-8 text (byte 0x{chunk[error.start]:02x} at offset "
                    f"{position}); save it as UTF-8, e.g. iconv -f latin1 -t utf-8 {path.name}"
                ) from None
            blank = blank and not text.strip()
            offset += len(chunk)
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise ValueError(f"data file {path} is not UTF-8 text (it ends inside a character)") from None
    if blank:
        raise ValueError(f"data file {path} is empty; it needs a header line (or JSON keys) and rows")


def _root_cause(error: BaseException) -> str:
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__
    return f"{type(error).__name__}: {error}"


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


def _row_lengths(table, tokenizer, text_column, text_pair_column, max_length) -> list[int]:
    """Tokens of each row after truncation to ``max_length`` (no padding)."""
    texts, pairs = _texts(table, text_column, text_pair_column, tokenizer)
    encoded = tokenizer(
        texts,
        pairs,
        truncation=True,
        max_length=max_length,
        return_length=True,
        return_attention_mask=False,
        return_token_type_ids=False,
    )
    return encoded["length"]


def seeded_rows(
    num_rows: int, row_tokens: Callable[[np.ndarray], Sequence[int]], num_tokens: int, seed: int
) -> list[int]:
    """Indices of seeded random rows holding about ``num_tokens`` tokens, ascending.

    Rows are taken in a seeded random order until their tokens (``row_tokens(indices)`` gives each
    row's count) reach ``num_tokens``, or all rows are taken: the paper's
    ``min(num_tokens / average length, num_rows)`` rows, with the average measured on the rows drawn.
    Counts are asked for in chunks, so a large table is only tokenized as far as needed.
    """
    if num_tokens <= 0:
        raise ValueError(f"num_tokens must be positive, got {num_tokens}")
    if num_rows == 0:
        raise ValueError("the data has no rows to sample from")
    order = np.random.default_rng(seed).permutation(num_rows)
    lengths: list[int] = []
    for start in range(0, num_rows, _LENGTH_CHUNK):
        lengths.extend(row_tokens(order[start : start + _LENGTH_CHUNK]))
        if sum(lengths) >= num_tokens:
            break
    # The first row whose running total reaches num_tokens closes the sample.
    taken = int(np.searchsorted(np.cumsum(lengths), num_tokens)) + 1
    if taken > len(lengths):
        logger.info("the data holds only %d tokens; the sample takes all %d rows", sum(lengths), num_rows)
    return sorted(order[: min(taken, len(lengths))].tolist())


def choose_sample_rows(
    table: datasets.Dataset,
    tokenizer,
    num_tokens: int = DEFAULT_NUM_TOKENS,
    seed: int = 0,
    text_column: str = "text",
    text_pair_column: str | None = None,
    max_length: int = 128,
) -> list[int]:
    """Indices of a seeded random subset of rows holding about ``num_tokens`` tokens after truncation
    (see :func:`seeded_rows`)."""

    def row_tokens(indices: np.ndarray) -> list[int]:
        return _row_lengths(table.select(indices), tokenizer, text_column, text_pair_column, max_length)

    return seeded_rows(len(table), row_tokens, num_tokens, seed)


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


def _integral_floats_as_ints(values: np.ndarray) -> np.ndarray:
    """Class ids read as floats (a CSV column that held empty cells) back as ints."""
    if values.dtype.kind == "f" and np.all(values == np.round(values)):
        return values.astype(np.int64)
    return values


def class_ids(values: Sequence, label_names: Sequence[str], where: str = "the data") -> np.ndarray:
    """Labels as class ids in ``label_names`` order: ids are checked, names matched in any letter case.

    Integral floats (a CSV column that once held empty cells) count as ids. One ValueError lists
    the unknown labels.
    """
    values = _integral_floats_as_ints(np.asarray(list(values)))
    if np.issubdtype(values.dtype, np.integer):
        ids = values
        unknown = np.unique(values[(values < 0) | (values >= len(label_names))]).tolist()
    elif values.dtype.kind in "UO":
        names = pa.array([name.lower() for name in label_names])
        found = pc.index_in(pc.utf8_lower(pa.array(values.astype(str))), value_set=names)
        ids = found.to_numpy(zero_copy_only=False)  # NaN where unknown
        unknown = np.unique(values[np.isnan(ids.astype(float))].astype(str)).tolist()
    else:
        raise ValueError(f"labels in {where} must be class ids or label names, got {values.dtype} values")
    if unknown:
        raise ValueError(
            f"unknown labels {unknown[:10]} in {where}; the labels are {list(label_names)} "
            f"or their class ids 0..{len(label_names) - 1}"
        )
    return np.asarray(ids, dtype=np.int64)


def encode_labels(
    values: Sequence, model: nn.Module, label_names: Sequence[str] | None = None
) -> torch.Tensor:
    """A label column as the model's targets: floats for regression, class ids for classification.

    With the task's ``label_names`` (class names in the task's id order), labels are task class ids or
    names; a model that names its labels the same way (any order, any letter case) gets them mapped
    to its own ids by name, other models are taken to use the task's order. Without them, string
    labels are mapped through the model's ``config.label2id`` (the model must name its labels) and
    integer labels must be class ids in [0, num_labels).
    """
    values = np.asarray(list(values))
    if task_of(model) == REGRESSION:
        if not np.issubdtype(values.dtype, np.number):
            raise ValueError(f"a regression model needs numeric labels, got {values.dtype} values")
        return torch.as_tensor(values, dtype=torch.float32)
    config = model.config
    if label_names is not None:
        if len(label_names) != config.num_labels:
            raise ValueError(
                f"the task has {len(label_names)} labels {list(label_names)}, the model {config.num_labels}"
            )
        return torch.as_tensor(_task_to_model_ids(label_names, config)[class_ids(values, label_names)])
    values = _integral_floats_as_ints(values)
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


def _task_to_model_ids(label_names: Sequence[str], config) -> np.ndarray:
    """model id of each task class: by name when the model names all the task's labels, else the same id.

    Models fine-tuned on the same task may order labels differently (roberta-large-mnli puts
    contradiction first), so names win over positions whenever the model has them.
    """
    model_ids = {str(name).lower(): int(index) for name, index in config.label2id.items()}
    if all(name.lower() in model_ids for name in label_names):
        return np.array([model_ids[name.lower()] for name in label_names])
    if has_label_names(config):
        logger.warning(
            "the model's labels %s are not the task's %s; task class ids are taken as model class ids",
            sorted(config.label2id),
            list(label_names),
        )
    return np.arange(len(label_names))


# ---------------------------------------------------------------- tasks: splits, checks, sample, lengths


@dataclass
class TaskData:
    """A task's splits, checked and cleaned: ``train`` (None if not loaded) and each dev split by name."""

    train: datasets.Dataset | None
    dev: dict[str, datasets.Dataset]
    skipped: dict[str, int] = field(default_factory=dict)  # rows dropped per split (empty text, no label)


def load_task_split(
    task: TaskSpec,
    split: str | None = None,
    path: str | Path | None = None,
    *,
    hub_dataset: str | None = None,
    labelled: bool = True,
) -> tuple[datasets.Dataset, int]:
    """One split of a task, checked and cleaned, and how many rows were skipped.

    From the local file or folder ``path`` if given (any :func:`load_table` format), else
    ``datasets.load_dataset(hub_dataset or task.hub_path, task.hub_config, split=split)``; split
    defaults to the task's train split. ``hub_dataset`` may be a local copy of the hub repository.
    ``labelled=False`` (a calibration split) does not need or check labels.
    """
    split = split or task.train_split
    if path is not None:
        table, where = load_table(path), str(path)
    else:
        source = hub_dataset or task.hub_path
        if source is None:
            raise ValueError(
                f"task {task.name!r} has no hub data set; give a local file for its {split} split"
            )
        logger.info("loading %s split %s of %s (config %s)", task.name, split, source, task.hub_config)
        # datasets caches a local repository by its folder name and file patterns, not its content:
        # rebuild a local copy every time, so an edited or another same-named folder is never stale.
        local = Path(source).expanduser().is_dir()
        mode = "force_redownload" if local else None
        table = datasets.load_dataset(source, task.hub_config, split=split, download_mode=mode)
        where = f"{source} {task.hub_config or ''} {split}".replace("  ", " ")
    return clean_split(task, table, labelled, where)


def clean_split(
    task: TaskSpec, table: datasets.Dataset, labelled: bool = True, where: str = "the data"
) -> tuple[datasets.Dataset, int]:
    """Check a split's columns and labels and skip (logged, counted) rows with empty text or no label.

    Labels of a task with label names become its class ids. Errors: a missing column, a non-text input
    column, unknown labels, non-numeric regression labels, QA answers not in SQuAD format or missing
    where the task needs one, and no rows left.
    """
    target = [task.target_column] if labelled else []
    check_columns(table, task.input_columns + target, task.input_columns)
    table, skipped = drop_incomplete_rows(table, task.input_columns, target)
    if len(table) == 0:
        left = f" left after skipping {skipped} rows with empty text or no label" if skipped else ""
        raise ValueError(f"{where} has no rows{left}")
    if not labelled:
        return table, skipped
    if task.kind == QUESTION_ANSWERING:
        _check_answers(task, table, where)
    elif task.kind == REGRESSION:
        if not np.issubdtype(np.asarray(table[task.label_column][:1]).dtype, np.number):
            raise ValueError(
                f"{task.name} needs numeric labels; column {task.label_column!r} of {where} holds "
                f"{table.features[task.label_column]}"
            )
    elif task.label_names is not None:
        ids = class_ids(table[task.label_column], task.label_names, where)
        table = table.remove_columns(task.label_column).add_column(task.label_column, ids.tolist())
        table = table.cast_column(task.label_column, datasets.ClassLabel(names=list(task.label_names)))
    return table, skipped


def _check_answers(task: TaskSpec, table: datasets.Dataset, where: str) -> None:
    feature = table.features[task.answers_column]
    if not isinstance(feature, dict) or "text" not in feature or "answer_start" not in feature:
        raise ValueError(
            f"column {task.answers_column!r} of {where} must hold SQuAD answers "
            f"{{'text': [...], 'answer_start': [...]}} (JSON, JSON Lines, Parquet or a datasets folder), "
            f"it holds {feature}"
        )
    if task.allows_no_answer:
        return
    texts = pc.struct_field(table.with_format("arrow")[task.answers_column], "text")
    unanswered = int(pc.sum(pc.equal(pc.list_value_length(texts), 0)).as_py() or 0)
    if unanswered:
        raise ValueError(
            f"{unanswered} questions in {where} have no answer, which {task.name} does not allow; "
            "use squad_v2 (or allows_no_answer) for data with unanswerable questions"
        )


def load_task_data(
    task: TaskSpec,
    train: str | Path | None = None,
    dev: str | Path | Mapping[str, str | Path] | None = None,
    *,
    hub_dataset: str | None = None,
) -> TaskData:
    """The train split (labels not needed) and every dev split of a task.

    Each split comes from its local path if given, else from the hub (``task.hub_path``, or
    ``hub_dataset``). ``dev`` is one path (the split is named after the task's first dev split) or
    a mapping of split names to paths, e.g. MNLI's validation_matched and validation_mismatched.
    """
    train_table, skipped_train = load_task_split(
        task, task.train_split, train, hub_dataset=hub_dataset, labelled=False
    )
    skipped = {task.train_split: skipped_train}
    if dev is None:
        dev_paths: Mapping[str, str | Path | None] = dict.fromkeys(task.dev_splits)
    elif isinstance(dev, Mapping):
        dev_paths = dev
    else:
        dev_paths = {task.dev_splits[0]: dev}
    dev_tables = {}
    for split, path in dev_paths.items():
        dev_tables[split], skipped[split] = load_task_split(task, split, path, hub_dataset=hub_dataset)
    return TaskData(train_table, dev_tables, skipped)


def max_positions(model: nn.Module, tokenizer) -> int:
    """The longest sequence the model and tokenizer take. RoBERTa-style position ids start after the
    padding id, so those models have pad_token_id + 1 positions fewer than max_position_embeddings."""
    config = model.config
    limit = config.max_position_embeddings
    if family_of(model).name in ("roberta", "xlm-roberta"):
        limit -= config.pad_token_id + 1
    return min(limit, tokenizer.model_max_length)


def check_model_for_task(task: TaskSpec, model: nn.Module, tokenizer, max_length: int) -> None:
    """One ValueError if the model cannot run the task: another head, label count or too few positions."""
    kind = task_of(model)
    if kind != task.kind:
        raise ValueError(f"{task.name} is a {task.kind} task, but the model is a {kind} model")
    if task.label_names is not None and model.config.num_labels != len(task.label_names):
        raise ValueError(
            f"{task.name} has {len(task.label_names)} labels {list(task.label_names)}, the model "
            f"{model.config.num_labels}"
        )
    limit = max_positions(model, tokenizer)
    if max_length > limit:
        raise ValueError(f"max_length {max_length} is longer than the model's {limit} positions")


def calibration_sample(
    task: TaskSpec,
    train: datasets.Dataset,
    tokenizer,
    num_tokens: int = DEFAULT_NUM_TOKENS,
    seed: int = 0,
    max_length: int | None = None,
    stride: int = squad.STRIDE,
    max_question_tokens: int = squad.MAX_QUESTION_TOKENS,
) -> dict[str, torch.Tensor]:
    """The ``sample`` of :func:`kprune.prune`: seeded random train rows holding about ``num_tokens``
    tokens (see :func:`seeded_rows`), tokenized; for QA the windows of the questions drawn.

    max_length: default 128 (384 for QA).
    """
    max_length = max_length or task.default_max_length
    if task.kind != QUESTION_ANSWERING:
        return draw_sample(
            train, tokenizer, num_tokens, seed, task.text_column, task.text_pair_column, max_length
        )
    questions, contexts = list(train[task.question_column]), list(train[task.context_column])
    window_options = dict(max_length=max_length, stride=stride, max_question_tokens=max_question_tokens)

    def row_tokens(indices: np.ndarray) -> np.ndarray:
        chunk = [questions[i] for i in indices], [contexts[i] for i in indices]
        lengths, example = squad.window_lengths(*chunk, tokenizer, **window_options)
        return np.bincount(example, weights=lengths, minlength=len(indices)).astype(int)

    rows = seeded_rows(len(train), row_tokens, num_tokens, seed)
    windows = squad.tokenize_windows(
        [questions[i] for i in rows],
        [contexts[i] for i in rows],
        tokenizer,
        with_offsets=False,
        **window_options,
    )
    logger.info(
        "sample: %d of %d questions, %d windows, %d tokens",
        len(rows),
        len(train),
        len(windows.example_index),
        int(windows.inputs["attention_mask"].sum()),
    )
    return windows.inputs


def average_token_length(
    task: TaskSpec,
    examples: datasets.Dataset,
    tokenizer,
    max_length: int | None = None,
    stride: int = squad.STRIDE,
    max_question_tokens: int = squad.MAX_QUESTION_TOKENS,
) -> float:
    """Mean tokens per sequence the model reads (after truncation; for QA per window): the FLOPs
    model's sequence length, measured on a dev split. The paper's values are ``task.reference_length``."""
    max_length = max_length or task.default_max_length
    if task.kind == QUESTION_ANSWERING:
        lengths, _ = squad.window_lengths(
            examples[task.question_column],
            examples[task.context_column],
            tokenizer,
            max_length,
            stride,
            max_question_tokens,
        )
    else:
        lengths = _row_lengths(examples, tokenizer, task.text_column, task.text_pair_column, max_length)
    return float(np.mean(lengths))
