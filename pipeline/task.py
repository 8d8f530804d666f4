"""The task of params.yaml's `data` section: its kprune TaskSpec, its splits, its dev sets.

`data.task` is the embedded default (`rotten_tomatoes`), a registry task (`glue/sst2`, `glue/mnli`,
`squad`, `squad_v2`, ... loaded from the hub unless `data.train`/`data.dev` name local files), or a
task kind (`classification`, `regression`, `question-answering`) for local data of your own; a local
classification may name its classes in `data.label_names` (in class-id order), so that its files can hold
the names and the fine-tuned teacher carries them.
The prepare stage writes the TaskSpec to data/prepared/task.json, so later stages never re-read params.
Later stages and bench/ read the prepared data back with `load_task`, `read_train`, `dev_sets` and
`first_dev_set`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

import datasets
import torch
import transformers

from kprune import squad
from kprune.arch import CLASSIFICATION, QUESTION_ANSWERING
from kprune.data import TaskData, clean_split, load_task_data, seeded_rows
from kprune.rotten_tomatoes import LABELS, read_rotten_tomatoes, split_by_movie
from kprune.tasks import DEFAULT_METRICS, KINDS, TaskSpec, custom_task, get_task
from pipeline import store
from pipeline.project import PREPARED

if TYPE_CHECKING:
    from kprune.evaluate import EvalSet

EMBEDDED = TaskSpec(
    "rotten_tomatoes", CLASSIFICATION, DEFAULT_METRICS[CLASSIFICATION], "accuracy", label_names=LABELS
)
COLUMN_OPTIONS = (
    "text_column",
    "text_pair_column",
    "label_column",
    "question_column",
    "context_column",
    "answers_column",
)
TASK_FILE = "task.json"  # in the prepared folder
DEV_EXAMPLES = "dev_examples"  # in the prepared folder: one datasets folder per dev split
WINDOW = ("max_length", "stride", "max_question_tokens")  # how sequences are cut (QA: windows)


def task_from_params(data: dict) -> TaskSpec:
    columns = {name: data.get(name) for name in COLUMN_OPTIONS}
    name = data["task"]
    if data.get("label_names") is not None and name not in KINDS:
        raise ValueError(
            f"data.label_names is for local data (data.task: classification), not for the task {name}"
        )
    if name == EMBEDDED.name:
        return EMBEDDED
    if name in KINDS:
        given = {key: value for key, value in columns.items() if value is not None}
        allows_no_answer = bool(data.get("allows_no_answer"))
        return custom_task(
            name, allows_no_answer=allows_no_answer, label_names=data.get("label_names"), **given
        )
    return get_task(name).with_columns(**columns)


def load_splits(task: TaskSpec, data: dict) -> TaskData:
    """Train and dev splits, checked and cleaned (skipped rows are logged and counted)."""
    if task is EMBEDDED:
        train, dev = split_by_movie(read_rotten_tomatoes(), data["dev_fraction"], data["seed"])
        dev, skipped = clean_split(task, dev, where="the Rotten Tomatoes dev split")
        train, skipped_train = clean_split(task, train, where="the Rotten Tomatoes train split")
        return TaskData(train, {"validation": dev}, {"train": skipped_train, "validation": skipped})
    if task.kind != QUESTION_ANSWERING and task.hub_path is None and data.get("train") is None:
        raise ValueError(f"data.task {task.name!r} needs local files: set data.train and data.dev")
    return load_task_data(task, data.get("train"), data.get("dev"), hub_dataset=data.get("hub_dataset"))


def save_task(task: TaskSpec, prepared: Path = PREPARED) -> None:
    store.write_json(prepared / TASK_FILE, dataclasses.asdict(task))


def load_task(prepared: Path = PREPARED) -> TaskSpec:
    fields = store.read_json(prepared / TASK_FILE)
    return TaskSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})


def save_dev_examples(splits: dict[str, datasets.Dataset], prepared: Path = PREPARED) -> None:
    for split, table in splits.items():
        store.write_dataset(prepared / DEV_EXAMPLES / split, table)


def read_train(prepared: Path = PREPARED) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(model inputs, labels) of the tokenized train split (classification and regression only)."""
    train = store.read_table(prepared / "train")
    labels = train.pop("label")
    return train, labels


def sample_labels(data: dict, prepared: Path = PREPARED) -> torch.Tensor:
    """The true labels of the prepared sample (Kwon et al. need them; classification and regression): the
    sample is the seeded rows of the train split (kprune.data.seeded_rows), found again on the tokenized
    train split and checked against the sample."""
    inputs, labels = read_train(prepared)
    lengths = inputs["attention_mask"].sum(1).tolist()
    rows = seeded_rows(
        len(lengths), lambda index: [lengths[i] for i in index], data["sample_tokens"], data["seed"]
    )
    sample = store.read_table(prepared / "sample")["input_ids"]
    if not torch.equal(inputs["input_ids"][rows, : sample.shape[1]], sample):
        raise ValueError(f"the sample in {prepared} is not the seeded rows of its train split")
    return labels[rows]


def window_from_params(task: TaskSpec, data: dict) -> dict:
    """How sequences are cut: max_length, and for QA stride and max_question_tokens, from params.yaml's
    data section; null (or a missing key) takes the default, and stride 0 stays 0."""
    defaults = (task.default_max_length, squad.STRIDE, squad.MAX_QUESTION_TOKENS)
    return {
        name: default if data.get(name) is None else data[name]
        for name, default in zip(WINDOW, defaults, strict=True)
    }


def window_options(info: dict) -> dict:
    """The window prepare recorded in data/prepared/info.json; every stage that tokenizes dev rows uses
    the same."""
    return {name: info[name] for name in WINDOW}


def dev_sets(task: TaskSpec, tokenizer, window: dict, prepared: Path = PREPARED) -> dict[str, EvalSet]:
    """Each dev split, tokenized for evaluation (QA: windows with offsets, see window_options), by
    split name: the task's own splits first, in its order."""
    from kprune.evaluate import evaluation_set  # scipy and sklearn: read_train (bench.cost) stays light

    dev = prepared / DEV_EXAMPLES
    present = {path.name for path in dev.iterdir() if path.is_dir()}
    splits = [name for name in task.dev_splits if name in present] + sorted(present - set(task.dev_splits))
    return {
        split: evaluation_set(task, datasets.load_from_disk(str(dev / split)), tokenizer, **window)
        for split in splits
    }


def first_dev_set(prepared: Path = PREPARED) -> EvalSet:
    """The first of dev_sets (the split the teacher stage reports), tokenized with the tokenizer and
    window prepare recorded."""
    info = store.read_json(prepared / "info.json")
    tokenizer = transformers.AutoTokenizer.from_pretrained(info["tokenizer"])
    return next(iter(dev_sets(load_task(prepared), tokenizer, window_options(info), prepared).values()))
