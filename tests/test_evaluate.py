import logging

import numpy as np
import pytest
import torch
from tiny import tiny_model

from kprune.data import encode_labels
from kprune.evaluate import METRICS, answer_f1, normalize_answer, qa_metrics, task_metrics
from kprune.tasks import TASKS, get_task

PREDICTED = [1, 1, 0, 0, 1, 0]
TRUTH = [1, 0, 0, 1, 1, 0]  # TP 2, TN 2, FP 1, FN 1


def one_hot(classes, num_classes=2):
    return torch.nn.functional.one_hot(torch.tensor(classes), num_classes).float()


def test_classification_metrics_by_hand():
    metrics = task_metrics(
        "classification",
        one_hot(PREDICTED),
        torch.tensor(TRUTH),
        ["accuracy", "f1", "macro_f1", "matthews_correlation"],
    )
    assert metrics == pytest.approx(
        {
            "accuracy": 4 / 6,
            "f1": 2 / 3,  # precision 2/3, recall 2/3 of class 1
            "macro_f1": 2 / 3,  # class 0 alike
            "matthews_correlation": (2 * 2 - 1 * 1) / np.sqrt(3 * 3 * 3 * 3),
        }
    )
    # F1 is of class 1 (GLUE's for MRPC and QQP), not of class 0:
    flipped = task_metrics("classification", one_hot([1, 1, 1, 0]), torch.tensor([1, 1, 0, 0]), ["f1"])
    assert flipped["f1"] == pytest.approx(2 * (2 / 3) * 1 / (2 / 3 + 1))


def test_regression_metrics_by_hand():
    logits = torch.tensor([[1.0], [2.0], [3.0], [4.0]])
    labels = torch.tensor([2.0, 4.0, 5.0, 4.0])
    metrics = task_metrics("regression", logits, labels)
    assert metrics["mse"] == pytest.approx((1 + 4 + 4 + 0) / 4)
    assert metrics["pearson"] == pytest.approx(3.5 / np.sqrt(5 * 4.75))
    assert metrics["spearman"] == pytest.approx(3 / np.sqrt(5 * 4.5))  # truth ranks 1, 2.5, 4, 2.5
    constant = task_metrics("regression", torch.ones(4, 1), labels)
    assert constant["pearson"] is None and constant["spearman"] is None  # undefined, and JSON has no NaN


def test_metric_names_are_checked_and_every_task_metric_exists():
    with pytest.raises(ValueError, match=r"not regression metrics: \['accuracy'\]"):
        task_metrics("regression", torch.ones(2, 1), torch.ones(2), ["accuracy"])
    for task in TASKS.values():
        for name in task.metrics:
            assert task.kind == "question-answering" or METRICS[name][0] == task.kind, (task.name, name)


@pytest.mark.parametrize(
    ("text", "normalised"),
    [
        ("The Cat's  hat!", "cats hat"),  # case, punctuation, article, spaces
        ("an apple a day", "apple day"),
        ("A.B.C.", "abc"),
        ("  Theatre\tthe\n end ", "theatre end"),  # articles only as whole words
        ("(1,000)", "1000"),
        ("the", ""),
    ],
)
def test_official_answer_normalisation(text, normalised):
    assert normalize_answer(text) == normalised


def test_answer_f1_by_hand():
    assert answer_f1("the cat sat", "a cat sat down") == pytest.approx(2 * 1 * (2 / 3) / (1 + 2 / 3))
    assert answer_f1("cat cat", "cat") == pytest.approx(2 * 0.5 * 1 / 1.5)  # counts, not sets
    assert answer_f1("", "") == 1.0 and answer_f1("x", "") == 0.0 and answer_f1("dog", "cat") == 0.0


def test_squad_v1_metrics_by_hand():
    metrics = qa_metrics(
        ["Cat sat.", "dogs", "cat"],
        [["the cat sat"], ["a dog", "Dogs!"], ["cat sat", "hat"]],  # the best gold answer counts
    )
    assert metrics == pytest.approx({"exact_match": 2 / 3, "f1": (1 + 1 + 2 / 3) / 3})


def test_squad_v2_metrics_and_best_thresholds_by_hand():
    best_spans = ["cat sat", "the dog ran", "x", "y"]
    golds = [["cat sat"], ["dog"], [], ["the"]]  # "the" normalises to nothing: no answer
    null_score_diff = np.array([-2.0, 1.0, 3.0, 2.0])
    answers = ["cat sat", "", "", ""]  # threshold 0: only example 0 is answered
    metrics = qa_metrics(answers, golds, null_score_diff, best_spans)
    assert metrics == pytest.approx(
        {
            "exact_match": 3 / 4,
            "f1": 3 / 4,
            "has_answer_count": 2,
            "has_answer_exact_match": 1 / 2,
            "has_answer_f1": 1 / 2,
            "no_answer_count": 2,
            "no_answer_exact_match": 1.0,
            "no_answer_f1": 1.0,
            # Answering in order of null_score_diff (examples 0, 1, 3, 2) starting from 2 abstentions
            # right: exact gains +1, 0, -1, -1 -> best 3/4 at -2; F1 gains +1, +2/3, -1, -1 -> 11/12 at 1.
            "best_exact_match": 3 / 4,
            "best_exact_match_threshold": -2.0,
            "best_f1": (2 + 1 + 2 / 3) / 4,
            "best_f1_threshold": 1.0,
        }
    )
    with pytest.raises(ValueError, match="no predictions"):
        qa_metrics([], [])


def mnli_model(id2label):
    model = tiny_model("bert", num_labels=3)
    model.config.id2label = dict(enumerate(id2label))
    model.config.label2id = {name: index for index, name in enumerate(id2label)}
    return model


def test_task_labels_reach_the_model_by_name(caplog):
    mnli = get_task("mnli").label_names  # entailment, neutral, contradiction
    reversed_model = mnli_model(["CONTRADICTION", "NEUTRAL", "ENTAILMENT"])  # roberta-large-mnli's order
    assert encode_labels([0, 1, 2, 0], reversed_model, mnli).tolist() == [2, 1, 0, 2]
    assert encode_labels(["Neutral", "entailment"], reversed_model, mnli).tolist() == [1, 2]
    unnamed = tiny_model("bert", num_labels=3)  # LABEL_0, ...: the task's ids are the model's
    assert encode_labels([0, 1, 2], unnamed, mnli).tolist() == [0, 1, 2]
    with caplog.at_level(logging.WARNING, logger="kprune"):
        assert encode_labels([2, 0], mnli_model(["a", "b", "c"]), mnli).tolist() == [2, 0]
    assert "the model's labels ['a', 'b', 'c'] are not the task's" in caplog.text
    with pytest.raises(ValueError, match="the task has 2 labels"):
        encode_labels([0, 1], unnamed, get_task("sst2").label_names)
    with pytest.raises(ValueError, match=r"unknown labels \[3\] in the data; the labels are \['entailment'"):
        encode_labels([0, 3], unnamed, mnli)
