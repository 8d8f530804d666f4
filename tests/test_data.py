import json
import logging

import datasets
import pandas as pd
import pytest
import torch
from tiny import sentences, tiny_model, tiny_tokenizer

from kprune.data import (
    check_columns,
    choose_sample_rows,
    draw_sample,
    drop_incomplete_rows,
    encode_labels,
    load_table,
    load_task_split,
    tokenize,
)
from kprune.tasks import custom_task, get_task

FRAME = pd.DataFrame(
    {"sentence": ["word1 word2", "word3", "word4 word5 word6"], "label": ["pos", "neg", "pos"]}
)


def write_table(frame: pd.DataFrame, folder, kind: str):
    path = folder / f"table.{kind}"
    if kind == "csv":
        frame.to_csv(path, index=False)
    elif kind == "tsv":
        frame.to_csv(path, sep="\t", index=False)
    elif kind == "json":
        frame.to_json(path, orient="records")
    elif kind == "jsonl":
        frame.to_json(path, orient="records", lines=True)
    elif kind == "parquet":
        frame.to_parquet(path)
    else:
        path = folder / "saved"
        datasets.Dataset.from_pandas(frame).save_to_disk(str(path))
    return path


@pytest.mark.parametrize("kind", ["csv", "tsv", "json", "jsonl", "parquet", "save_to_disk"])
def test_load_table_reads_each_format(tmp_path, kind):
    table = load_table(write_table(FRAME, tmp_path, kind))
    assert table.column_names == ["sentence", "label"]
    assert list(table["sentence"]) == FRAME["sentence"].tolist()
    assert list(table["label"]) == FRAME["label"].tolist()


def test_load_table_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="data file not found"):
        load_table(tmp_path / "missing.csv")
    (tmp_path / "table.xlsx").write_text("x")
    with pytest.raises(ValueError, match=r"unknown extension '\.xlsx'.*\.csv"):
        load_table(tmp_path / "table.xlsx")
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_pandas(FRAME)})
    splits.save_to_disk(str(tmp_path / "splits"))
    with pytest.raises(ValueError, match=r"splits \['train'\].*splits/train"):
        load_table(tmp_path / "splits")


def test_missing_columns_are_named_with_the_available_ones():
    table = datasets.Dataset.from_pandas(FRAME)
    with pytest.raises(ValueError) as error:
        check_columns(table, ["text", "sentence", "gold"], ["text"])
    assert str(error.value) == "column 'text', 'gold' not in the data; available columns: sentence, label"
    with pytest.raises(ValueError, match="'label' must hold text"):
        check_columns(datasets.Dataset.from_dict({"label": [1, 2]}), ["label"], ["label"])


def test_incomplete_rows_are_skipped_and_counted(caplog):
    table = datasets.Dataset.from_dict(
        {
            "text": ["word1", None, "", "  \t", "word2", "word3", "word4"],
            "pair": ["word5", "word5", "word5", "word5", None, "word6", "word7"],
            "label": [0, 1, 0, 1, 0, None, 1],
        }
    )
    with caplog.at_level(logging.WARNING, logger="kprune"):
        kept, dropped = drop_incomplete_rows(table, ["text"])
    assert (list(kept["text"]), dropped) == (["word1", "word2", "word3", "word4"], 3)
    assert "skipped 3 of 7 rows" in caplog.text

    kept, dropped = drop_incomplete_rows(table, ["text", "pair"], ["label"])
    assert (list(kept["text"]), dropped) == (["word1", "word4"], 5)

    kept, dropped = drop_incomplete_rows(kept, ["text"])
    assert (len(kept), dropped) == (2, 0)


def test_tokenize_pads_pairs_and_counts_truncated_rows(tmp_path, caplog):
    tokenizer = tiny_tokenizer(tmp_path)
    table = datasets.Dataset.from_dict(
        {"a": ["word1", "word1 word2 word3 word4", "word2 word3"], "b": ["word5", "word6", "word7 word8"]}
    )
    with caplog.at_level(logging.INFO, logger="kprune"):
        inputs = tokenize(table, tokenizer, "a", max_length=5)
    assert "3 rows; 1 truncated to max_length 5" in caplog.text
    assert inputs["attention_mask"].sum(1).tolist() == [3, 5, 4]  # [CLS] words [SEP], cut at 5
    assert inputs["input_ids"][1].tolist() == tokenizer.convert_tokens_to_ids(
        ["[CLS]", "word1", "word2", "word3", "[SEP]"]
    )

    inputs = tokenize(table, tokenizer, "a", "b", max_length=16)
    assert inputs["attention_mask"].sum(1).tolist() == [5, 8, 7]
    assert inputs["token_type_ids"].sum(1).tolist() == [2, 2, 3]  # second text and its [SEP]


def test_sample_holds_about_num_tokens_and_is_seeded(tmp_path):
    tokenizer = tiny_tokenizer(tmp_path)
    table = datasets.Dataset.from_dict({"text": sentences(600)})
    max_length = 10
    sample = draw_sample(table, tokenizer, num_tokens=1000, seed=3, max_length=max_length)
    total = int(sample["attention_mask"].sum())
    assert 1000 <= total < 1000 + max_length  # rows are added until the total reaches num_tokens
    assert sample["input_ids"].shape[1] <= max_length

    again = draw_sample(table, tokenizer, num_tokens=1000, seed=3, max_length=max_length)
    assert all(torch.equal(sample[name], again[name]) for name in sample)
    rows = choose_sample_rows(table, tokenizer, 1000, seed=3, max_length=max_length)
    assert rows != choose_sample_rows(table, tokenizer, 1000, seed=4, max_length=max_length)
    assert len(set(rows)) == len(rows) == len(sample["input_ids"])


def test_sample_takes_every_row_of_a_small_table(tmp_path):
    tokenizer = tiny_tokenizer(tmp_path)
    table = datasets.Dataset.from_dict({"text": sentences(30)})
    assert choose_sample_rows(table, tokenizer, num_tokens=10**6) == list(range(30))
    with pytest.raises(ValueError, match="num_tokens must be positive"):
        choose_sample_rows(table, tokenizer, num_tokens=0)


def named_classifier():
    model = tiny_model("bert", num_labels=3)
    model.config.id2label = {0: "pos", 1: "neg", 2: "neutral"}  # not in sorted order
    model.config.label2id = {"pos": 0, "neg": 1, "neutral": 2}
    return model


def test_labels_are_mapped_through_the_model_label_names():
    model = named_classifier()
    assert encode_labels(["pos", "neg", "pos", "neutral"], model).tolist() == [0, 1, 0, 2]
    assert encode_labels([2, 0, 1], model).tolist() == [2, 0, 1]
    with pytest.raises(ValueError, match=r"unknown labels \['positive'\]; the model's labels are"):
        encode_labels(["pos", "positive"], model)
    with pytest.raises(ValueError, match=r"labels \[3\] are not class ids of a 3-class model"):
        encode_labels([0, 3], model)


def test_string_labels_need_named_labels_and_regression_needs_numbers():
    with pytest.raises(ValueError, match="does not name its labels"):
        encode_labels(["pos", "neg"], tiny_model("bert", num_labels=2))
    regressor = tiny_model("bert", task="regression")
    labels = encode_labels([0.5, 2.0, 4], regressor)
    assert labels.dtype == torch.float32 and labels.tolist() == [0.5, 2.0, 4.0]
    with pytest.raises(ValueError, match="numeric labels"):
        encode_labels(["high"], regressor)


def test_official_squad_json_becomes_one_row_per_question(tmp_path):
    qas = [
        {"id": "a", "question": "word1", "answers": [{"text": "word2", "answer_start": 6}] * 2},
        {"id": "b", "question": "word3", "answers": [], "is_impossible": True},
    ]
    articles = [
        {"title": "T", "paragraphs": [{"context": "word1 word2 word3", "qas": qas}]},
        {
            "title": "U",
            "paragraphs": [{"context": "word4", "qas": [{"id": "c", "question": "word4", "answers": []}]}],
        },
    ]
    path = tmp_path / "dev-v2.0.json"
    path.write_text(json.dumps({"version": "v2.0", "data": articles}))
    table = load_table(path)
    assert table.column_names == ["id", "title", "context", "question", "answers"]
    assert table["id"] == ["a", "b", "c"] and table["context"][:2] == ["word1 word2 word3"] * 2
    assert table["answers"][0] == {"text": ["word2", "word2"], "answer_start": [6, 6]}
    assert table["answers"][2] == {"text": [], "answer_start": []}
    assert len(load_task_split(get_task("squad_v2"), "validation", path)[0]) == 3
    with pytest.raises(ValueError, match="2 questions in .* have no answer, which squad does not allow"):
        load_task_split(get_task("squad"), "validation", path)
    records = tmp_path / "records.json"  # a plain list of records is still read as a table
    records.write_text(json.dumps([{"text": "word1", "label": 0}]))
    assert load_table(records)["text"] == ["word1"]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.csv", b"", "is empty; it needs a header line (or JSON keys) and rows"),
        ("blank.jsonl", b"\n  \n", "is empty; it needs a header line (or JSON keys) and rows"),
        ("header.csv", b"text,label\n", "has no rows (only a header line); it needs one row per example"),
        ("header.tsv", b"text\tlabel\n", "has no rows (only a header line)"),
        ("none.json", b"[]", "has no rows; it needs one row per example"),
        ("latin1.csv", "text\ncaf\xe9\n".encode("latin-1"), "is not UTF-8 text (byte 0xe9 at offset 8)"),
        ("latin1.jsonl", '{"text": "\xe9"}'.encode("latin-1"), "is not UTF-8 text (byte 0xe9 at offset 10)"),
        ("cut.csv", "text\ncaf\xe9".encode()[:-1], "is not UTF-8 text (it ends inside a character)"),
        ("broken.jsonl", b'{"text": "word1"}\n{"text": \n', "cannot read"),
    ],
)
def test_unreadable_files_are_one_error_naming_the_file(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError) as error:
        load_table(path)
    assert message in str(error.value) and str(path) in str(error.value)
    assert "\n" not in str(error.value).strip()


def test_iconv_fix_is_named_and_works(tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes("text\ncaf\xe9 word1\n".encode("latin-1"))
    with pytest.raises(ValueError, match="save it as UTF-8, e.g. iconv -f latin1 -t utf-8 latin1.csv"):
        load_table(path)
    path.write_text(path.read_bytes().decode("latin-1"), encoding="utf-8")
    assert load_table(path)["text"] == ["café word1"]


@pytest.mark.parametrize("kind", ["csv", "tsv", "json", "jsonl", "parquet"])
def test_only_real_nulls_are_missing_not_the_words(tmp_path, kind):
    """The texts "NaN", "null", "NA", "None" are text; an empty CSV cell or a JSON null is missing."""
    texts = ["NaN", "null", "NA", "None", "n/a", None, "word1"]
    labels = ["pos", "neg", "pos", "neg", None, "pos", "NaN"]
    table = load_table(write_table(pd.DataFrame({"text": texts, "label": labels}), tmp_path, kind))
    assert (list(table["text"]), list(table["label"])) == (texts, labels)
    kept, dropped = drop_incomplete_rows(table, ["text"], ["label"])
    assert (list(kept["text"]), dropped) == (["NaN", "null", "NA", "None", "word1"], 2)


def test_class_ids_of_a_column_with_empty_cells(tmp_path):
    """An int label column with an empty cell is read as floats; the rows left keep their class ids."""
    path = tmp_path / "dev.csv"
    path.write_text("text,label\nword1,1\nword2,\nword3,0\n")
    table, skipped = load_task_split(custom_task("classification"), "validation", path)
    assert skipped == 1
    labels = encode_labels(table["label"], tiny_model("bert", num_labels=2))
    assert labels.dtype == torch.long and labels.tolist() == [1, 0]
