import json

import pandas as pd
import pytest
import torch
from hub import glue_repo, squad_repo, squad_table
from tiny import sentences, tiny_model, tiny_tokenizer
from transformers import AutoModelForSequenceClassification, BertConfig, BertModel

import kprune
from kprune.cli import main
from kprune.data import draw_sample, load_table, load_task_split
from kprune.evaluate import evaluate_model, evaluation_set
from kprune.io import read_meta
from kprune.models import model_logits
from kprune.tasks import get_task

LABELS = ("pos", "neg")  # not in sorted order
SMALL = ["--num-tokens", "300", "--max-length", "32", "--quiet"]  # tiny models have 64 positions


def save_tiny(folder, task="classification"):
    """A tiny BERT and its tokenizer saved with save_pretrained: a stand-in for a hub model."""
    model = tiny_model("bert", task=task, num_labels=len(LABELS))
    if task == "classification":
        model.config.id2label = dict(enumerate(LABELS))
        model.config.label2id = {label: index for index, label in enumerate(LABELS)}
    model.save_pretrained(folder)
    tiny_tokenizer(folder).save_pretrained(folder)
    return folder


@pytest.fixture
def model_dir(tmp_path):
    return save_tiny(tmp_path / "model")


@pytest.fixture
def data_csv(tmp_path):
    path = tmp_path / "train.csv"
    pd.DataFrame({"sentence": sentences(80), "label": ["pos", "neg"] * 40}).to_csv(path, index=False)
    return path


def prune_args(model_dir, data_csv, out, *options: str) -> list[str]:
    paths = ["--model", str(model_dir), "--data", str(data_csv), "--out", str(out)]
    return ["prune", *paths, "--text-column", "sentence", *SMALL, *options]  # the last of a repeat wins


def eval_args(model_dir, data, *options: str) -> list[str]:
    return ["eval", "--model", str(model_dir), "--data", str(data), "--max-length", "32", *options]


def test_prune_writes_what_the_library_returns(model_dir, data_csv, tmp_path, capsys):
    out = tmp_path / "pruned"
    assert main(prune_args(model_dir, data_csv, out, "--flops-keep", "0.5")) == 0
    stdout = capsys.readouterr().out
    assert f"saved to {out.resolve()}" in stdout and "(budget 50.0%" in stdout
    record = read_meta(out)["record"]
    assert record["flops_kept"] <= 0.5

    # The same run by hand through the library.
    tokenizer = tiny_tokenizer(tmp_path)
    sample = draw_sample(load_table(data_csv), tokenizer, 300, text_column="sentence", max_length=32)
    teacher = AutoModelForSequenceClassification.from_pretrained(model_dir)
    expected = kprune.prune(teacher, sample, 0.5, device="cpu", progress=False)
    assert (record["heads"], record["neurons"]) == (expected.record.heads, expected.record.neurons)
    assert record["num_tokens"] == expected.record.num_tokens

    reloaded = kprune.load_pruned(out)
    assert reloaded.config.num_hidden_layers == 2
    torch.testing.assert_close(model_logits(reloaded, sample), model_logits(expected.model, sample))


def test_flops_reduction_is_one_minus_flops_keep(model_dir, data_csv, tmp_path):
    main(prune_args(model_dir, data_csv, tmp_path / "keep", "--flops-keep", "0.75"))
    main(prune_args(model_dir, data_csv, tmp_path / "reduction", "--flops-reduction", "0.25"))
    keep, reduction = (read_meta(tmp_path / name)["record"] for name in ("keep", "reduction"))
    assert reduction["config"]["flops_keep"] == 0.75
    assert (keep["heads"], keep["neurons"]) == (reduction["heads"], reduction["neurons"])


def run_json(argv: list[str], capsys) -> dict:
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_eval_prints_accuracy_as_json(model_dir, data_csv, tmp_path, capsys):
    out = tmp_path / "pruned"
    main(prune_args(model_dir, data_csv, out, "--flops-keep", "0.6"))
    capsys.readouterr()
    # Labels: the pruned model's own predictions, the first 7 of 40 flipped.
    texts = sentences(40, seed=5)
    inputs = tiny_tokenizer(tmp_path)(
        texts, padding=True, truncation=True, max_length=32, return_tensors="pt"
    )
    predicted = model_logits(kprune.load_pruned(out), dict(inputs)).argmax(-1)
    labels = [LABELS[int(p) ^ (i < 7)] for i, p in enumerate(predicted)]
    eval_csv = tmp_path / "dev.csv"
    pd.DataFrame({"sentence": texts, "gold": labels}).to_csv(eval_csv, index=False)

    metrics = run_json(
        eval_args(out, eval_csv, "--text-column", "sentence", "--label-column", "gold")
        + ["--batch-size", "8", "--quiet"],
        capsys,
    )
    assert metrics["accuracy"] == pytest.approx(33 / 40)
    assert 0.0 <= metrics["macro_f1"] <= 1.0
    assert metrics["num_examples"] == 40 and metrics["skipped_rows"] == 0
    assert metrics["flops_kept"] == read_meta(out)["record"]["flops_kept"] <= 0.6


def test_the_knowledge_options_reach_the_record(model_dir, data_csv, tmp_path):
    out = tmp_path / "pruned"
    options = ["--flops-keep", "0.5", "--knowledge-tokens", "60", "--micro-batch-tokens", "16", "--quiet"]
    assert main(prune_args(model_dir, data_csv, out, *options)) == 0
    config = read_meta(out)["record"]["config"]
    assert config["knowledge_tokens"] == 60 and config["micro_batch_tokens"] == 16


def test_eval_of_a_regressor(tmp_path, capsys):
    model_dir = save_tiny(tmp_path / "regressor", task="regression")
    texts = sentences(30, seed=2)
    inputs = tiny_tokenizer(tmp_path)(texts, padding=True, return_tensors="pt")
    outputs = model_logits(tiny_model("bert", task="regression"), dict(inputs))[:, 0].double()
    data = tmp_path / "scores.jsonl"
    pd.DataFrame({"text": texts, "label": (2 * outputs + 1).tolist()}).to_json(
        data, orient="records", lines=True
    )

    metrics = run_json(eval_args(model_dir, data, "--quiet"), capsys)
    assert (metrics["task"], metrics["kind"]) == ("custom", "regression")
    assert metrics["mse"] == pytest.approx(float(((outputs + 1) ** 2).mean()), rel=1e-5)
    assert metrics["pearson"] == pytest.approx(1.0) and metrics["spearman"] == pytest.approx(1.0)


def user_error(argv: list[str], capsys) -> str:
    capsys.readouterr()  # what the test printed before, e.g. transformers' bars of save_pretrained
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--quiet"])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kprune: error: "), lines
    return lines[0]


@pytest.mark.parametrize(
    ("budget", "message"),
    [
        (["--flops-keep", "0"], "is not in (0, 1]: it is the fraction of FLOPs kept"),
        (["--flops-keep", "1.5"], "is not in (0, 1]"),
        (["--flops-keep", "half"], "'half' is not in (0, 1]"),
        (["--flops-reduction", "1"], "is not in [0, 1): it is the fraction of FLOPs removed"),
        (["--flops-keep", "0.5", "--flops-reduction", "0.5"], "not allowed with argument"),
        ([], "one of the arguments --flops-keep --flops-reduction is required"),
    ],
)
def test_bad_budget_is_one_clear_error(model_dir, data_csv, tmp_path, capsys, budget, message):
    assert message in user_error(prune_args(model_dir, data_csv, tmp_path / "out", *budget), capsys)


def test_user_mistakes_are_one_clear_error(model_dir, data_csv, tmp_path, capsys):
    out = tmp_path / "out"
    keep = ["--flops-keep", "0.5"]
    message = user_error(prune_args(model_dir, tmp_path / "missing.csv", out, *keep), capsys)
    assert message.endswith("data file not found: " + str(tmp_path / "missing.csv"))
    message = user_error(prune_args(tmp_path / "no-model", data_csv, out, *keep), capsys)
    assert message.endswith("model folder not found: " + str(tmp_path / "no-model"))
    message = user_error(prune_args(model_dir, data_csv, out, *keep, "--text-column", "review"), capsys)
    assert message.endswith("column 'review' not in the data; available columns: sentence, label")
    (tmp_path / "train.xlsx").write_text("x")
    assert "unknown extension '.xlsx'" in user_error(
        prune_args(model_dir, tmp_path / "train.xlsx", out, *keep), capsys
    )
    message = user_error(prune_args(model_dir, data_csv, out, *keep, "--max-length", "100"), capsys)
    assert message.endswith("max_length 100 is longer than the model's 64 positions")
    assert not out.exists()
    message = user_error(prune_args(model_dir, data_csv, tmp_path, *keep), capsys)  # holds the model
    assert message.endswith("is a non-empty folder not written by kprune; choose another")


def test_models_without_a_supported_head_are_one_clear_error(data_csv, tmp_path, capsys):
    base = tmp_path / "base"
    BertModel(
        BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=1, num_attention_heads=4)
    ).save_pretrained(base)
    tiny_tokenizer(base).save_pretrained(base)
    message = user_error(prune_args(base, data_csv, tmp_path / "out", "--flops-keep", "0.5"), capsys)
    assert "is not a fine-tuned classifier or QA model (architectures: ['BertModel'])" in message

    qa = tmp_path / "qa"
    tiny_model("bert", task="qa").save_pretrained(qa)
    tiny_tokenizer(qa).save_pretrained(qa)
    message = user_error(eval_args(qa, data_csv), capsys)  # a QA model reads questions and contexts
    assert message.endswith(
        "column 'question', 'context', 'answers' not in the data; available columns: sentence, label"
    )


def test_eval_needs_known_labels(model_dir, tmp_path, capsys):
    data = tmp_path / "dev.csv"
    pd.DataFrame({"text": ["word1", "word2"], "label": ["pos", "great"]}).to_csv(data, index=False)
    message = user_error(eval_args(model_dir, data), capsys)
    assert message.endswith("unknown labels ['great']; the model's labels are ['neg', 'pos']")
    message = user_error(eval_args(model_dir, data, "--label-column", "y"), capsys)
    assert message.endswith("column 'y' not in the data; available columns: text, label")


def test_help_explains_the_budget(capsys):
    for argv in (["--help"], ["prune", "--help"], ["eval", "--help"], ["demo", "--help"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 0
    stdout = " ".join(capsys.readouterr().out.split())  # undo argparse's line wrapping
    assert "the pruned model KEEPS: --flops-keep 0.4 keeps 40% of the FLOPs" in stdout
    for option in ("--flops-reduction R", "--num-tokens N", "--label-column NAME", "--num-sentences N"):
        assert option in stdout
    for task in ("glue/cola", "glue/mnli", "squad_v2"):
        assert task in stdout  # --task lists the known tasks
    assert "exact match and F1 for SQuAD" in stdout and "--answers-column NAME" in stdout


# ---------------------------------------------------------------- tasks: GLUE and SQuAD


QA = ["--max-length", "32", "--stride", "8", "--max-question-tokens", "8", "--quiet"]


def test_glue_task_from_a_hub_stand_in(model_dir, tmp_path, capsys):
    """--task fills the columns and labels; --hub-dataset points at a local copy of nyu-mll/glue."""
    repo = str(glue_repo(tmp_path / "glue"))
    out = tmp_path / "pruned"
    task = ["--task", "glue/mrpc", "--hub-dataset", repo]
    argv = ["prune", "--model", str(model_dir), "--out", str(out), "--flops-keep", "0.5", *task, *SMALL]
    assert main([*argv, "--reference-seq-len"]) == 0
    record = read_meta(out)["record"]
    assert record["seq_len"] == 53.24 and record["num_tokens"] >= 300  # the paper's MRPC length
    capsys.readouterr()

    # The model names its labels pos/neg, not MRPC's: MRPC's class ids are taken as the model's.
    metrics = run_json(["eval", "--model", str(out), *task, "--max-length", "32", "--quiet"], capsys)
    assert (metrics["task"], metrics["num_examples"], metrics["skipped_rows"]) == ("glue/mrpc", 20, 0)
    assert set(metrics) >= {"accuracy", "f1", "flops_kept"} and metrics["data"] == f"{repo} validation"

    message = user_error(
        ["eval", "--model", str(out), *task, "--split", "test", "--max-length", "32"], capsys
    )
    assert message.endswith("Unknown split \"test\". Should be one of ['train', 'validation'].")
    message = user_error(["eval", "--model", str(out), "--task", "mnli", "--hub-dataset", repo], capsys)
    assert message.endswith("glue/mnli has 3 labels ['entailment', 'neutral', 'contradiction'], the model 2")
    message = user_error(["eval", "--model", str(out), "--task", "glue/wnli"], capsys)
    assert "unknown task 'glue/wnli'; known tasks: glue/cola" in message
    message = user_error(["eval", "--model", str(out)], capsys)
    assert message.endswith("give --data (a local file) or --task (a known task, loaded from the hub)")


def save_tiny_qa(folder):
    tiny_model("bert", task="qa").save_pretrained(folder)
    tiny_tokenizer(folder).save_pretrained(folder)
    return folder


def test_prune_and_eval_a_qa_model_end_to_end(tmp_path, capsys):
    model_dir = save_tiny_qa(tmp_path / "qa")
    train, dev = tmp_path / "train.jsonl", tmp_path / "dev.jsonl"
    squad_table(60, seed=1).rename_column("context", "passage").to_json(str(train))
    squad_table(16, seed=2).rename_column("context", "passage").to_json(str(dev))
    out = tmp_path / "pruned"
    columns = ["--context-column", "passage"]
    argv = ["prune", "--model", str(model_dir), "--data", str(train), "--out", str(out), *columns]
    assert main([*argv, "--flops-keep", "0.5", "--num-tokens", "400", *QA]) == 0
    record = read_meta(out)["record"]
    assert record["task"] == "question-answering" and record["flops_kept"] <= 0.5
    assert record["num_tokens"] >= 400 and record["num_sequences"] > 0
    capsys.readouterr()

    metrics = run_json(["eval", "--model", str(out), "--data", str(dev), *columns, *QA], capsys)
    assert (metrics["task"], metrics["kind"], metrics["num_examples"]) == ("custom", "question-answering", 16)
    assert 0.0 <= metrics["exact_match"] <= metrics["f1"] <= 1.0 and "flops_kept" in metrics

    # The same numbers through the library.
    task = get_task("squad").with_columns(context_column="passage")
    examples, _ = load_task_split(task, "validation", dev)
    expected = evaluate_model(
        kprune.load_pruned(out),
        evaluation_set(task, examples, tiny_tokenizer(tmp_path), 32, 8, 8),
        device="cpu",
    )
    assert (metrics["exact_match"], metrics["f1"]) == (expected["exact_match"], expected["f1"])


def test_squad_v2_from_a_hub_stand_in(tmp_path, capsys):
    model_dir = save_tiny_qa(tmp_path / "qa")
    repo = str(squad_repo(tmp_path / "squad", unanswerable=4))
    argv = ["eval", "--model", str(model_dir), "--hub-dataset", repo, *QA]
    metrics = run_json([*argv, "--task", "squad_v2", "--no-answer-threshold", "1e9"], capsys)
    assert (metrics["task"], metrics["num_examples"], metrics["no_answer_count"]) == ("squad_v2", 16, 4)
    assert metrics["no_answer_exact_match"] == 0.0  # a huge threshold always answers
    abstaining = run_json([*argv, "--task", "squad_v2", "--no-answer-threshold=-1e9"], capsys)
    assert (abstaining["exact_match"], abstaining["no_answer_exact_match"]) == (4 / 16, 1.0)

    message = user_error([*argv, "--task", "squad"], capsys)  # v1.1 rules: every question has an answer
    assert (
        "4 questions in " in message and "have no answer, which squad does not allow; use squad_v2" in message
    )
    message = user_error([*argv, "--task", "squad_v2", "--max-question-tokens", "30"], capsys)
    assert "stride 8 must be in [0, -1): a window of max_length 32 holds a question of up to 30" in message
