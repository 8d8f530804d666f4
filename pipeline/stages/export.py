"""Stage `export`: the pruned model as a folder that ``kprune.load_pruned`` reloads in one call.

data/export/ holds the model in kprune's format (config, safetensors weights, kprune.json with the kept
heads and neurons and the full record), the tokenizer, and the evaluation metrics. The folder is written
as a temporary sibling and swapped in whole; dvc.yaml keeps it (persist), so until the swap the previous
model stays in place, whatever stops the stage.
"""

from __future__ import annotations

import logging
import shutil

import transformers

from kprune.io import save_pruned
from kprune.record import PruneRecord
from pipeline import store, tracking
from pipeline.project import EXPORT, METRICS, RECORD, TEACHER, stage_main, start_stage

logger = logging.getLogger("pipeline.export")


def load_record() -> PruneRecord:
    return PruneRecord.from_dict(store.read_json(RECORD))


def main() -> None:
    start_stage()
    from pipeline.flows import load_teacher, pruned_student

    with tracking.stage_run("export") as run:
        model = pruned_student(load_teacher("cpu"))
        tokenizer = transformers.AutoTokenizer.from_pretrained(TEACHER)
        replacing = EXPORT.exists()
        with store.atomic_folder(EXPORT) as folder:  # a kill or a full disk leaves the previous model whole
            save_pruned(model, folder, record=load_record(), tokenizer=tokenizer)
            shutil.copy(METRICS, folder / "metrics.json")
        if replacing:
            logger.info("replaced the previous pruned model in %s", EXPORT)
        run.log_artifacts(EXPORT, "pruned-model")
        logger.info("pruned model written to %s (load with kprune.load_pruned)", EXPORT.resolve())


if __name__ == "__main__":
    stage_main("export", main, ())
