"""Stage `export`: the pruned model as a folder that ``kprune.load_pruned`` reloads in one call.

data/export/ holds the model in kprune's format (config, safetensors weights, kprune.json with the kept
heads and neurons and the full record), the tokenizer, and the evaluation metrics. The folder is written
as a temporary sibling and swapped in whole; dvc.yaml keeps it (persist), so until the swap the previous
model stays in place, whatever stops the stage.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import transformers

from kprune.io import save_pruned
from kprune.record import PruneRecord
from pipeline import store, tracking
from pipeline.project import EXPORT, PIPELINE_FOLDERS, Folders, stage_main, start_stage

logger = logging.getLogger("pipeline.export")


def export(out: Path, folders: Folders = PIPELINE_FOLDERS, metrics: Path | None = None) -> None:
    """The teacher with the persisted iterations applied, saved to ``out`` in kprune's format (with a copy
    of the ``metrics`` file), replacing a previous model as a whole: a kill or a full disk leaves it."""
    from pipeline.flows import load_teacher, pruned_student

    model = pruned_student(load_teacher("cpu", folders), folders.iterations)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folders.teacher)
    record = PruneRecord.from_dict(store.read_json(folders.record))
    replacing = out.exists()
    with store.atomic_folder(out) as folder:
        save_pruned(model, folder, record=record, tokenizer=tokenizer)
        if metrics is not None:
            shutil.copy(metrics, folder / "metrics.json")
    if replacing:
        logger.info("replaced the previous pruned model in %s", out)


def main() -> None:
    start_stage()
    with tracking.stage_run("export") as run:
        export(EXPORT, metrics=PIPELINE_FOLDERS.metrics)
        run.log_artifacts(EXPORT, "pruned-model")
        logger.info("pruned model written to %s (load with kprune.load_pruned)", EXPORT.resolve())


if __name__ == "__main__":
    stage_main("export", main, ())
