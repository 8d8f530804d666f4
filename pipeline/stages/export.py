"""Stage `export`: the pruned model as a folder that ``kprune.load_pruned`` reloads in one call.

data/export/ holds the model in kprune's format (config, safetensors weights, kprune.json with the kept
heads and neurons and the full record), the tokenizer, and the evaluation metrics.
"""

from __future__ import annotations

import logging
import shutil

import transformers

from kprune.io import save_pruned
from kprune.record import PruneRecord
from pipeline import store, tracking
from pipeline.project import EXPORT, METRICS, RECORD, TEACHER, start_stage

logger = logging.getLogger("pipeline.export")


def load_record() -> PruneRecord:
    return PruneRecord.from_dict(store.read_json(RECORD))


def main() -> None:
    start_stage()
    from pipeline.flows import load_teacher, pruned_student

    with tracking.stage_run("export") as run:
        model = pruned_student(load_teacher("cpu"))
        if EXPORT.exists():
            shutil.rmtree(EXPORT)
        tokenizer = transformers.AutoTokenizer.from_pretrained(TEACHER)
        save_pruned(model, EXPORT, record=load_record(), tokenizer=tokenizer)
        shutil.copy(METRICS, EXPORT / "metrics.json")
        run.log_artifacts(EXPORT, "pruned-model")
        logger.info("pruned model written to %s (load with kprune.load_pruned)", EXPORT.resolve())


if __name__ == "__main__":
    main()
