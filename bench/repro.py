"""Overhead of a bare `dvc repro`: each stage's seconds outside its own work, and the error lines.

Measured on the tiny test pipeline: what a stage spends outside its own work is the interpreter and its
imports, the Prefect server and DVC's bookkeeping between stages. Target: at most 5 s per stage, and no
error line on a successful run.

    python -m bench.repro                      # a bare `dvc repro` of a fresh tiny project, cold then warm
    python -m bench.repro --runs 3             # three of each, one after the other
    python -m bench.repro --modes warm         # the default way only

Cold: every stage in a process of its own (KPRUNE_WARM=0); warm: the stages after the first forked from
the run's warm process (pipeline.warm), which the first stage starts and then runs in its own process.

A stage's wall time runs from DVC's "Running stage" line to the next stage's (the last: to dvc's exit);
its own work is the MLflow run it opens once its imports are done and its Prefect server is ready, from
the run's start to its end. Overhead = wall - work. The project is the tests' tiny pipeline
(tests/pipeline_project.py: this checkout's stages, a 2-layer BERT of hidden size 32, 2,000 sample
tokens), run with no PREFECT_API_URL, as a new user runs it. Writes <out>/repro.json and repro.md.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import RESULTS, ROOT, machine, markdown_table, names_of, write_json, write_markdown

sys.path.insert(0, str(ROOT / "tests"))  # the tiny test pipeline is defined with the tests
from pipeline_project import commit, environment, make_project, set_param, tiny_base_model  # noqa: E402

NAME = "repro"
# How the stages run: in forks of the run's warm process (pipeline.warm, the default), or each in a
# process of its own (KPRUNE_WARM=0, as before the warm process)
MODES = {"cold": {"KPRUNE_WARM": "0"}, "warm": {"KPRUNE_WARM": None}}
MODE_NAMES = {"cold": "each stage in its own process", "warm": "stages forked from the warm process"}
OVERHEAD_SECONDS = 5.0  # the target: per stage, outside the stage's own work
STAGE_LINE = re.compile(r"^Running stage '([^']+)'")
ERROR_LINE = re.compile(r"Error logging to API|All connection attempts failed|Traceback|ERROR")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.repro", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=1, help="fresh projects, one after another (%(default)s)")
    parser.add_argument(
        "--modes",
        type=names_of(MODES, "modes"),
        default=["cold", "warm"],
        help="cold (each stage in its own process), warm (forked from the warm process), or both, one "
        "fresh project each, in this order (%(default)s)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder (%(default)s)")
    return parser.parse_args(argv)


def tiny_project(folder: Path) -> Path:
    """The tests' reference project (tests/conftest.py), committed and never run."""
    project = make_project(folder / "project")
    base = tiny_base_model(folder / "base", layers=2)
    set_param(project, "teacher", "base", str(base))
    set_param(project, "teacher", "epochs", 0.05)
    set_param(project, "data", "sample_tokens", 2000)
    set_param(project, "evaluate", "latency_repeats", 2)
    commit(project)
    return project


def timed_repro(project: Path, env: dict) -> tuple[list[tuple[str, float, float]], list[str], int]:
    """Run a bare `dvc repro`: ([(stage, started, ended)] in wall-clock seconds, error lines, exit code)."""
    env = environment({"PREFECT_API_URL": None, "KPRUNE_MLFLOW_PARENT_RUN_ID": None, **env})
    process = subprocess.Popen(
        [sys.executable, "-m", "dvc", "repro"],
        cwd=project,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    stages, errors = [], []
    for line in process.stdout:
        now = time.time()
        if match := STAGE_LINE.match(line):
            if stages:
                stages[-1][2] = now
            stages.append([match.group(1), now, None])
        elif ERROR_LINE.search(line):
            errors.append(line.rstrip())
    code = process.wait()
    if stages:
        stages[-1][2] = time.time()
    return [tuple(stage) for stage in stages], errors, code


def work_seconds(project: Path) -> dict[str, float]:
    """Each stage's own work: its MLflow run's end minus start (the stage tag names it)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("kprune")
    return {
        run.data.tags["kprune.stage"]: (run.info.end_time - run.info.start_time) / 1000
        for run in client.search_runs([experiment.experiment_id])
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    rows, failures = [], []
    for number in range(args.runs):
        for mode in args.modes:
            with tempfile.TemporaryDirectory(prefix="kprune-repro-") as folder:
                project = tiny_project(Path(folder))
                stages, errors, code = timed_repro(project, MODES[mode])
                if code != 0:
                    failures.append(f"run {number} ({mode}): dvc repro exited {code}")
                work = work_seconds(project)
            for stage, started, ended in stages:
                wall = ended - started
                rows.append(
                    {
                        "run": number,
                        "mode": mode,
                        "stage": stage,
                        "wall_seconds": wall,
                        "work_seconds": work.get(stage),
                        "overhead_seconds": wall - work[stage] if stage in work else None,
                    }
                )
            rows.append({"run": number, "mode": mode, "errors": errors})
            print(
                f"run {number} ({mode}): {len(stages)} stages, {len(errors)} error lines, exit {code}",
                flush=True,
            )
    stage_rows = [row for row in rows if "stage" in row]
    error_lines = [line for row in rows if "errors" in row for line in row["errors"]]
    summary = {mode: overheads([row for row in stage_rows if row["mode"] == mode]) for mode in args.modes}
    main_mode = "warm" if "warm" in summary else args.modes[0]
    worst = summary[main_mode]["worst"]
    targets = {
        "overhead_per_stage_at_most_5_s": worst is not None and worst <= OVERHEAD_SECONDS and not failures,
        "worst_overhead_seconds": worst,
        "no_error_lines": not error_lines,
    }
    info = machine()
    result = {
        "benchmark": NAME, "machine": info, "rows": rows, "summary": summary, "failures": failures,
        "targets": targets,
    }  # fmt: skip
    write_json(args.out / f"{NAME}.json", result)
    table = markdown_table(
        ["run", "stages", "stage", "wall s", "own work s", "overhead s"],
        [
            [row["run"], row["mode"], row["stage"], f"{row['wall_seconds']:.1f}"]
            + (
                [f"{row['work_seconds']:.1f}", f"{row['overhead_seconds']:.1f}"]
                if row["work_seconds"] is not None
                else ["-", "-"]
            )
            for row in stage_rows
        ],
    )
    notes = [
        f"{mode} ({MODE_NAMES[mode]}): the whole repro {figures['wall']:.1f} s; overhead per stage "
        f"{figures['mean']:.1f} s on average, worst {figures['worst']:.1f} s, worst after the first stage "
        f"{figures['worst_after_first']:.1f} s"
        for mode, figures in summary.items()
        if figures["worst"] is not None
    ]
    notes += [
        f"Overhead per stage at most {OVERHEAD_SECONDS:g} s ({main_mode}): "
        f"{'met' if targets['overhead_per_stage_at_most_5_s'] else 'missed'} (worst {worst:.1f} s)",
        f"Error lines printed: {len(error_lines)}" + "".join(f"\n  - `{line}`" for line in error_lines),
        *failures,
    ]
    write_markdown(args.out / f"{NAME}.md", "Overhead of a bare `dvc repro`", info, table, notes)
    print(table)
    print("\n".join(notes))


def overheads(rows: list[dict]) -> dict:
    """Per-stage overhead figures of one mode's rows (all runs): mean, worst, worst but the first stage's."""
    measured = [row for row in rows if row["overhead_seconds"] is not None]
    if not measured:
        return {"wall": None, "mean": None, "worst": None, "worst_after_first": None}
    first = measured[0]["stage"]
    runs = len({row["run"] for row in rows})
    return {
        "wall": sum(row["wall_seconds"] for row in rows) / runs,
        "mean": sum(row["overhead_seconds"] for row in measured) / len(measured),
        "worst": max(row["overhead_seconds"] for row in measured),
        "worst_after_first": max(
            (row["overhead_seconds"] for row in measured if row["stage"] != first), default=None
        ),
    }


if __name__ == "__main__":
    main()
