"""What a batch reports: one row per (job, budget), the selection per model, the table, CSV, JSON, Pareto PNG
and the MLflow runs.

A drop is in points: 100 x (teacher's metric - pruned model's), the metric being a fraction in [0, 1].
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

from pipeline import store
from pipeline.jobs import Job, Selection

COLUMNS = (
    "job", "model", "task", "method", "budget", "flops_kept", "metric", "teacher_metric", "pruned_metric",
    "drop", "prune_seconds", "peak_rss_mb", "speedup", "output", "selected", "status", "error",
)  # fmt: skip


def _metric(metrics: dict, prefix: str, name: str) -> float | None:
    """``prefix_name``, or for a task of several dev splits its first split's (``prefix_name_SPLIT``)."""
    if f"{prefix}_{name}" in metrics:
        return metrics[f"{prefix}_{name}"]
    split = sorted(key for key in metrics if key.startswith(f"{prefix}_{name}_"))
    return metrics[split[0]] if split else None


def summary_row(job: Job, budget: float, outcome: dict, metric: str | None = None) -> dict:
    """The row of one finished (job, budget); outcome: its stage outputs, or {"error": ...}."""
    row = dict.fromkeys(COLUMNS)
    row.update(
        job=job.label(budget), model=job.model, task=job.data["task"], method=job.method, budget=budget
    )
    row["selected"] = False
    if "error" in outcome:
        row.update(status="failed", error=outcome["error"])
        return row
    from pipeline.task import load_task

    metrics = outcome["evaluate"]["metrics"]
    name = metric or load_task(Path(outcome["prepare"]["folder"])).main_metric
    teacher, pruned = _metric(metrics, "teacher", name), _metric(metrics, "pruned", name)
    speedups = sorted((key for key in metrics if key.startswith("speedup_batch")), key=lambda k: int(k[13:]))
    row.update(
        status="done",
        flops_kept=outcome["prune"]["flops_kept"],
        metric=name,
        teacher_metric=teacher,
        pruned_metric=pruned,
        drop=None if teacher is None or pruned is None else 100 * (teacher - pruned),
        prune_seconds=outcome["prune"]["seconds"],
        peak_rss_mb=outcome["prune"]["peak_rss_mb"],
        speedup=metrics[speedups[-1]] if speedups else None,
        output=str(Path(outcome["prune"]["folder"]) / "model"),
    )
    row["outcome"] = outcome  # for the MLflow runs; not written to the files
    return row


def select(rows: list[dict], selection: Selection | None) -> list[dict]:
    """Mark per model (teacher and task) the row of smallest FLOPs kept within the selection's drop."""
    if selection is None:
        return rows
    best: dict = {}
    for row in rows:
        if row["status"] != "done" or row["drop"] is None or row["drop"] > selection.max_drop:
            continue
        group = (row["model"], row["task"])
        if group not in best or row["flops_kept"] < best[group]["flops_kept"]:
            best[group] = row
    for row in best.values():
        row["selected"] = True
    return rows


def _text(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def job_line(row: dict) -> str:
    if row["status"] == "failed":
        return f"failed {row['job']}: {row['error']}"
    return (
        f"done   {row['job']}: FLOPs kept {row['flops_kept']:.1%}, "
        f"{row['metric']} {_text(row['pruned_metric'])} "
        f"(teacher {_text(row['teacher_metric'])}, drop {_text(row['drop'])} points), "
        f"pruned in {row['prune_seconds']:.1f} s"
    )


TABLE = ("job", "model", "method", "budget", "flops_kept", "metric", "pruned_metric", "drop", "prune_seconds",
         "peak_rss_mb", "speedup", "selected", "output")  # fmt: skip
HEADINGS = {"flops_kept": "FLOPs kept", "pruned_metric": "value", "drop": "drop (pt)",
            "prune_seconds": "prune s", "peak_rss_mb": "peak MB", "speedup": "CPU speedup"}  # fmt: skip


def table(rows: list[dict]) -> str:
    """The summary as aligned text; a failed job shows its error in place of its output folder."""
    cells = [[HEADINGS.get(name, name) for name in TABLE]]
    for row in rows:
        shown = dict(row, output=f"FAILED: {row['error']}") if row["status"] == "failed" else row
        cells.append([_text(shown[name]) for name in TABLE])
    widths = [max(len(line[i]) for line in cells) for i in range(len(TABLE) - 1)]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=False)) for line in cells
    ]
    return "\n".join(f"{text}  {line[-1]}" for text, line in zip(lines, cells, strict=True))


def pareto_png(rows: list[dict], path: Path) -> None:
    """Metric vs FLOPs kept, one line per (model, method), the selected points ringed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    done = [row for row in rows if row["status"] == "done" and row["pruned_metric"] is not None]
    for model, method in sorted({(row["model"], row["method"]) for row in done}):
        points = sorted(
            (r["flops_kept"], r["pruned_metric"])
            for r in done
            if (r["model"], r["method"]) == (model, method)
        )
        axes.plot(*zip(*points, strict=True), "o-", label=f"{Path(model).name} {method}")
    for model in sorted({row["model"] for row in done}):
        teacher = next(r["teacher_metric"] for r in done if r["model"] == model)
        axes.axhline(teacher, color="grey", linestyle=":", linewidth=1)
    chosen = [row for row in done if row["selected"]]
    if chosen:
        axes.scatter([r["flops_kept"] for r in chosen], [r["pruned_metric"] for r in chosen], s=160,
                     facecolors="none", edgecolors="black", label="selected")  # fmt: skip
    metrics = sorted({row["metric"] for row in done})
    axes.set(xlabel="FLOPs kept (fraction of the teacher's)", ylabel=", ".join(metrics) or "metric",
             title="Batch: task metric vs FLOPs kept (dotted: teachers)")  # fmt: skip
    if done:
        axes.legend(fontsize=8)
    figure.tight_layout()
    with store.atomic_path(path) as temporary:
        figure.savefig(temporary, dpi=100, format="png")
    plt.close(figure)


def write_summary(rows: list[dict], out: Path, selection: Selection | None, seconds: float) -> dict:
    """summary.csv, summary.json, pareto.png and selected/JOB/ (a copy of each selected model) in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    plain = [{name: row[name] for name in COLUMNS} for row in rows]
    with store.atomic_path(out / "summary.csv") as temporary, open(temporary, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(plain)
    failed = sum(row["status"] == "failed" for row in rows)
    result = {
        "rows": plain,
        "failed": failed,
        "seconds": seconds,
        "out": str(out),
        "select": None if selection is None else {"metric": selection.metric, "max_drop": selection.max_drop},
    }
    store.write_json(out / "summary.json", result)
    pareto_png(rows, out / "pareto.png")
    selected = out / "selected"
    if selected.exists():
        shutil.rmtree(selected)
    for row in rows:
        if row["selected"]:
            shutil.copytree(row["output"], selected / row["job"])
    return result


def log_runs(rows: list[dict], parent) -> None:
    """One MLflow run per (job, budget), nested in the batch's: its params, metrics and artifacts."""
    from pipeline import tracking

    for row in rows:
        params = {name: row[name] for name in ("model", "task", "method", "budget")}
        with tracking.open_run(row["job"], params, parent_run_id=parent.run_id, log_peak=False) as run:
            run.set_tags({"kprune.job": row["job"], "kprune.status": row["status"]})
            if row["status"] == "failed":
                run.set_tags({"kprune.error": row["error"][:5000]})
                run.mark_failed()
                continue
            outcome = row["outcome"]
            run.log_metrics(
                {
                    name: row[name]
                    for name in ("flops_kept", "drop", "prune_seconds", "peak_rss_mb", "speedup")
                }
            )
            run.log_metrics(outcome["evaluate"]["metrics"])
            run.log_artifacts(Path(outcome["prune"]["folder"]) / "record.json", "prune")
            run.log_artifacts(Path(outcome["evaluate"]["folder"]), "evaluate")
