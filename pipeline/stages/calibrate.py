"""Stage `calibrate`: run the teacher once over the sample and persist what pruning compares against.

Writes data/calibration: the teacher's soft labels, its encoder input (the student's input to sublayer
0) and, per sublayer, its pre-LayerNorm residual sum (the target of weight tuning), as Arrow files that
the prune stage reads back one batch at a time. params: the `calibrate` section.
"""

from __future__ import annotations

from pipeline import tracking
from pipeline.prefect_api import prefect_api
from pipeline.project import load_params, stage_main, start_stage


def main() -> None:
    start_stage()
    with prefect_api(preload="pipeline.flows"):  # imported while a Prefect server starts
        run_stage()


def run_stage() -> None:
    from pipeline.flows import calibrate_flow  # after prefect_api(): Prefect reads its settings on import

    params = load_params("calibrate")
    with tracking.stage_run("calibrate", {"calibrate": params}) as run:
        manifest = calibrate_flow(params["batch_size"], params["device"])
        run.log_metrics(
            {"calibration_tokens": manifest["tokens"], "calibration_sequences": manifest["sequences"]}
        )


if __name__ == "__main__":
    stage_main("calibrate", main, ("calibrate",))
