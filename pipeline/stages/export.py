"""Stage `export`: the pruned model as a folder that ``kprune.load_pruned`` reloads in one call.

data/export/ holds the model in kprune's format (config, safetensors weights, kprune.json with the kept
heads and neurons and the full record), the tokenizer, and the evaluation metrics.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import transformers

from kprune.io import save_pruned
from kprune.record import PruneRecord
from pipeline import store, tracking
from pipeline.project import EXPORT, PIPELINE_FOLDERS, Folders, start_stage

logger = logging.getLogger("pipeline.export")


def export(out: Path, folders: Folders = PIPELINE_FOLDERS) -> None:
    """The teacher with the persisted iterations applied, saved to ``out`` in kprune's format."""
    from pipeline.flows import load_teacher, pruned_student

    model = pruned_student(load_teacher("cpu", folders), folders.iterations)
    if out.exists():
        shutil.rmtree(out)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folders.teacher)
    record = PruneRecord.from_dict(store.read_json(folders.record))
    save_pruned(model, out, record=record, tokenizer=tokenizer)


def main() -> None:
    start_stage()
    with tracking.stage_run("export") as run:
        export(EXPORT)
        shutil.copy(PIPELINE_FOLDERS.metrics, EXPORT / "metrics.json")
        run.log_artifacts(EXPORT, "pruned-model")
        logger.info("pruned model written to %s (load with kprune.load_pruned)", EXPORT.resolve())


if __name__ == "__main__":
    main()
