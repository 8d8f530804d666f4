"""Small task data written by the tests: GLUE-like and SQuAD-like tables, and a local folder laid out
like a hub dataset repository (Parquet files + README configs), standing in for the hub."""

from __future__ import annotations

from pathlib import Path

import datasets
from tiny import sentences

MRPC_LABELS = ["not_equivalent", "equivalent"]
MNLI_LABELS = ["entailment", "neutral", "contradiction"]


def pair_table(
    num: int, seed: int, columns=("sentence1", "sentence2"), labels=MRPC_LABELS
) -> datasets.Dataset:
    first, second = sentences(num, seed=seed), sentences(num, seed=seed + 100)
    features = datasets.Features(
        {
            columns[0]: datasets.Value("string"),
            columns[1]: datasets.Value("string"),
            "label": datasets.ClassLabel(names=labels),
            "idx": datasets.Value("int32"),
        }
    )
    rows = {
        columns[0]: first,
        columns[1]: second,
        "label": [i % len(labels) for i in range(num)],
        "idx": list(range(num)),
    }
    return datasets.Dataset.from_dict(rows, features=features)


def squad_table(num: int, seed: int, unanswerable: int = 0) -> datasets.Dataset:
    """SQuAD-format rows: the answer is a word span of the context; the last ``unanswerable`` have none."""
    contexts = sentences(num, seed=seed, min_words=4, max_words=40)
    questions = sentences(num, seed=seed + 1, min_words=1, max_words=5)
    answers = []
    for index, context in enumerate(contexts):
        words = context.split()
        if index >= num - unanswerable:
            answers.append({"text": [], "answer_start": []})
            continue
        first = index % len(words)
        text = " ".join(words[first : first + 2])
        answers.append({"text": [text], "answer_start": [context.index(text)]})
    return datasets.Dataset.from_dict(
        {
            "id": [f"q{index}" for index in range(num)],
            "question": questions,
            "context": contexts,
            "answers": answers,
        }
    )


def write_hub_repo(
    root: Path, configs: dict[str, dict[str, datasets.Dataset]], default: str | None = None
) -> Path:
    """A local dataset repository like nyu-mll/glue: ``<config>/<split>-00000-of-00001.parquet`` files
    and the README's YAML ``configs`` that ``datasets.load_dataset(root, config)`` reads."""
    lines = ["---", "configs:"]
    for config, splits in configs.items():
        lines.append(f"- config_name: {config}")
        if config == default:
            lines.append("  default: true")
        lines.append("  data_files:")
        for split, table in splits.items():
            (root / config).mkdir(parents=True, exist_ok=True)
            table.to_parquet(str(root / config / f"{split}-00000-of-00001.parquet"))
            lines += [f"  - split: {split}", f"    path: {config}/{split}-*"]
    (root / "README.md").write_text("\n".join([*lines, "---", ""]))
    return root


def glue_repo(root: Path) -> Path:
    """MRPC, MNLI (two dev splits) and STS-B, as in nyu-mll/glue."""
    stsb_dev = pair_table(20, seed=9).remove_columns("label")
    stsb_dev = stsb_dev.add_column("label", [float(i % 6) for i in range(20)])
    return write_hub_repo(
        root,
        {
            "mrpc": {"train": pair_table(60, seed=1), "validation": pair_table(20, seed=2)},
            "mnli": {
                "train": pair_table(60, 3, ("premise", "hypothesis"), MNLI_LABELS),
                "validation_matched": pair_table(12, 4, ("premise", "hypothesis"), MNLI_LABELS),
                "validation_mismatched": pair_table(15, 5, ("premise", "hypothesis"), MNLI_LABELS),
            },
            "stsb": {"validation": stsb_dev},
        },
    )


def squad_repo(root: Path, unanswerable: int = 0) -> Path:
    """Like rajpurkar/squad: one default config."""
    splits = {
        "train": squad_table(40, seed=1),
        "validation": squad_table(16, seed=2, unanswerable=unanswerable),
    }
    return write_hub_repo(root, {"plain_text": splits}, default="plain_text")
