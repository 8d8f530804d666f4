"""Task metrics of a model on dev data: what `kprune eval`, the pipeline and the benchmark report.

Every metric is a fraction in [0, 1] (the official SQuAD script prints exact match and F1 times 100):

    accuracy, macro_f1        classification
    f1                        binary F1 of class 1 (MRPC, QQP); for QA the SQuAD token F1
    matthews_correlation      CoLA
    mse, pearson, spearman    regression (STS-B)
    exact_match, f1           SQuAD, with the official answer normalisation; SQuAD v2 adds the
                              has-answer / no-answer breakdown and the best no-answer thresholds

One entry scores any task's dev split from the model's outputs:

    examples, _ = kprune.data.load_task_split(task, "validation")
    dev = evaluation_set(task, examples, tokenizer)       # rows, or QA windows with offsets
    logits = predict(model, dev.inputs, batch_size=64, device="cpu")
    metrics = dev_metrics(dev, logits, model)             # or: evaluate_model(model, dev)
"""

from __future__ import annotations

import inspect
import math
import re
import string
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import datasets
import numpy as np
import torch
from scipy import stats
from sklearn.metrics import f1_score, matthews_corrcoef
from torch import nn

from kprune.arch import CLASSIFICATION, QUESTION_ANSWERING, REGRESSION, task_of
from kprune.data import encode_labels, tokenize
from kprune.models import model_logits, resolve_device
from kprune.squad import MAX_QUESTION_TOKENS, STRIDE, QAWindows, best_spans, tokenize_windows
from kprune.tasks import DEFAULT_METRICS, TaskSpec


@torch.no_grad()
def predict(
    model: nn.Module, inputs: dict[str, torch.Tensor], batch_size: int, device: torch.device | str
) -> torch.Tensor:
    """The model's logits for every row, in row order, batch by batch with padding trimmed.

    QA start/end logits (N, S, 2) come back at the inputs' full length S, -inf on padding.
    """
    accepted = inspect.signature(model.forward).parameters  # DistilBERT takes no token_type_ids
    lengths = inputs["attention_mask"].sum(1)
    full_width = inputs["attention_mask"].shape[1]
    logits = []
    for start in range(0, len(lengths), batch_size):
        width = int(lengths[start : start + batch_size].max())
        batch = {
            name: value[start : start + batch_size, :width].to(device)
            for name, value in inputs.items()
            if name in accepted
        }
        batch_logits = model_logits(model, batch).cpu()
        if batch_logits.dim() == 3:  # QA: positions back to the full width, so batches concatenate
            pad = batch_logits.new_full((len(batch_logits), full_width - width, 2), float("-inf"))
            batch_logits = torch.cat([batch_logits, pad], dim=1)
        logits.append(batch_logits)
    return torch.cat(logits)


# ---------------------------------------------------------------- classification and regression


def _finite_or_none(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None  # JSON has no NaN


def _correlation(function):
    def correlation(predicted: np.ndarray, truth: np.ndarray) -> float | None:
        if np.ptp(predicted) == 0 or np.ptp(truth) == 0:  # undefined for a constant
            return None
        return _finite_or_none(function(predicted, truth).statistic)

    return correlation


# name -> (kind, metric of (predicted, truth) arrays): class ids for classification, floats for regression
METRICS = {
    "accuracy": (CLASSIFICATION, lambda predicted, truth: float(np.mean(predicted == truth))),
    "macro_f1": (
        CLASSIFICATION,
        lambda predicted, truth: float(f1_score(truth, predicted, average="macro", zero_division=0)),
    ),
    "f1": (  # GLUE's F1 for MRPC and QQP: of the positive class 1
        CLASSIFICATION,
        lambda predicted, truth: float(
            f1_score(truth, predicted, pos_label=1, average="binary", zero_division=0)
        ),
    ),
    "matthews_correlation": (
        CLASSIFICATION,
        lambda predicted, truth: float(matthews_corrcoef(truth, predicted)),
    ),
    "mse": (REGRESSION, lambda predicted, truth: float(np.mean((predicted - truth) ** 2))),
    "pearson": (REGRESSION, _correlation(stats.pearsonr)),
    "spearman": (REGRESSION, _correlation(stats.spearmanr)),
}
QA_METRICS = ("exact_match", "f1")


def task_metrics(
    task: str, logits: torch.Tensor, labels: torch.Tensor, metrics: Sequence[str] | None = None
) -> dict[str, float | None]:
    """Metrics of classification (class-id labels) or regression (float labels) logits.

    metrics: names from METRICS; default accuracy and macro F1, or mse, Pearson and Spearman.
    """
    metrics = DEFAULT_METRICS[task] if metrics is None else metrics
    wrong_kind = [name for name in metrics if METRICS.get(name, (None,))[0] != task]
    if wrong_kind:
        raise ValueError(f"not {task} metrics: {wrong_kind}")
    if task == CLASSIFICATION:
        predicted, truth = logits.argmax(-1).numpy(), labels.numpy()
    else:
        predicted = logits.reshape(len(labels)).double().numpy()  # (B, 1) -> (B,), never broadcast
        truth = labels.double().numpy()
    return {name: METRICS[name][1](predicted, truth) for name in metrics}


# ---------------------------------------------------------------- SQuAD


_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """The official SQuAD normalisation: lower case, no punctuation, no articles, single spaces."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION)).split())


def answer_f1(prediction: str, gold: str) -> float:
    """Token F1 of two answers after normalisation; an empty answer only matches an empty one."""
    predicted, truth = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not predicted or not truth:
        return float(predicted == truth)
    common = sum((Counter(predicted) & Counter(truth)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(truth)
    return 2 * precision * recall / (precision + recall)


def _example_scores(
    predictions: Sequence[str], gold_answers: Sequence[Sequence[str]]
) -> tuple[np.ndarray, np.ndarray]:
    """Exact match and F1 of each prediction against the best of its gold answers (official v2 rule:
    golds that normalise to nothing are dropped, and no gold at all means the answer is "")."""
    exact, f1 = np.zeros(len(predictions)), np.zeros(len(predictions))
    for index, (prediction, golds) in enumerate(zip(predictions, gold_answers, strict=True)):
        golds = [gold for gold in golds if normalize_answer(gold)] or [""]
        exact[index] = max(float(normalize_answer(prediction) == normalize_answer(gold)) for gold in golds)
        f1[index] = max(answer_f1(prediction, gold) for gold in golds)
    return exact, f1


def _best_threshold(
    answered: np.ndarray, has_answer: np.ndarray, null_score_diff: np.ndarray
) -> tuple[float, float]:
    """(best score, its threshold) over no-answer thresholds, as the official v2 script searches it:
    an example is answered (scoring ``answered``) when null_score_diff <= threshold, else it
    abstains (scoring 1 without gold answer, 0 with one)."""
    abstained = (~has_answer).astype(float)
    order = np.argsort(null_score_diff, kind="stable")
    totals = abstained.sum() + np.concatenate([[0.0], np.cumsum((answered - abstained)[order])])
    best = int(np.argmax(totals))  # answer the `best` smallest differences
    threshold = null_score_diff[order[best - 1]] if best else null_score_diff[order[0]] - 1.0
    return float(totals[best] / len(answered)), float(threshold)


def qa_metrics(
    predictions: Sequence[str],
    gold_answers: Sequence[Sequence[str]],
    null_score_diff: np.ndarray | None = None,
    best_span_texts: Sequence[str] | None = None,
) -> dict[str, float | int | None]:
    """SQuAD exact match and F1 (official normalisation), as fractions.

    For SQuAD v2 pass ``null_score_diff`` and ``best_span_texts`` (the best non-null answer of each
    example) too: the has-answer / no-answer breakdown and the best thresholds are added.
    """
    if len(predictions) == 0:
        raise ValueError("no predictions to score")
    exact, f1 = _example_scores(predictions, gold_answers)
    metrics: dict[str, float | int | None] = {"exact_match": float(exact.mean()), "f1": float(f1.mean())}
    if null_score_diff is None:
        return metrics
    has_answer = np.array([any(normalize_answer(gold) for gold in golds) for golds in gold_answers])
    for name, subset in (("has_answer", has_answer), ("no_answer", ~has_answer)):
        metrics[f"{name}_count"] = int(subset.sum())
        metrics[f"{name}_exact_match"] = float(exact[subset].mean()) if subset.any() else None
        metrics[f"{name}_f1"] = float(f1[subset].mean()) if subset.any() else None
    answered_exact, answered_f1 = _example_scores(best_span_texts, gold_answers)
    for name, answered in (("exact_match", answered_exact), ("f1", answered_f1)):
        best, threshold = _best_threshold(answered, has_answer, np.asarray(null_score_diff, dtype=float))
        metrics[f"best_{name}"], metrics[f"best_{name}_threshold"] = best, _finite_or_none(threshold)
    return metrics


# ---------------------------------------------------------------- one entry for every task


@dataclass
class EvalSet:
    """A task's dev rows and the model inputs made from them.

    inputs: one tokenized row per example, or, for QA, the windows (``windows`` says which example
    each window belongs to and where its tokens lie in the context).
    """

    task: TaskSpec
    examples: datasets.Dataset
    inputs: dict[str, torch.Tensor]
    windows: QAWindows | None = None


def evaluation_set(
    task: TaskSpec,
    examples: datasets.Dataset,
    tokenizer,
    max_length: int | None = None,
    stride: int = STRIDE,
    max_question_tokens: int = MAX_QUESTION_TOKENS,
) -> EvalSet:
    """Tokenize a dev split (from :func:`kprune.data.load_task_split`) for ``predict`` and ``dev_metrics``.

    max_length: tokens per sequence, default 128 (384 for QA); QA contexts are cut into windows
    sharing ``stride`` tokens.
    """
    max_length = max_length or task.default_max_length
    if task.kind == QUESTION_ANSWERING:
        windows = tokenize_windows(
            examples[task.question_column],
            examples[task.context_column],
            tokenizer,
            max_length,
            stride,
            max_question_tokens,
        )
        return EvalSet(task, examples, windows.inputs, windows)
    inputs = tokenize(examples, tokenizer, task.text_column, task.text_pair_column, max_length)
    return EvalSet(task, examples, inputs)


def dev_metrics(
    dev: EvalSet, logits: torch.Tensor, model: nn.Module, no_answer_threshold: float = 0.0
) -> dict[str, float | int | None]:
    """The task's metrics from the model's logits on ``dev.inputs`` (as :func:`predict` returns them).

    The model maps label names to its class ids (its config); for SQuAD v2 an answer is "" when the
    null score exceeds the best span's by more than ``no_answer_threshold``.
    """
    task = dev.task
    model_kind = task_of(model)
    if model_kind != task.kind:
        raise ValueError(f"{task.name} is a {task.kind} task, but the model is a {model_kind} model")
    if task.kind == QUESTION_ANSWERING:
        contexts = list(dev.examples[task.context_column])
        spans = best_spans(dev.windows, logits, contexts)
        golds = [answers["text"] for answers in dev.examples[task.answers_column]]
        if not task.allows_no_answer:
            return qa_metrics(spans.text, golds)
        metrics = qa_metrics(spans.answers(no_answer_threshold), golds, spans.null_score_diff, spans.text)
        return {"no_answer_threshold": no_answer_threshold, **metrics}
    labels = encode_labels(dev.examples[task.label_column], model, task.label_names)
    return task_metrics(task.kind, logits, labels, task.metrics)


def evaluate_model(
    model: nn.Module,
    dev: EvalSet,
    batch_size: int = 64,
    device: str | torch.device = "auto",
    no_answer_threshold: float = 0.0,
) -> dict[str, float | int | None]:
    """``predict`` then ``dev_metrics``, with the number of examples scored."""
    device = resolve_device(device)
    logits = predict(model.to(device).eval(), dev.inputs, batch_size, device)
    return {"num_examples": len(dev.examples), **dev_metrics(dev, logits, model, no_answer_threshold)}
