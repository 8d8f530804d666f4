"""Stage `evaluate`: teacher and pruned model side by side on dev.

Writes data/evaluate/metrics.json (`dvc metrics show`): task metrics of both models and their drop,
FLOPs and parameters kept, pruning time, CPU latency and speedup; and the plots (`dvc plots show`):
heads and neurons kept per layer, reconstruction error per iteration. params: the `evaluate` section.
"""

from __future__ import annotations

import csv
import logging

from pipeline import store, tracking
from pipeline.prefect_api import prefect_api
from pipeline.project import PIPELINE_FOLDERS, Folders, load_params, stage_main, start_stage

logger = logging.getLogger("pipeline.evaluate")

ITERATION_COLUMNS = [
    "sublayer",
    "layer",
    "kind",
    "units_before",
    "units_kept",
    "relative_error_before",
    "relative_error_after",
    "predictive_lost",
    "representational_lost",
    "seconds",
]


def write_csv(path, rows: list[dict]) -> None:
    with store.atomic_path(path) as temporary, open(temporary, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def plot_rows(record: dict) -> tuple[list[dict], list[dict]]:
    steps = record["steps"]
    layers = [
        {
            "layer": heads["layer"],
            "heads_kept": heads["units_kept"],
            "heads_total": heads["units_before"],
            "neurons_kept": neurons["units_kept"],
            "neurons_total": neurons["units_before"],
        }
        for heads, neurons in zip(steps[0::2], steps[1::2], strict=True)
    ]
    iterations = [{name: step[name] for name in ITERATION_COLUMNS} for step in steps]
    return layers, iterations


def save_figures(layers: list[dict], iterations: list[dict], evaluation) -> None:
    """PNG versions of the two plots, for MLflow and the README."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    x = [row["layer"] for row in layers]
    left.bar([i - 0.2 for i in x], [r["heads_kept"] / r["heads_total"] for r in layers], 0.4, label="heads")
    left.bar(
        [i + 0.2 for i in x], [r["neurons_kept"] / r["neurons_total"] for r in layers], 0.4, label="neurons"
    )
    left.set(xlabel="layer", ylabel="fraction kept", title="Units kept per layer", ylim=(0, 1.05))
    left.legend()
    t = [row["sublayer"] for row in iterations]
    right.plot(t, [row["relative_error_before"] for row in iterations], "o-", label="before tuning")
    right.plot(t, [row["relative_error_after"] for row in iterations], "o-", label="after tuning")
    right.set(
        xlabel="sublayer (even: attention, odd: FFN)", ylabel="relative error", title="Reconstruction error"
    )
    right.legend()
    figure.tight_layout()
    with store.atomic_path(evaluation / "pruning.png") as temporary:
        figure.savefig(temporary, dpi=100, format="png")
    plt.close(figure)


def main() -> None:
    start_stage()
    with prefect_api(preload="pipeline.flows"):  # imported while a Prefect server starts
        run_stage()


def evaluate(params: dict, device: str, folders: Folders = PIPELINE_FOLDERS, pruned_model=None) -> dict:
    """The evaluate flow, its metrics.json and the plots' CSV and PNG files in ``folders.evaluation``."""
    from pipeline.flows import evaluate_flow  # after prefect_api(): Prefect reads its settings on import

    record = store.read_json(folders.record)
    folders.evaluation.mkdir(parents=True, exist_ok=True)
    metrics = evaluate_flow(params, record, device, folders, pruned_model)
    store.write_json(folders.metrics, metrics)
    layers, iterations = plot_rows(record)
    write_csv(folders.evaluation / "layers.csv", layers)
    write_csv(folders.evaluation / "iterations.csv", iterations)
    save_figures(layers, iterations, folders.evaluation)
    return metrics


def run_stage() -> None:
    params = load_params("evaluate")
    with tracking.stage_run("evaluate", {"evaluate": params}) as run:
        metrics = evaluate(params, load_params("prune")["device"])
        run.log_metrics(metrics)
        run.log_artifacts(PIPELINE_FOLDERS.evaluation, "evaluate")
        logger.info("%s", ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float)))


if __name__ == "__main__":
    stage_main("evaluate", main, ("evaluate", "prune"))
