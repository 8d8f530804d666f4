"""MLflow tracking: one run per pipeline run, one nested run per stage, metrics logged in batches.

The tracking store is ``sqlite:///mlflow.db`` in the project (unless MLFLOW_TRACKING_URI says otherwise);
browse it with ``mlflow ui --backend-store-uri sqlite:///mlflow.db``. ``python -m pipeline run`` opens
the pipeline's run and passes its id to the stages in KPRUNE_MLFLOW_PARENT_RUN_ID; a stage started by a
bare ``dvc repro`` gets a top-level run of its own.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

from pipeline.faults import kill_point

logger = logging.getLogger(__name__)

EXPERIMENT = "kprune"
PARENT_RUN_ENV = "KPRUNE_MLFLOW_PARENT_RUN_ID"
PROCESS_TAG, HOST_TAG = "kprune.pid", "kprune.host"  # which process runs it: a killed one's run is found
_MAX_BATCH = 900  # MLflow accepts 1000 metrics per log_batch call


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"


def flatten(params: Mapping, prefix: str = "") -> dict[str, str]:
    """{"prune": {"mu": 1}} -> {"prune.mu": "1"}: MLflow params are flat strings."""
    flat = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = str(value)
    return flat


def git_commit() -> str | None:
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return result.stdout.strip()


class Run:
    """A handle on one MLflow run: batched metrics, params, tags and artifacts."""

    def __init__(self, client, run_id: str):
        self.client, self.run_id, self.failed = client, run_id, False

    def mark_failed(self) -> None:
        """End as FAILED although the block returns (a batch job that failed elsewhere)."""
        self.failed = True

    def log_params(self, params: Mapping) -> None:
        from mlflow.entities import Param

        items = [Param(key, value[:6000]) for key, value in flatten(params).items()]
        for start in range(0, len(items), 100):  # MLflow's limit of params per batch
            self.client.log_batch(self.run_id, params=items[start : start + 100])

    def log_metrics(self, metrics: Mapping[str, float | None], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [
            Metric(name, float(value), now, step)
            for name, value in metrics.items()
            if isinstance(value, int | float) and not isinstance(value, bool)
        ]
        for start in range(0, len(items), _MAX_BATCH):
            self.client.log_batch(self.run_id, metrics=items[start : start + _MAX_BATCH])

    def log_metric_series(self, rows: list[Mapping[str, float]], step_key: str) -> None:
        """Per-iteration figures: each row's numbers logged at step row[step_key], all in few calls."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [
            Metric(name, float(value), now, int(row[step_key]))
            for row in rows
            for name, value in row.items()
            if name != step_key and isinstance(value, int | float) and not isinstance(value, bool)
        ]
        for start in range(0, len(items), _MAX_BATCH):
            self.client.log_batch(self.run_id, metrics=items[start : start + _MAX_BATCH])

    def set_tags(self, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(key, str(value)) for key, value in tags.items()])

    def log_artifacts(self, path: str | Path, artifact_path: str | None = None) -> None:
        """A file, or a folder's files one by one (a kill point halfway, for the crash tests)."""
        path = Path(path)
        if not path.is_dir():
            self.client.log_artifact(self.run_id, str(path), artifact_path)
            return
        files = sorted(file for file in path.rglob("*") if file.is_file())
        for index, file in enumerate(files):
            if index == len(files) // 2:
                kill_point(f"mlflow:{artifact_path}")
            folder = file.parent.relative_to(path).as_posix()
            within = "/".join(part for part in (artifact_path, folder) if part and part != ".")
            self.client.log_artifact(self.run_id, str(file), within or None)


class RecordedRun:
    """The metrics of a run kept in memory while its block runs and logged when it ends, by
    ``open_run(..., deferred=True)``: the MLflow client (with pandas, SQLAlchemy and MLflow's store, about
    140 MB of a process's memory) is then imported after the work, not on top of its peak."""

    def __init__(self):
        self.failed, self.calls = False, []

    def mark_failed(self) -> None:
        self.failed = True

    def log_metrics(self, metrics: Mapping[str, float | None], step: int = 0) -> None:
        self.calls.append(("log_metrics", (dict(metrics), step)))

    def log_metric_series(self, rows: list[Mapping[str, float]], step_key: str) -> None:
        self.calls.append(("log_metric_series", ([dict(row) for row in rows], step_key)))

    def replay(self, run: Run) -> None:
        for method, arguments in self.calls:
            getattr(run, method)(*arguments)


def client():
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri())


def experiment_id(mlflow_client) -> str:
    experiment = mlflow_client.get_experiment_by_name(EXPERIMENT)
    if experiment is not None:
        return experiment.experiment_id
    return mlflow_client.create_experiment(EXPERIMENT)


@contextlib.contextmanager
def open_run(
    name: str,
    params: Mapping | None = None,
    parent_run_id: str | None = None,
    log_peak: bool = True,
    deferred: bool = False,
) -> Iterator[Run | RecordedRun]:
    """A run that ends FINISHED, or FAILED if the block raises; with log_peak, it records this process's
    peak memory (peak_rss_mb). Deferred, the block gets a RecordedRun (metrics only) and the MLflow run is
    created when the block ends, with the block's start as its start time: a process killed on the way
    leaves no run."""
    started = time.time()
    run = RecordedRun() if deferred else start_run(name, params, parent_run_id, started)
    status = "FAILED"
    try:
        yield run
        status = "FAILED" if run.failed else "FINISHED"
    finally:
        if deferred:
            recorded, run = run, start_run(name, params, parent_run_id, started)
            recorded.replay(run)
        if log_peak:
            from kprune.memory import peak_rss_mb  # torch: imported by the stage already, not by `--help`

            peak = peak_rss_mb()
            run.log_metrics({"peak_rss_mb": peak})
            logger.info("%s: peak memory %.0f MB", name, peak)
        run.client.set_terminated(run.run_id, status)


def start_run(name: str, params: Mapping | None, parent_run_id: str | None, started: float) -> Run:
    mlflow_client = client()
    tags = {"kprune.stage": name}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    commit = git_commit()
    if commit:
        tags["git.commit"] = commit
    tags.update({PROCESS_TAG: str(os.getpid()), HOST_TAG: socket.gethostname()})
    experiment = experiment_id(mlflow_client)
    mark_killed_runs(mlflow_client, experiment, name)
    created = mlflow_client.create_run(experiment, start_time=int(started * 1000), run_name=name, tags=tags)
    run = Run(mlflow_client, created.info.run_id)
    if params:
        run.log_params(params)
    return run


def mark_killed_runs(mlflow_client, experiment: str, name: str) -> None:
    """Runs of stage ``name`` left RUNNING by a process of this host that is gone (a kill -9 gives it no
    time to end its run) are marked KILLED."""
    query = f"tags.`kprune.stage` = '{name}' and attributes.status = 'RUNNING'"
    for run in mlflow_client.search_runs([experiment], filter_string=query):
        tags = run.data.tags
        if tags.get(HOST_TAG) == socket.gethostname() and not process_alive(int(tags.get(PROCESS_TAG, 0))):
            mlflow_client.set_terminated(run.info.run_id, "KILLED")
            logger.info("MLflow run %s of a killed %s stage marked KILLED", run.info.run_id, name)


def process_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def stage_run(stage: str, params: Mapping | None = None, deferred: bool = False):
    """The run of one stage, nested in the pipeline's run when there is one (deferred: see open_run)."""
    return open_run(stage, params, parent_run_id=os.environ.get(PARENT_RUN_ENV), deferred=deferred)
