"""Stage `teacher`: the fine-tuned model K-prune starts from, as a local folder in data/teacher.

With `teacher.model: finetune` (the embedded default) it fine-tunes `teacher.base` on the prepared train
split (classification and regression); otherwise it resolves the named model (a path or hub id) to a
local copy, so every later stage and every rerun reads the same weights. params: the `teacher` section.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import transformers

from kprune.arch import QUESTION_ANSWERING, REGRESSION
from kprune.data import check_model_for_task
from kprune.evaluate import evaluate_model
from kprune.models import load_model, resolve_device
from pipeline import store, tracking
from pipeline.finetune import FinetuneConfig, finetune, model_to_finetune
from pipeline.project import (
    PIPELINE_FOLDERS,
    Folders,
    load_params,
    resolve_model_name,
    stage_main,
    start_stage,
)
from pipeline.task import dev_sets, load_task, read_train, window_options

logger = logging.getLogger("pipeline.teacher")


def fine_tuned_teacher(
    teacher: dict, task, device, prepared: Path
) -> tuple[transformers.PreTrainedModel, dict]:
    if task.kind == QUESTION_ANSWERING:
        raise ValueError("the teacher stage fine-tunes classifiers and regressors only; for QA set "
                         "teacher.model to a fine-tuned *ForQuestionAnswering model")  # fmt: skip
    train, labels = read_train(prepared)
    if task.kind == REGRESSION:
        head = {"num_labels": 1, "problem_type": "regression"}
    else:
        names = task.label_names or [str(i) for i in range(int(labels.max()) + 1)]
        head = {
            "num_labels": len(names),
            "id2label": dict(enumerate(names)),
            "label2id": {name: index for index, name in enumerate(names)},
        }
    model = model_to_finetune(resolve_model_name(teacher["base"]), teacher["seed"], **head)
    config = FinetuneConfig(
        epochs=teacher["epochs"],
        batch_size=teacher["batch_size"],
        learning_rate=teacher["learning_rate"],
        freeze_embeddings=teacher["freeze_embeddings"],
        seed=teacher["seed"],
    )
    losses = finetune(model, train, labels, config, device)
    return model, {"epoch_losses": losses}


def resolved_teacher(name: str) -> transformers.PreTrainedModel:
    model, _ = load_model(resolve_model_name(name), resolve_device("cpu"))
    return model


def make_teacher(teacher: dict, folders: Folders = PIPELINE_FOLDERS) -> dict:
    """Fine-tune or resolve the teacher, check it against the task, score it on the first dev split and
    save it to ``folders.teacher``; returns what teacher.json records (its dev metrics under "dev") and the
    seconds it took."""
    info = store.read_json(folders.prepared / "info.json")
    task = load_task(folders.prepared)
    device = resolve_device(teacher["device"])
    started = time.perf_counter()
    if teacher["model"] == "finetune":
        model, figures = fine_tuned_teacher(teacher, task, device, folders.prepared)
    else:
        model, figures = resolved_teacher(teacher["model"]), {}
    tokenizer = transformers.AutoTokenizer.from_pretrained(info["tokenizer"])
    check_model_for_task(task, model, tokenizer, info["max_length"])  # fails here, not 3 stages later
    dev_splits = dev_sets(task, tokenizer, window_options(info), folders.prepared)
    split, dev = next(iter(dev_splits.items()))
    metrics = evaluate_model(model, dev, device=device)
    figures.update(seconds=time.perf_counter() - started, dev=metrics)
    logger.info("teacher on dev %s: %s (%.0f s)", split, metrics, figures["seconds"])
    figures = {"source": teacher["model"], "base": teacher["base"], **figures}
    with store.atomic_folder(folders.teacher) as folder:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        # Without the seconds: a teacher fine-tuned again is the same folder, byte for byte (DVC skips what
        # reads it; the accuracy bench pools runs by its digest).
        store.write_json(folder / "teacher.json", {k: v for k, v in figures.items() if k != "seconds"})
    return figures


def main() -> None:
    start_stage()
    teacher = load_params("teacher")
    with tracking.stage_run("teacher", {"teacher": teacher}) as run:
        figures = make_teacher(teacher)
        run.log_metrics({f"teacher_dev_{name}": value for name, value in figures["dev"].items()})
        run.log_metrics({"teacher_seconds": figures["seconds"]})


if __name__ == "__main__":
    stage_main("teacher", main, ("teacher",))
