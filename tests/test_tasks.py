import logging

import datasets
import pandas as pd
import pytest
import torch
from hub import MNLI_LABELS, glue_repo, pair_table, squad_repo, squad_table
from tiny import sentences, tiny_model, tiny_tokenizer

from kprune.data import (
    average_token_length,
    calibration_sample,
    check_model_for_task,
    clean_split,
    load_task_data,
    load_task_split,
)
from kprune.evaluate import evaluate_model, evaluation_set, predict
from kprune.models import model_logits
from kprune.squad import best_spans
from kprune.tasks import TASKS, TaskSpec, custom_task, get_task

GLUE = ["cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte"]
QA_WINDOW = dict(max_length=32, stride=8, max_question_tokens=8)  # tiny models have 64 positions


@pytest.fixture
def tokenizer(tmp_path):
    return tiny_tokenizer(tmp_path)


def test_registry_holds_glue_and_squad_with_their_metrics():
    assert list(TASKS) == [f"glue/{name}" for name in GLUE] + ["squad", "squad_v2"]
    assert get_task("glue/sst2") is get_task("SST-2") is get_task(" sst2 ")
    assert get_task("sts-b").kind == "regression" and get_task("stsb").metrics == ("pearson", "spearman")
    assert get_task("mrpc").metrics == ("accuracy", "f1") and get_task("qqp").metrics == ("accuracy", "f1")
    assert get_task("cola").main_metric == "matthews_correlation"
    mnli = get_task("mnli")
    assert (mnli.hub_path, mnli.hub_config) == ("nyu-mll/glue", "mnli")
    assert mnli.dev_splits == ("validation_matched", "validation_mismatched")
    assert mnli.label_names == tuple(MNLI_LABELS) and mnli.input_columns == ["premise", "hypothesis"]
    references = {name: TASKS[f"glue/{name}"].reference_length for name in GLUE}
    assert references == {
        "cola": None,
        "sst2": 25.16,
        "mrpc": 53.24,
        "stsb": 31.47,
        "qqp": 30.55,
        "mnli": 39.05,
        "qnli": 50.97,
        "rte": None,
    }
    squad, squad_v2 = get_task("squad"), get_task("squad_v2")
    assert squad.reference_length == 170 and squad.default_max_length == 384
    assert not squad.allows_no_answer and squad_v2.allows_no_answer
    assert squad.input_columns == ["question", "context"] and squad.target_column == "answers"
    with pytest.raises(ValueError, match="unknown task 'glue/wnli'; known tasks: glue/cola, glue/sst2"):
        get_task("glue/wnli")


def test_custom_tasks_and_renamed_columns():
    task = custom_task("classification", text_column="review", label_column="stars")
    assert (task.input_columns, task.target_column, task.metrics) == (
        ["review"],
        "stars",
        ("accuracy", "macro_f1"),
    )
    assert custom_task("regression").metrics == ("mse", "pearson", "spearman")
    renamed = get_task("squad").with_columns(context_column="passage", question_column=None)
    assert renamed.input_columns == ["question", "passage"] and renamed.name == "squad"
    with pytest.raises(ValueError, match=r"not column options: \['text'\]"):
        get_task("sst2").with_columns(text="x")
    with pytest.raises(ValueError, match="task kind must be one of"):
        custom_task("ranking")
    with pytest.raises(ValueError, match="main metric 'f1' is not one of"):
        TaskSpec("x", "classification", ("accuracy",), "f1")


def test_a_local_classification_may_name_its_classes(tmp_path):
    task = custom_task("classification", label_names=["neg", "pos"], label_column="stars")
    assert (task.label_names, task.target_column) == (("neg", "pos"), "stars")
    path = tmp_path / "dev.csv"
    pd.DataFrame({"text": sentences(3), "stars": ["pos", "NEG", "pos"]}).to_csv(path, index=False)
    table, _ = load_task_split(task, "validation", path)
    assert table["stars"] == [1, 0, 1] and table.features["stars"].names == ["neg", "pos"]
    with pytest.raises(ValueError, match="label names are for classification, not regression"):
        custom_task("regression", label_names=["low", "high"])


def test_hub_path_with_a_local_folder_standing_in_for_the_hub(tmp_path):
    repo = glue_repo(tmp_path / "glue")
    data = load_task_data(get_task("glue/mrpc"), hub_dataset=str(repo))
    assert (len(data.train), list(data.dev), len(data.dev["validation"])) == (60, ["validation"], 20)
    assert data.dev["validation"].features["label"].names == ["not_equivalent", "equivalent"]
    assert data.skipped == {"train": 0, "validation": 0}

    mnli = load_task_data(get_task("mnli"), hub_dataset=str(repo))
    assert {split: len(table) for split, table in mnli.dev.items()} == {
        "validation_matched": 12,
        "validation_mismatched": 15,
    }
    stsb, _ = load_task_split(get_task("stsb"), "validation", hub_dataset=str(repo))
    assert stsb["label"][:3] == [0.0, 1.0, 2.0]

    squad = load_task_data(get_task("squad"), hub_dataset=str(squad_repo(tmp_path / "squad")))
    assert (len(squad.train), len(squad.dev["validation"])) == (40, 16)
    with pytest.raises(ValueError, match="BuilderConfig 'qnli' not found"):
        load_task_split(get_task("qnli"), hub_dataset=str(repo))
    with pytest.raises(ValueError, match="has no hub data set; give a local file for its train split"):
        load_task_split(custom_task("classification"))


def test_local_files_with_a_column_mapping_and_label_names(tmp_path):
    path = tmp_path / "dev.csv"
    frame = pd.DataFrame(
        {
            "s1": sentences(4),
            "s2": sentences(4, seed=1),
            "quality": ["Equivalent", "not_equivalent", "equivalent", "EQUIVALENT"],
        }
    )
    frame.to_csv(path, index=False)
    task = get_task("mrpc").with_columns(text_column="s1", text_pair_column="s2", label_column="quality")
    table, skipped = load_task_split(task, "validation", path)
    assert table["quality"] == [1, 0, 1, 1] and skipped == 0  # names in any case, or class ids
    data = load_task_data(task, train=path, dev={"validation": path, "other": path})
    assert list(data.dev) == ["validation", "other"] and len(data.train) == 4

    jsonl = tmp_path / "train.jsonl"
    squad_table(6, seed=0).to_json(str(jsonl))
    assert len(load_task_split(get_task("squad"), "train", jsonl)[0]) == 6


def check_error(task, rows: dict, message: str, labelled: bool = True):
    with pytest.raises(ValueError, match=message):
        clean_split(task, datasets.Dataset.from_dict(rows), labelled)


def test_bad_data_is_one_clear_error():
    mrpc = get_task("mrpc")
    pair = {"sentence1": ["word1", "word2"], "sentence2": ["word3", "word4"]}
    check_error(mrpc, {"sentence1": ["word1"], "label": [0]}, "column 'sentence2' not in the data")
    check_error(mrpc, {**pair}, "column 'label' not in the data")
    clean_split(mrpc, datasets.Dataset.from_dict(pair), labelled=False)  # a calibration split needs no labels
    check_error(mrpc, {**pair, "label": ["equivalent", "maybe"]}, r"unknown labels \['maybe'\] in the data")
    check_error(mrpc, {**pair, "label": [0, -1]}, r"unknown labels \[-1\]")  # GLUE's test split labels
    check_error(mrpc, {**pair, "label": [0.5, 1.0]}, "must be class ids or label names, got float64")
    check_error(get_task("stsb"), {**pair, "label": ["high", "low"]}, "glue/stsb needs numeric labels")
    check_error(
        mrpc,
        {"sentence1": [None, "  "], "sentence2": ["word3", "word4"], "label": [0, 1]},
        "the data has no rows left after skipping 2 rows with empty text or no label",
    )
    empty = pair_table(0, seed=0)
    with pytest.raises(ValueError, match="the data has no rows$"):
        clean_split(mrpc, empty)
    check_error(custom_task("classification"), {"text": [1, 2]}, "'text' must hold text", labelled=False)

    squad, squad_v2 = get_task("squad"), get_task("squad_v2")
    qa = {"question": ["word1", "word2"], "context": ["word3 word4", "word5"]}
    check_error(squad, {**qa, "answers": ["word3", "word5"]}, "must hold SQuAD answers")
    unanswerable = squad_table(3, seed=0, unanswerable=1).to_dict()
    check_error(squad, unanswerable, "1 questions in the data have no answer, which squad does not allow")
    assert len(clean_split(squad_v2, datasets.Dataset.from_dict(unanswerable))[0]) == 3


def test_rows_with_null_text_or_label_are_skipped_and_counted(caplog):
    rows = {
        "sentence1": ["word1", None, "word2", "word3", ""],
        "sentence2": ["word4", "word5", "word6", None, "word7"],
        "label": [0, 1, None, 1, 0],
    }
    with caplog.at_level(logging.WARNING, logger="kprune"):
        table, skipped = clean_split(get_task("mrpc"), datasets.Dataset.from_dict(rows))
    assert (table["sentence1"], table["label"], skipped) == (["word1"], [0], 4)
    assert "skipped 4 of 5 rows" in caplog.text
    table, skipped = clean_split(get_task("mrpc"), datasets.Dataset.from_dict(rows), labelled=False)
    assert (table["sentence1"], skipped) == (["word1", "word2"], 3)  # no label needed


def test_calibration_samples_hold_about_num_tokens_and_are_seeded(tokenizer):
    mrpc, train = get_task("mrpc"), pair_table(300, seed=0)
    sample = calibration_sample(mrpc, train, tokenizer, num_tokens=500, seed=1, max_length=16)
    assert 500 <= int(sample["attention_mask"].sum()) < 500 + 16
    assert sample["input_ids"].shape[1] <= 16 and sample["token_type_ids"].sum() > 0  # pairs
    again = calibration_sample(mrpc, train, tokenizer, num_tokens=500, seed=1, max_length=16)
    assert all(torch.equal(sample[name], again[name]) for name in sample)

    squad, questions = get_task("squad"), squad_table(200, seed=0)
    windows = calibration_sample(squad, questions, tokenizer, num_tokens=600, seed=1, **QA_WINDOW)
    tokens = int(windows["attention_mask"].sum())
    assert 600 <= tokens < 600 + 3 * 32  # the last question drawn may bring a few windows
    assert (
        set(windows) == {"input_ids", "attention_mask", "token_type_ids"}
        and windows["input_ids"].shape[1] == 32
    )
    other = calibration_sample(squad, questions, tokenizer, num_tokens=600, seed=2, **QA_WINDOW)
    assert not torch.equal(windows["input_ids"][:5], other["input_ids"][:5])


def test_average_token_length_by_hand(tokenizer):
    table = datasets.Dataset.from_dict(
        {"sentence": ["word1 word2", "word3", "word1 word2 word3 word4 word5"]}
    )
    sst2 = get_task("sst2")
    assert average_token_length(sst2, table, tokenizer) == pytest.approx((4 + 3 + 7) / 3)  # [CLS] .. [SEP]
    assert average_token_length(sst2, table, tokenizer, max_length=4) == pytest.approx((4 + 3 + 4) / 3)
    pairs = datasets.Dataset.from_dict(
        {"sentence1": ["word1", "word2 word3"], "sentence2": ["word4", "word5"]}
    )
    assert average_token_length(get_task("rte"), pairs, tokenizer) == pytest.approx((5 + 6) / 2)
    questions = datasets.Dataset.from_dict(
        {"question": ["word1 word2", "word3 word4"], "context": [" ".join(["word0"] * 20), "word5 word6"]}
    )
    # windows of 16, 16, 11 tokens for the long context (11 context tokens each, 4 shared) and 7
    lengths = average_token_length(
        get_task("squad"), questions, tokenizer, 16, stride=4, max_question_tokens=4
    )
    assert lengths == pytest.approx((16 + 16 + 11 + 7) / 4)


def test_models_that_cannot_run_a_task_are_one_clear_error(tokenizer):
    classifier = tiny_model("bert", num_labels=2)
    check_model_for_task(get_task("mrpc"), classifier, tokenizer, 64)
    with pytest.raises(
        ValueError, match="squad is a question-answering task, but the model is a classification"
    ):
        check_model_for_task(get_task("squad"), classifier, tokenizer, 64)
    with pytest.raises(
        ValueError, match=r"glue/mnli has 3 labels \['entailment', 'neutral', 'contradiction'\]"
    ):
        check_model_for_task(get_task("mnli"), classifier, tokenizer, 64)
    with pytest.raises(ValueError, match="max_length 65 is longer than the model's 64 positions"):
        check_model_for_task(get_task("mrpc"), classifier, tokenizer, 65)
    roberta = tiny_model("roberta", num_labels=2)  # positions start after the padding id 1
    check_model_for_task(get_task("mrpc"), roberta, tokenizer, 62)
    with pytest.raises(ValueError, match="max_length 63 is longer than the model's 62 positions"):
        check_model_for_task(get_task("mrpc"), roberta, tokenizer, 63)


def test_dev_metrics_of_a_pair_classifier_and_a_regressor(tmp_path, tokenizer):
    repo = glue_repo(tmp_path / "glue")
    mrpc = get_task("mrpc")
    examples, _ = load_task_split(mrpc, "validation", hub_dataset=str(repo))
    model = tiny_model("bert", num_labels=2)
    dev = evaluation_set(mrpc, examples, tokenizer, max_length=32)
    predicted = predict(model, dev.inputs, 8, "cpu").argmax(-1)
    labels = predicted.clone()
    labels[:4] = 1 - labels[:4]  # four wrong
    dev.examples = examples.remove_columns("label").add_column("label", labels.tolist())
    true_positive = int(((predicted == 1) & (labels == 1)).sum())
    f1 = 2 * true_positive / (int((predicted == 1).sum()) + int((labels == 1).sum()))
    metrics = evaluate_model(model, dev, batch_size=8, device="cpu")
    assert metrics == pytest.approx({"num_examples": 20, "accuracy": 16 / 20, "f1": f1})

    stsb = get_task("stsb")
    examples, _ = load_task_split(stsb, "validation", hub_dataset=str(repo))
    regressor = tiny_model("bert", task="regression")
    dev = evaluation_set(stsb, examples, tokenizer, max_length=32)
    outputs = predict(regressor, dev.inputs, 8, "cpu")[:, 0]
    dev.examples = examples.remove_columns("label").add_column("label", (3 * outputs - 1).tolist())
    metrics = evaluate_model(regressor, dev, device="cpu")
    assert metrics["pearson"] == pytest.approx(1.0) and metrics["spearman"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="glue/stsb is a regression task, but the model is a classification"):
        evaluate_model(model, dev, device="cpu")


@pytest.mark.parametrize("version", ["squad", "squad_v2"])
def test_dev_metrics_of_a_qa_model(tokenizer, version):
    """Gold answers made from the model's own best spans score 1; two changed golds cost 2 of 16."""
    model = tiny_model("bert", task="qa")
    task = get_task(version)
    examples = squad_table(16, seed=3)
    dev = evaluation_set(task, examples, tokenizer, **QA_WINDOW)
    assert len(dev.windows.example_index) > 16  # long contexts took several windows
    logits = predict(model, dev.inputs, 8, "cpu")
    spans = best_spans(dev.windows, logits, examples["context"])
    answers = [{"text": [text, "word0"], "answer_start": [0, 0]} for text in spans.text]
    answers[0]["text"], answers[1]["text"] = ["zzz"], ["zzz"]
    dev.examples = examples.remove_columns("answers").add_column("answers", answers)
    metrics = evaluate_model(model, dev, batch_size=8, device="cpu", no_answer_threshold=1e9)
    assert (metrics["exact_match"], metrics["f1"], metrics["num_examples"]) == (14 / 16, 14 / 16, 16)
    if version == "squad_v2":  # a huge threshold never predicts "no answer"
        assert metrics["no_answer_threshold"] == 1e9 and metrics["has_answer_count"] == 16
        abstaining = evaluate_model(model, dev, device="cpu", no_answer_threshold=-1e9)
        assert abstaining["exact_match"] == 0.0 and abstaining["best_exact_match"] == 14 / 16
    # The same logits through the model's own forward (no padding trimmed) give the same spans.
    full = model_logits(model, dev.inputs).masked_fill(~dev.inputs["attention_mask"].bool()[..., None], -1e9)
    assert best_spans(dev.windows, full, examples["context"]).text == spans.text
