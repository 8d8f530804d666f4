"""The task registry: what a task's data looks like and how it is scored.

A :class:`TaskSpec` names a task's columns, label set, kind (classification, regression or extractive
QA), metrics, hub location and dev splits. The registry holds the eight GLUE tasks of the paper's
benchmark family and SQuAD v1.1 / v2.0; data of your own is a :func:`custom_task`, and a registry task
whose local copy names its columns differently is ``task.with_columns(text_column=...)``.

    task = get_task("glue/mnli")          # also "mnli", "MNLI", "squad", "squad_v2", ...
    task.dev_splits                       # ("validation_matched", "validation_mismatched")
    mine = custom_task(CLASSIFICATION, text_column="review")
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

# The task kinds, one per head kprune knows (kprune.arch.task_of tells a model's).
CLASSIFICATION = "classification"
REGRESSION = "regression"
QUESTION_ANSWERING = "question-answering"
KINDS = (CLASSIFICATION, REGRESSION, QUESTION_ANSWERING)
GLUE_HUB = "nyu-mll/glue"
# QA windows (kprune.squad): context tokens shared by consecutive windows, and the question's cap.
STRIDE = 128
MAX_QUESTION_TOKENS = 64  # BERT's run_squad.py max_query_length
DEFAULT_MAX_LENGTH = {CLASSIFICATION: 128, REGRESSION: 128, QUESTION_ANSWERING: 384}
DEFAULT_METRICS = {
    CLASSIFICATION: ("accuracy", "macro_f1"),
    REGRESSION: ("mse", "pearson", "spearman"),
    QUESTION_ANSWERING: ("exact_match", "f1"),
}


@dataclass(frozen=True)
class TaskSpec:
    """One task: its kind, columns, labels, metrics and where its data lives.

    label_names: class names in class-id order (a model that names its labels the same way, in any
        order and any letter case, is matched by name); None takes the labels as they are.
    metrics: what :func:`kprune.evaluate.dev_metrics` reports (fractions in [0, 1]); main_metric is
        the one to compare runs by.
    allows_no_answer: SQuAD v2 semantics: questions may have no answer, predicted as "" when the
        null score beats the best span by more than the no-answer threshold.
    hub_path, hub_config: ``datasets.load_dataset(hub_path, hub_config)``; None for local-only tasks.
    reference_length: the paper's average tokens per sequence for the FLOPs model, used on request.
    """

    name: str
    kind: str
    metrics: tuple[str, ...]
    main_metric: str
    text_column: str = "text"
    text_pair_column: str | None = None
    label_column: str = "label"
    label_names: tuple[str, ...] | None = None
    question_column: str = "question"
    context_column: str = "context"
    answers_column: str = "answers"
    allows_no_answer: bool = False
    hub_path: str | None = None
    hub_config: str | None = None
    train_split: str = "train"
    dev_splits: tuple[str, ...] = ("validation",)
    reference_length: float | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"task kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.main_metric not in self.metrics:
            raise ValueError(f"main metric {self.main_metric!r} is not one of {self.metrics}")

    @property
    def default_max_length(self) -> int:
        """Tokens per sequence when none is given: 128, or 384 for QA (the standard SQuAD setting)."""
        return DEFAULT_MAX_LENGTH[self.kind]

    @property
    def input_columns(self) -> list[str]:
        """The text columns the model reads."""
        if self.kind == QUESTION_ANSWERING:
            return [self.question_column, self.context_column]
        return [name for name in (self.text_column, self.text_pair_column) if name is not None]

    @property
    def target_column(self) -> str:
        """The column scored against: labels, or the answers of QA."""
        return self.answers_column if self.kind == QUESTION_ANSWERING else self.label_column

    def with_columns(self, **columns: str | None) -> TaskSpec:
        """The same task with some column names changed; None keeps a column's current name."""
        unknown = set(columns) - {
            field.name for field in dataclasses.fields(self) if field.name.endswith("_column")
        }
        if unknown:
            raise ValueError(f"not column options: {sorted(unknown)}")
        return dataclasses.replace(
            self, **{name: value for name, value in columns.items() if value is not None}
        )


def custom_task(
    kind: str,
    name: str = "custom",
    *,
    allows_no_answer: bool = False,
    label_names: Sequence[str] | None = None,
    **columns,
) -> TaskSpec:
    """A task for data of your own: the kind's default metrics and the given column names; a
    classification's ``label_names`` (class names in class-id order) let its files hold names."""
    if kind not in KINDS:
        raise ValueError(f"task kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if label_names is not None and kind != CLASSIFICATION:
        raise ValueError(f"label names are for classification, not {kind}")
    metrics = DEFAULT_METRICS[kind]
    main = {CLASSIFICATION: "accuracy", REGRESSION: "spearman", QUESTION_ANSWERING: "f1"}[kind]
    names = None if label_names is None else tuple(label_names)
    task = TaskSpec(name, kind, metrics, main, label_names=names, allows_no_answer=allows_no_answer)
    return task.with_columns(**columns)


def _glue(
    config: str, columns: tuple[str, str | None], labels, metrics, main, length=None, **extra
) -> TaskSpec:
    kind = REGRESSION if labels is None else CLASSIFICATION
    text, pair = columns
    return TaskSpec(
        f"glue/{config}",
        kind,
        metrics,
        main,
        text_column=text,
        text_pair_column=pair,
        label_names=labels,
        hub_path=GLUE_HUB,
        hub_config=config,
        reference_length=length,
        **extra,
    )


_ENTAILMENT = ("entailment", "not_entailment")

# Columns and label orders are those of the nyu-mll/glue and rajpurkar/squad(_v2) hub data sets.
# Binary F1 scores the positive class 1 (equivalent, duplicate), as GLUE does.
TASKS: dict[str, TaskSpec] = {
    task.name: task
    for task in (
        _glue(
            "cola",
            ("sentence", None),
            ("unacceptable", "acceptable"),
            ("matthews_correlation", "accuracy"),
            "matthews_correlation",
        ),
        _glue("sst2", ("sentence", None), ("negative", "positive"), ("accuracy",), "accuracy", 25.16),
        _glue(
            "mrpc",
            ("sentence1", "sentence2"),
            ("not_equivalent", "equivalent"),
            ("accuracy", "f1"),
            "accuracy",
            53.24,
        ),
        _glue("stsb", ("sentence1", "sentence2"), None, ("pearson", "spearman"), "spearman", 31.47),
        _glue(
            "qqp",
            ("question1", "question2"),
            ("not_duplicate", "duplicate"),
            ("accuracy", "f1"),
            "accuracy",
            30.55,
        ),
        _glue(
            "mnli",
            ("premise", "hypothesis"),
            ("entailment", "neutral", "contradiction"),
            ("accuracy",),
            "accuracy",
            39.05,
            dev_splits=("validation_matched", "validation_mismatched"),
        ),
        _glue("qnli", ("question", "sentence"), _ENTAILMENT, ("accuracy",), "accuracy", 50.97),
        _glue("rte", ("sentence1", "sentence2"), _ENTAILMENT, ("accuracy",), "accuracy"),
        TaskSpec(
            "squad",
            QUESTION_ANSWERING,
            ("exact_match", "f1"),
            "f1",
            hub_path="rajpurkar/squad",
            reference_length=170.0,
        ),
        TaskSpec(
            "squad_v2",
            QUESTION_ANSWERING,
            ("exact_match", "f1"),
            "f1",
            allows_no_answer=True,
            hub_path="rajpurkar/squad_v2",
        ),
    )
}


def _key(name: str) -> str:
    return name.strip().lower().replace("-", "")


_BY_KEY = {_key(name): task for name, task in TASKS.items()} | {
    _key(name.removeprefix("glue/")): task for name, task in TASKS.items()
}


def get_task(name: str) -> TaskSpec:
    """A registry task: ``glue/sst2`` or ``sst2`` (any case, ``sst-2`` too), ``squad``, ``squad_v2``."""
    task = _BY_KEY.get(_key(name))
    if task is None:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    return task
