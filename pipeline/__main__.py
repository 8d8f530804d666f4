"""``python -m pipeline``: run the DVC pipeline inside one MLflow run, and say where its results are.

python -m pipeline run                 # dvc repro: only the stages whose inputs changed
python -m pipeline run --force prune   # any further words go to dvc repro
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import yaml

from pipeline import store, tracking
from pipeline.params import ParamsError
from pipeline.prefect_api import prefect_api
from pipeline.project import EXPORT, PIPELINE_FOLDERS, RESUME_HINT, fail, load_params, start_stage

METRICS = PIPELINE_FOLDERS.metrics


def dvc_lock_tags(lock_file: Path = Path("dvc.lock")) -> dict[str, str]:
    """{"dvc.prune.data/prune/record.json": md5, ...}: which versions of each stage's outputs the run made."""
    if not lock_file.is_file():
        return {}
    stages = (yaml.safe_load(lock_file.read_text()) or {}).get("stages", {})
    return {
        f"dvc.{stage}.{out['path']}": out.get("md5", "")
        for stage, lock in stages.items()
        for out in lock.get("outs", [])
    }


def stage_environment(run_id: str) -> dict[str, str]:
    """This interpreter's folder first on PATH, so `python` in dvc.yaml is the project's virtualenv."""
    environment = dict(os.environ, **{tracking.PARENT_RUN_ENV: run_id})
    environment["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), environment.get("PATH", "")])
    return environment


def run(dvc_arguments: list[str]) -> int:
    params = load_params()  # every section checked before dvc deletes any stage's outputs
    start_stage()
    with prefect_api(), tracking.open_run("pipeline", params) as pipeline_run:
        command = [sys.executable, "-m", "dvc", "repro", *dvc_arguments]
        print("running:", " ".join(command[1:]), flush=True)
        dvc = subprocess.Popen(command, env=stage_environment(pipeline_run.run_id))
        try:
            returncode = dvc.wait()
        except KeyboardInterrupt:  # Ctrl-C reached dvc and its stage too: let them stop cleanly
            dvc.wait()
            raise
        finally:
            pipeline_run.set_tags(dvc_lock_tags())
        if returncode != 0:
            print(f"dvc repro failed (exit {returncode}); rerun to resume", file=sys.stderr)
            raise SystemExit(returncode)
        metrics = store.read_json(METRICS) if METRICS.is_file() else {}
        pipeline_run.log_metrics(metrics)
    print(summary(metrics, pipeline_run.run_id))
    return 0


def summary(metrics: dict, run_id: str) -> str:
    lines = ["", "pipeline finished"]
    if metrics:
        lines.append(
            f"  FLOPs kept {metrics['flops_kept']:.1%} (budget {metrics['flops_keep']:.0%}), "
            f"parameters kept {metrics['parameters_kept']:.1%}, pruned in {metrics['prune_seconds']:.0f} s"
        )
        for name in ("accuracy", "f1", "pearson", "exact_match"):
            if f"teacher_{name}" in metrics:
                lines.append(
                    f"  dev {name}: teacher {metrics[f'teacher_{name}']:.4f}, "
                    f"pruned {metrics[f'pruned_{name}']:.4f}"
                )
        speedups = [key for key in metrics if key.startswith("speedup_batch")]
        lines.append("  CPU speedup: " + ", ".join(f"{metrics[k]:.2f}x at batch {k[13:]}" for k in speedups))
    lines += [
        f"  pruned model: {EXPORT.resolve()}  (kprune.load_pruned)",
        f"  metrics:      {METRICS.resolve()}  (dvc metrics show; dvc plots show)",
        f"  MLflow run:   {run_id} in {tracking.tracking_uri()}",
        "                (mlflow ui --backend-store-uri sqlite:///mlflow.db)",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline",
        description="Run the kprune DVC pipeline (prepare, teacher, calibrate, prune, evaluate, export) in "
        "one MLflow run. Stages whose inputs did not change are skipped by DVC; an interrupted prune "
        "resumes at its first unfinished iteration.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser("run", help="dvc repro inside one MLflow run")
    run_parser.add_argument("dvc_arguments", nargs=argparse.REMAINDER, help="passed on to dvc repro")
    args = parser.parse_args(argv)
    try:
        return run(args.dvc_arguments)
    except ParamsError as error:
        fail(str(error))
    except KeyboardInterrupt:
        fail(f"interrupted; {RESUME_HINT}")


if __name__ == "__main__":
    sys.exit(main())
