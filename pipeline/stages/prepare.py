"""Stage `prepare`: load the task's train and dev splits, tokenize train, draw the calibration sample.

Writes data/prepared: `task.json` (the task's kprune TaskSpec), `train` (tokenized with labels, for
fine-tuning the teacher; classification and regression only), `sample` (the tokenized calibration
sample of about `data.sample_tokens` tokens; for QA the windows of `max_length` tokens sharing `stride`),
`dev_examples/SPLIT` (the dev rows as they are; tokenized by the stages that score them) and
`info.json` (how sequences are cut, sizes, skipped rows, average token length per dev split: the FLOPs
model's sequence length). params: `data`, and `teacher.model` / `teacher.base` for the tokenizer.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import transformers

from kprune.arch import CLASSIFICATION, QUESTION_ANSWERING, REGRESSION
from kprune.data import average_token_length, calibration_sample, class_ids, tokenize
from pipeline import store, tracking
from pipeline.project import PREPARED, load_params, resolve_model_name, stage_main, start_stage
from pipeline.task import load_splits, save_dev_examples, save_task, task_from_params, window_from_params

logger = logging.getLogger("pipeline.prepare")


def tokenizer_source(teacher: dict) -> str:
    """The fine-tuned model when one is named, else the model to be fine-tuned: same vocabulary."""
    return resolve_model_name(teacher["base"] if teacher["model"] == "finetune" else teacher["model"])


def train_labels(task, table) -> torch.Tensor:
    values = np.asarray(table[task.label_column])
    if task.kind == CLASSIFICATION and task.label_names is not None:  # names or ids, checked
        values = class_ids(values, task.label_names, "the train split")
    elif values.dtype.kind not in "iuf":
        raise ValueError(
            f"fine-tuning the teacher needs numeric labels (class ids or regression targets); column "
            f"{task.label_column!r} holds {values.dtype} values: name the classes in data.label_names "
            "(a local classification) or give a fine-tuned teacher.model"
        )
    return torch.as_tensor(values, dtype=torch.float32 if task.kind == REGRESSION else torch.long)


def sizes(inputs: dict[str, torch.Tensor]) -> dict:
    lengths = inputs["attention_mask"].sum(1).double()
    return {"rows": len(lengths), "tokens": int(lengths.sum()), "average_length": float(lengths.mean())}


def prepare(data: dict, teacher: dict, prepared: Path = PREPARED) -> dict:
    task = task_from_params(data)
    window = window_from_params(task, data)
    max_length = window["max_length"]
    source = tokenizer_source(teacher)
    tokenizer = transformers.AutoTokenizer.from_pretrained(source)
    splits = load_splits(task, data)
    prepared.mkdir(parents=True, exist_ok=True)
    save_task(task, prepared)
    info = {"task": task.name, "kind": task.kind, "tokenizer": source, **window}
    info["skipped_rows"] = splits.skipped

    sample = calibration_sample(task, splits.train, tokenizer, data["sample_tokens"], data["seed"], **window)
    store.write_table(prepared / "sample", sample)
    info["sample"] = sizes(sample)
    if task.kind != QUESTION_ANSWERING:  # the teacher stage fine-tunes classifiers and regressors only
        train = tokenize(splits.train, tokenizer, task.text_column, task.text_pair_column, max_length)
        train["label"] = train_labels(task, splits.train)
        store.write_table(prepared / "train", train)
        info["train"] = sizes(train)
    save_dev_examples(splits.dev, prepared)
    info["dev"] = {
        split: {
            "rows": len(table),
            "average_length": average_token_length(task, table, tokenizer, **window),
        }
        for split, table in splits.dev.items()
    }
    info["reference_length"] = task.reference_length
    store.write_json(prepared / "info.json", info)
    for split, figures in [("sample", info["sample"]), ("train", info.get("train"))]:
        if figures:
            logger.info("%s: %d rows, %d tokens, %.2f tokens per row", split, figures["rows"],
                        figures["tokens"], figures["average_length"])  # fmt: skip
    for split, figures in info["dev"].items():
        logger.info("dev %s: %d rows, %.2f tokens per row", split, figures["rows"], figures["average_length"])
    return info


def main() -> None:
    start_stage()
    params = load_params()
    with tracking.stage_run("prepare", {"data": params["data"]}) as run:
        info = prepare(params["data"], params["teacher"])
        run.log_metrics({f"sample_{name}": value for name, value in info["sample"].items()})
        run.log_metrics(
            {f"dev_{split}_average_length": d["average_length"] for split, d in info["dev"].items()}
        )


if __name__ == "__main__":
    stage_main("prepare", main, ("data", "teacher"))
