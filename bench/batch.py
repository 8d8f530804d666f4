"""Batch compression: one `kprune batch` of five budgets x (K-prune, Kwon et al.) on the embedded default,
on the local runner with 1 worker and on a Dask LocalCluster of 2 workers x 1 thread, against the same jobs
run one by one from nothing (K-prune: `dvc repro` of a fresh project per budget; Kwon et al., which has no
DVC stage: a one-job batch in a fresh store), which shares no stage.

    python -m bench.batch                                           # the plan (hours on 2 cores: the
                                                                    # one-by-one runs fine-tune 10 teachers)
    python -m bench.batch --params my-params.yaml --budgets 0.5,0.7 --work /tmp/bb   # a smoke run

Every run is a fresh child process (`kprune batch ...`, `dvc repro`), timed from start to exit (Prefect
server start-up included, as a user sees it) in a project made under --work (this checkout's code and
dvc.yaml, the params file given). Writes <out>/batch.json, batch.md (the timings and the local batch's
summary table) and batch-pareto.png.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from bench.common import BUDGETS, ROOT, floats, machine, markdown_table, write_json, write_markdown

METHODS = ("kprune", "kwon")
KPRUNE = [sys.executable, "-c", "import sys; from kprune.cli import main; sys.exit(main())"]


def make_project(folder: Path, params: dict) -> Path:
    """This checkout's pipeline in a fresh git repository (DVC needs one), with ``params``."""
    folder.mkdir(parents=True)
    for name in ("dvc.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(ROOT / name, folder / name)
    shutil.copytree(ROOT / ".dvc", folder / ".dvc", ignore=shutil.ignore_patterns("tmp", "cache"))
    for package in ("pipeline", "kprune"):
        shutil.copytree(ROOT / package, folder / package, ignore=shutil.ignore_patterns("__pycache__"))
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git = ["git", "-c", "user.name=bench", "-c", "user.email=bench@example.com"]
    for command in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "bench"]):
        subprocess.run([*git, *command], cwd=folder, check=True)
    return folder


def timed(command: list[str], cwd: Path, log: Path) -> float:
    """Seconds from start to exit of ``command``; its output goes to ``log``; a failure stops the bench."""
    environment = dict(os.environ, PYTHONPATH=str(ROOT))
    environment["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), environment["PATH"]])
    started = time.perf_counter()
    with open(log, "w") as handle:
        result = subprocess.run(command, cwd=cwd, env=environment, stdout=handle, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(
            f"{' '.join(command[3:] if command[:1] == KPRUNE[:1] else command)} failed; see {log}"
        )
    return seconds


def jobs_file(path: Path, methods, budgets) -> Path:
    jobs = {"name": path.stem, "matrix": {"method": list(methods), "budgets": list(budgets)}}
    path.write_text(
        yaml.safe_dump({**jobs, "select": {"metric": "accuracy", "max_drop": 1.0}}, sort_keys=False)
    )
    return path


def one_by_one(work: Path, params: dict, methods, budgets) -> list[dict]:
    """Each job alone, from nothing: K-prune through `dvc repro`, a baseline as a one-job batch."""
    runs = []
    for method in methods:
        for budget in budgets:
            name = f"one-{method}-{budget:g}"
            if method == "kprune":
                alone = {**params, "prune": {**params["prune"], "flops_keep": budget}}
                project = make_project(work / name, alone)
                seconds = timed([sys.executable, "-m", "dvc", "repro"], project, work / f"{name}.log")
            else:
                project = make_project(work / name, params)
                jobs = jobs_file(project / f"{name}.yaml", [method], [budget])
                seconds = timed([*KPRUNE, "batch", "--quiet", jobs.name], project, work / f"{name}.log")
            runs.append({"method": method, "budget": budget, "how": "dvc repro" if method == "kprune" else
                         "one-job batch", "seconds": seconds})  # fmt: skip
            print(f"one by one: {method} at {budget:g}: {seconds:.0f} s", flush=True)
    return runs


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.batch", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--params", type=Path, default=ROOT / "params.yaml", help="params file (default: ours)"
    )
    parser.add_argument(
        "--budgets", type=floats, default=list(BUDGETS), help="FLOPs kept (default %(default)s)"
    )
    parser.add_argument(
        "--work", type=Path, help="folder for the projects and stores (default: a temporary one)"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results", help="(default bench/results)")
    parser.add_argument("--no-one-by-one", action="store_true", help="skip the jobs run one by one")
    args = parser.parse_args(argv)
    params = yaml.safe_load(args.params.read_text())
    work = args.work or Path(tempfile.mkdtemp(prefix="kprune-bench-batch-"))
    work.mkdir(parents=True, exist_ok=True)
    project = make_project(work / "batch", params)
    jobs = jobs_file(project / "bench-batch.yaml", METHODS, args.budgets)
    runs = []
    for runner, workers in (("local", 1), ("dask", 2)):
        store = f"store-{runner}"
        command = [*KPRUNE, "batch", "--quiet", jobs.name, "--store", store, "--runner", runner]
        seconds = timed([*command, "--workers", str(workers)], project, work / f"batch-{runner}.log")
        threads = "torch default" if runner == "local" else "1 each"
        runs.append({"runner": runner, "workers": workers, "threads": threads, "seconds": seconds})
        print(f"batch on {runner} x {workers}: {seconds:.0f} s", flush=True)
    summary = json.loads((project / "store-local/results/bench-batch/summary.json").read_text())
    alone = [] if args.no_one_by_one else one_by_one(work, params, METHODS, args.budgets)
    payload = {"machine": machine(), "budgets": args.budgets, "methods": METHODS, "batch": runs,
               "one_by_one": alone, "summary": summary["rows"]}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "batch.json", payload)
    shutil.copy(project / "store-local/results/bench-batch/pareto.png", args.out / "batch-pareto.png")
    rows = [[f"batch, {r['runner']} runner", r["workers"], r["threads"], r["seconds"]] for r in runs]
    if alone:
        rows.append(
            ["the jobs one by one, from nothing", 1, "torch default", sum(r["seconds"] for r in alone)]
        )
    table = markdown_table(["run", "workers", "torch threads", "wall s"], rows)
    columns = [
        "job",
        "method",
        "budget",
        "flops_kept",
        "pruned_metric",
        "drop",
        "prune_seconds",
        "speedup",
        "selected",
    ]
    table += "\n\n" + markdown_table(columns, [[row[c] for c in columns] for row in summary["rows"]])
    notes = [
        f"{len(summary['rows'])} jobs: budgets {args.budgets} x {', '.join(METHODS)}, params {args.params}"
    ]
    print(write_markdown(args.out / "batch.md", "Batch compression", payload["machine"], table, notes))


if __name__ == "__main__":
    main()
