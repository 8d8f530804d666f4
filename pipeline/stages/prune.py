"""Stage `prune`: K-prune, one Prefect-tracked iteration per sublayer, resumable.

Every iteration persists its knowledge scores, mask, tuned weight and figures under
data/prune/iterations/TT; an interrupted run (a crash, a kill -9) resumes at the first unfinished
iteration. Writes data/prune/record.json (what was kept, FLOPs, per-iteration figures).
params: the `prune` section, passed unchanged to kprune.KPruneConfig.
"""

from __future__ import annotations

import dataclasses

from kprune.config import KPruneConfig
from pipeline import store, tracking
from pipeline.prefect_api import prefect_api
from pipeline.project import PREPARED, RECORD, load_params, start_stage


def sequence_length(seq_len, info: dict) -> float:
    """The FLOPs model's tokens per sequence: given, the task's reference value ("reference"), or by
    default the average measured on the (first) dev split."""
    if seq_len is None:
        return next(iter(info["dev"].values()))["average_length"]
    if seq_len == "reference":
        if info.get("reference_length") is None:
            raise ValueError(f"task {info['task']!r} has no reference sequence length; set prune.seq_len")
        return info["reference_length"]
    return float(seq_len)


def main() -> None:
    start_stage()
    with prefect_api():
        run_stage()


def run_stage() -> None:
    from pipeline.flows import prune_flow  # after prefect_api(): Prefect reads its settings on import

    params = load_params("prune")
    options = {name: value for name, value in params.items() if name != "device"}
    options["seq_len"] = sequence_length(params["seq_len"], store.read_json(PREPARED / "info.json"))
    config = KPruneConfig(**options)
    with tracking.stage_run("prune", {"prune": params}) as run:

        def log_iteration(step) -> None:
            figures = dataclasses.asdict(step)
            figures.pop("kept_units")
            figures.pop("kind")
            run.log_metric_series([figures], step_key="sublayer")

        record = prune_flow(config, params["device"], on_step=log_iteration)
        store.write_json(RECORD, record.to_dict())
        run.log_metrics(
            {
                "flops_kept": record.flops_kept,
                "prune_seconds": record.seconds,
                "sample_tokens": record.num_tokens,
            }
        )


if __name__ == "__main__":
    main()
