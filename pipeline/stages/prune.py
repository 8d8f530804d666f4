"""Stage `prune`: K-prune, one Prefect-tracked iteration per sublayer, resumable.

Every iteration persists its knowledge scores, mask, tuned weight and figures under
data/prune/iterations/TT; an interrupted run (a crash, a kill -9) resumes at the first unfinished
iteration. Writes data/prune/record.json (what was kept, FLOPs, per-iteration figures). Its MLflow run is
written when the loop ends (a run killed on the way leaves none; the resumed one logs every iteration).
params: the `prune` section, passed unchanged to kprune.KPruneConfig.
"""

from __future__ import annotations

import dataclasses

from kprune.config import KPruneConfig
from kprune.record import StepRecord
from kprune.sample import resolve_seq_len
from pipeline import store, tracking
from pipeline.prefect_api import prefect_api
from pipeline.project import PIPELINE_FOLDERS, Folders, load_params, stage_main, start_stage


def sequence_length(seq_len, info: dict) -> float | None:
    """prune.seq_len for the library: null stays None (the library measures the sample, as every entry
    point does), "reference" becomes the paper's value for the task, a number stays itself."""
    if seq_len is None:
        return None
    return resolve_seq_len(seq_len, reference_length=info.get("reference_length"))


def main() -> None:
    start_stage()
    with prefect_api(preload="pipeline.flows"):  # imported while a Prefect server starts
        run_stage()


def prune_config(params: dict, folders: Folders = PIPELINE_FOLDERS) -> KPruneConfig:
    """The library's config of params.yaml's prune section (its seq_len resolved for the prepared task)."""
    options = {name: value for name, value in params.items() if name != "device"}
    options["seq_len"] = sequence_length(params["seq_len"], store.read_json(folders.prepared / "info.json"))
    return KPruneConfig(**options)


def iteration_figures(step: StepRecord) -> dict:
    figures = dataclasses.asdict(step)
    figures.pop("kept_units")
    figures.pop("kind")
    return figures


def run_stage() -> None:
    from pipeline.flows import prune_flow  # after prefect_api(): Prefect reads its settings on import

    params = load_params("prune")
    config = prune_config(params)
    # Deferred: MLflow's client is imported after the loop, not on top of its peak memory (the progress
    # bar and Prefect's UI show the iterations meanwhile); every iteration is logged, resumed ones too.
    with tracking.stage_run("prune", {"prune": params}, deferred=True) as run:
        record = prune_flow(config, params["device"])
        store.write_json(PIPELINE_FOLDERS.record, record.to_dict())
        run.log_metric_series([iteration_figures(step) for step in record.steps], step_key="sublayer")
        run.log_metrics(
            {
                "flops_kept": record.flops_kept,
                "prune_seconds": record.seconds,
                "sample_tokens": record.num_tokens,
            }
        )


if __name__ == "__main__":
    stage_main("prune", main, ("prune",))
