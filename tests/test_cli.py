import json
import os
import subprocess
import sys

import pandas as pd
import pytest
import torch
from hub import glue_repo, squad_repo, squad_table
from tiny import SPECIAL, sentences, tiny_model, tiny_tokenizer
from transformers import AutoModelForSequenceClassification, BertConfig, BertModel, BertTokenizerFast

import kprune
from kprune.cli import main
from kprune.data import draw_sample, load_table, load_task_split
from kprune.evaluate import evaluate_model, evaluation_set
from kprune.io import read_meta
from kprune.models import model_logits
from kprune.search import budget_limit
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
    assert record["flops_kept"] <= budget_limit(0.5)

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
    assert metrics["flops_kept"] == read_meta(out)["record"]["flops_kept"] <= budget_limit(0.6)


@pytest.mark.parametrize(
    ("knowledge_tokens", "rescore", "precision"), [(60, "layer", "bfloat16"), ("all", "sublayer", "float32")]
)
def test_the_knowledge_options_reach_the_record(
    model_dir, data_csv, tmp_path, knowledge_tokens, rescore, precision
):
    out = tmp_path / "pruned"
    options = ["--flops-keep", "0.5", "--knowledge-tokens", str(knowledge_tokens), "--rescore", rescore]
    options += ["--knowledge-precision", precision, "--micro-batch-tokens", "16", "--quiet"]
    assert main(prune_args(model_dir, data_csv, out, *options)) == 0
    record = read_meta(out)["record"]
    config = record["config"]
    assert config["knowledge_tokens"] == knowledge_tokens and config["micro_batch_tokens"] == 16
    assert config["rescore"] == rescore and config["knowledge_precision"] == precision
    measured = [step["knowledge_measured"] for step in record["steps"]]
    if rescore == "layer":
        assert measured == [True, False] * (len(measured) // 2)  # each layer's FFN reused its attention's
    else:
        assert all(measured)


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
    assert record["task"] == "question-answering" and record["flops_kept"] <= budget_limit(0.5)
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


# ---------------------------------------------------------------- faults and bad input (checked before work)


KEEP = ["--flops-keep", "0.5"]


def test_an_unwritable_out_is_named_before_anything_else(tmp_path, capsys):
    """--out is created and probed first: a missing model is not even looked at."""
    (tmp_path / "a-file").write_text("x")
    missing = tmp_path / "no-model"
    message = user_error(prune_args(missing, missing, tmp_path / "a-file" / "out", *KEEP), capsys)
    assert message == (
        f"kprune: error: --out {tmp_path / 'a-file' / 'out'} cannot be written (Not a directory); "
        "choose a folder you can write to"
    )
    message = user_error(prune_args(missing, missing, "/proc/kprune-out", *KEEP), capsys)
    assert message.startswith("kprune: error: --out /proc/kprune-out cannot be written (")
    message = user_error(prune_args(missing, missing, tmp_path / "a-file", *KEEP), capsys)
    assert message.endswith(f"--out {tmp_path / 'a-file'} is a file, not a folder")


def test_the_demo_checks_its_out_first(tmp_path, capsys):
    (tmp_path / "a-file").write_text("x")
    message = user_error(["demo", "--out", str(tmp_path / "a-file" / "demo")], capsys)
    assert message.endswith(
        f"--out {tmp_path / 'a-file' / 'demo'} cannot be written (Not a directory); "
        "choose a folder you can write to"
    )


def test_a_model_folder_without_its_own_tokenizer_is_refused(tmp_path, data_csv, capsys):
    folder = tmp_path / "no-tokenizer"
    tiny_model("bert", num_labels=2).save_pretrained(folder)  # transformers would invent a 5-token vocabulary
    capsys.readouterr()  # transformers' progress bars
    for argv in (prune_args(folder, data_csv, tmp_path / "out", *KEEP), eval_args(folder, data_csv)):
        message = user_error(argv, capsys)
        assert f"model folder {folder} has no tokenizer of its own (tokenizer.json or vocab.txt)" in message
        assert message.endswith(f"tokenizer.save_pretrained('{folder}')")
    assert not (tmp_path / "out").exists()

    (folder / "vocab.txt").write_text("\n".join(SPECIAL) + "\n")  # tokenizer files without words
    BertTokenizerFast(vocab=str(folder / "vocab.txt")).save_pretrained(folder)
    message = user_error(prune_args(folder, data_csv, tmp_path / "out", *KEEP), capsys)
    assert message.endswith(
        f"the tokenizer of {folder} holds only its 5 special tokens: every word would be unknown; give the "
        "model the tokenizer it was fine-tuned with"
    )


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.csv", b"", "is empty; it needs a header line (or JSON keys) and rows"),
        ("header.csv", b"sentence,label\n", "has no rows (only a header line); it needs one row per example"),
        ("latin1.csv", "sentence\ncaf\xe9\n".encode("latin-1"), "is not UTF-8 text (byte 0xe9 at offset 12)"),
        ("empty.jsonl", b"", "is empty"),
    ],
)
def test_unreadable_data_is_one_line_and_nothing_is_written(
    model_dir, tmp_path, capsys, name, content, message
):
    data = tmp_path / name
    data.write_bytes(content)
    out = tmp_path / "out"
    assert message in user_error(prune_args(model_dir, data, out, *KEEP), capsys)
    assert str(data) in user_error(eval_args(model_dir, data, "--text-column", "sentence"), capsys)
    assert not out.exists()  # the --out made by the probe is removed again


def test_a_budget_that_keeps_nothing_is_refused(model_dir, data_csv, tmp_path, capsys):
    out = tmp_path / "out"
    message = user_error(prune_args(model_dir, data_csv, out, "--flops-keep", "0.001"), capsys)
    assert "--flops-keep 0.001 keeps nothing: the cheapest unit is " in message
    assert "so every head and neuron would go; give at least --flops-keep " in message
    assert not out.exists()
    smallest = float(message.rsplit(" ", 1)[1])  # the least budget named works
    assert main(prune_args(model_dir, data_csv, out, "--flops-keep", str(smallest))) == 0
    assert sum(map(sum, read_meta(out)["record"]["heads"] + read_meta(out)["record"]["neurons"])) >= 0
    assert read_meta(out)["record"]["flops_final"] > 0


def test_a_sample_below_the_minimum_is_a_warning(model_dir, data_csv, tmp_path, capsys):
    assert main(prune_args(model_dir, data_csv, tmp_path / "out", *KEEP, "--num-tokens", "9")) == 0
    warnings = capsys.readouterr().err
    assert "fewer than the 24 inputs of the widest output projection" in warnings  # the tiny FFN: 24
    assert "use at least 24 tokens (the paper uses 100,000)" in warnings
    assert main(prune_args(model_dir, data_csv, tmp_path / "out2", *KEEP)) == 0  # 300 tokens: no warning
    assert "widest output projection" not in capsys.readouterr().err


def test_overwriting_a_previous_prune_says_so_and_pruning_into_itself_is_refused(
    model_dir, data_csv, tmp_path, capsys
):
    out = tmp_path / "pruned"
    assert main(prune_args(model_dir, data_csv, out, "--flops-keep", "0.8")) == 0
    capsys.readouterr()
    assert main(prune_args(model_dir, data_csv, out, "--flops-keep", "0.6")) == 0
    assert (
        f"--out {out} holds a previous prune; it is replaced when this one is saved"
        in capsys.readouterr().err
    )
    assert read_meta(out)["record"]["config"]["flops_keep"] == 0.6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "pruned", "train.csv"]  # no sibling left

    before = {p.name: p.read_bytes() for p in out.iterdir()}
    message = user_error(prune_args(out, data_csv, out, "--flops-keep", "0.5"), capsys)
    assert message.endswith(
        f"--out {out} is the --model folder; write the pruned model to another folder "
        "(pruning a kprune folder again applies the budget to the pruned model and keeps only "
        "the new record)"
    )
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    flops_kept = read_meta(out)["record"]["flops_kept"]
    assert main(prune_args(out, data_csv, tmp_path / "again", "--flops-keep", "0.5")) == 0
    assert (
        f"--model is a kprune folder that keeps {100 * flops_kept:.1f}% of its source's FLOPs; the budget "
        f"applies to it as it is: about {50 * flops_kept:.1f}% of the source" in capsys.readouterr().err
    )


def test_damaged_model_folders_are_one_line(model_dir, data_csv, tmp_path, capsys):
    out = tmp_path / "pruned"
    assert main(prune_args(model_dir, data_csv, out, *KEEP)) == 0
    weights, meta_file = out / "model.safetensors", out / "config.json"  # the counts are in the config
    good_weights, good_meta = weights.read_bytes(), meta_file.read_text()
    weights.write_bytes(good_weights[: len(good_weights) // 2])
    message = user_error(eval_args(out, data_csv, "--text-column", "sentence"), capsys)
    assert message.startswith(f"kprune: error: {weights} is unreadable or truncated (")
    assert message.endswith("prune again or restore it")

    weights.write_bytes(good_weights)
    meta = json.loads(good_meta)
    meta["heads_per_layer"][0] += 1
    meta_file.write_text(json.dumps(meta))
    message = user_error(eval_args(out, data_csv, "--text-column", "sentence"), capsys)
    assert message.startswith(f"kprune: error: {meta_file} does not match {weights} (")

    message = user_error(prune_args(out, data_csv, tmp_path / "again", *KEEP), capsys)
    assert message.startswith(f"kprune: error: {meta_file} does not match {weights}")
    assert not (tmp_path / "again").exists()


def test_nan_and_inf_are_named(tmp_path, data_csv, capsys):
    folder = save_tiny(tmp_path / "nan")
    model = AutoModelForSequenceClassification.from_pretrained(folder)
    with torch.no_grad():
        model.bert.encoder.layer[1].output.dense.weight[0, 0] = float("nan")
    model.save_pretrained(folder)
    capsys.readouterr()  # transformers' progress bars
    for argv in (prune_args(folder, data_csv, tmp_path / "out", *KEEP), eval_args(folder, data_csv)):
        message = user_error([*argv, "--text-column", "sentence"], capsys)
        assert message.endswith(
            f"{folder} has NaN or Inf weights in bert.encoder.layer.1.output.dense.weight; the model file is "
            "damaged or diverged"
        )

    with torch.no_grad():
        model.bert.encoder.layer[1].output.dense.weight[0, 0] = 0.0
        for projection in ("query", "key"):  # finite weights whose attention scores overflow float32
            getattr(model.bert.encoder.layer[0].attention.self, projection).weight.mul_(1e20)
    model.save_pretrained(folder)
    capsys.readouterr()  # transformers' progress bars
    message = user_error(prune_args(folder, data_csv, tmp_path / "out", *KEEP), capsys)
    assert message.endswith(
        "the model's activations hold NaN or Inf from bert.encoder.layer.0.attention.self on the sample, "
        "although its weights are finite: values overflow torch.float32; check the model and its inputs"
    )
    assert not (tmp_path / "out").exists()


def test_verbose_shows_the_traceback(model_dir, tmp_path, capsys):
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(SystemExit) as exit_info:
        argv = prune_args(model_dir, tmp_path / "empty.csv", tmp_path / "out", *KEEP)
        main([a for a in argv if a != "--quiet"] + ["--verbose"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "in check_text_file" in err
    assert err.strip().splitlines()[-1].startswith("kprune: error: data file ")


@pytest.mark.parametrize("kind", ["csv", "jsonl"])
def test_skipped_rows_follow_the_readme_in_prune_and_eval(model_dir, tmp_path, capsys, kind):
    """Rows with empty or null text, or a null label (eval only), are skipped and counted; the words
    "NaN" and "null" are text."""
    texts = ["NaN", "null", "word1 word2", None, "", "word3", "word4"]
    labels = ["pos", "neg", None, "pos", "neg", "pos", "neg"]
    data = tmp_path / f"rows.{kind}"
    frame = pd.DataFrame({"text": texts, "label": labels})
    frame.to_csv(data, index=False) if kind == "csv" else frame.to_json(data, orient="records", lines=True)

    metrics = run_json(eval_args(model_dir, data, "--quiet"), capsys)
    assert (metrics["num_examples"], metrics["skipped_rows"]) == (4, 3)  # NaN, null, word3, word4

    out = tmp_path / "pruned"
    assert (
        main(prune_args(model_dir, data, out, *KEEP, "--text-column", "text", "--num-tokens", "10000")) == 0
    )
    assert "skipped 2 of 7 rows: empty or missing 'text'" in capsys.readouterr().err
    assert read_meta(out)["record"]["num_sequences"] == 5  # labels are not needed to prune


# The child sends itself a real SIGINT as soon as the library logs its first iteration: mid-prune, at the
# same point on every run, however busy the machine. It first restores Python's Ctrl-C handler: a test run
# started in the background (nohup, `&`) hands its children SIGINT ignored.
INTERRUPT_AFTER_ITERATION_0 = """
import logging, os, signal, sys

signal.signal(signal.SIGINT, signal.default_int_handler)

class Interrupt(logging.Handler):
    def emit(self, record):
        if record.getMessage().startswith("iteration 0 "):
            os.kill(os.getpid(), signal.SIGINT)

logging.getLogger("kprune").addHandler(Interrupt())
from kprune.cli import main
sys.exit(main())
"""


def test_ctrl_c_is_one_line_and_keeps_the_previous_model(model_dir, data_csv, tmp_path):
    out = tmp_path / "pruned"
    assert main(prune_args(model_dir, data_csv, out, *KEEP)) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    for target in (out, tmp_path / "new"):
        argv = [a for a in prune_args(model_dir, data_csv, target, "--flops-keep", "0.3") if a != "--quiet"]
        child = [sys.executable, "-c", INTERRUPT_AFTER_ITERATION_0, *argv]
        result = subprocess.run(child, capture_output=True, text=True)
        assert result.returncode == 130, result.stderr
        lines = result.stderr.strip().splitlines()
        assert any(line.startswith("INFO kprune.data: sample: ") for line in lines)  # work had begun
        assert lines[-1] == "kprune: error: interrupted; nothing written"
        assert "Traceback" not in result.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "pruned", "train.csv"]


def test_a_full_disk_is_one_line_and_keeps_the_previous_model(model_dir, data_csv, tmp_path):
    """A 1 MB tmpfs in a private mount namespace: the first prune fits; with 16 kB left the second fails
    while saving (its weights need 20 kB); with nothing left the third is refused before any work."""
    disk, copies = tmp_path / "disk", tmp_path / "copies"
    disk.mkdir(), copies.mkdir()
    cli = "import sys; from kprune.cli import main; sys.exit(main())"
    leave = (
        f"import shutil; open('{disk}/filler', 'wb').write(bytes(shutil.disk_usage('{disk}').free - 16384))"
    )
    prune = " ".join(prune_args(model_dir, data_csv, disk / "pruned"))
    logging_prune = prune.replace(" --quiet", "")  # its log shows whether any iteration ran
    script = f"""
        set -e
        mount -t tmpfs -o size=1m tmpfs {disk}
        "$PYTHON" -c "$CLI" {prune} --flops-keep 0.5
        cp -r {disk}/pruned {copies}/before
        "$PYTHON" -c "{leave}"
        set +e
        "$PYTHON" -c "$CLI" {prune} --flops-keep 0.3 2> {copies}/stderr-save
        echo $? > {copies}/code-save
        cp -r {disk}/pruned {copies}/after
        ls -A {disk} > {copies}/listing
        cat /dev/zero >> {disk}/filler 2>/dev/null
        "$PYTHON" -c "$CLI" {logging_prune} --flops-keep 0.3 2> {copies}/stderr-before
        echo $? > {copies}/code-before
    """
    environment = {**os.environ, "PYTHON": sys.executable, "CLI": cli}
    command = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script]
    result = subprocess.run(command, env=environment, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (copies / "code-save").read_text().strip() == "2"
    lines = (copies / "stderr-save").read_text().strip().splitlines()
    assert lines[-1] == (
        f"kprune: error: no space left on the device of --out {disk / 'pruned'}; nothing was written (a "
        "previous model there is intact); free some space and run again"
    )
    assert (copies / "listing").read_text().split() == ["filler", "pruned"]  # no half-written sibling
    before, after = ({p.name: p.read_bytes() for p in (copies / n).iterdir()} for n in ("before", "after"))
    assert after == before and "model.safetensors" in after

    assert (copies / "code-before").read_text().strip() == "2"
    log = (copies / "stderr-before").read_text()
    assert "tokenized" not in log and "iteration 0" not in log  # no work was done: not even the sample
    expected = f"kprune: error: no space left on the device of --out {disk / 'pruned'}: 0 bytes free, and "
    assert (
        log.strip()
        .splitlines()[-1]
        .startswith(expected + "the pruned model needs more than 3,840 (its embeddings alone)")
    )
