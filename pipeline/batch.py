"""`kprune batch`: many (teacher, data, method, budget) jobs as one Prefect flow over a store of stages.

The batch runs the pipeline's own stage functions (pipeline.stages.*, pipeline.flows) as Prefect tasks,
each in a folder of its own under the store, named by the fingerprint of the stage's inputs:

    STORE/prepare/KEY/    params: data (+ the content of local data files), the tokenizer
    STORE/teacher/KEY/    params: teacher; the prepared data
    STORE/calibrate/KEY/  calibrate.batch_size; the teacher's and the sample's content (as the manifest)
    STORE/prune/KEY/      K-prune: the prune stage's run fingerprint (the key its iteration files carry);
                          a baseline: its config, the teacher's and the sample's content.
                          iterations/ (K-prune), record.json, model/ (the pruned model, kprune.load_pruned)
    STORE/evaluate/KEY/   params: evaluate; the prune folder's key. metrics.json, the plots

A folder is complete once its `.stage.json` is written (last, atomically): a later batch reuses it. So one
prepare / teacher / calibrate serves every budget and method of the same (teacher, data, sample), a second
run of a jobs file does no work, one more budget runs one prune, and an interrupted batch resumes (inside a
K-prune run, after its last finished sublayer, as `dvc repro` does). A stage shared by jobs is one task.

On a cluster of several machines STORE must be a folder every worker reaches (a shared filesystem).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from pipeline import store
from pipeline.jobs import Job, JobsFile
from pipeline.project import Folders

logger = logging.getLogger("pipeline.batch")

MARK = ".stage.json"  # written last into a stage's folder: the folder is complete
RUNNERS = ("local", "dask")
DEFAULT_STORE = Path("data/batch")

stage_task = task(cache_policy=NO_CACHE, persist_result=False)  # the store, not Prefect, caches


# ---------------------------------------------------------------- the store


def _done(folder: Path) -> dict | None:
    mark = folder / MARK
    return store.read_json(mark) if mark.is_file() else None


def _finish(folder: Path, stage: str, key: str, **figures) -> dict:
    output = {"stage": stage, "key": key, "folder": str(folder), **figures}
    store.write_json(folder / MARK, output)
    return output


def _content_digest(value) -> str | None:
    """The digest of a local file or folder named by a param, None for anything else (a hub id)."""
    if not isinstance(value, str) or not Path(value).exists():
        return None
    return store.folder_digest(value) if Path(value).is_dir() else store.file_digest(value)


def _set_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def _without_device(section: dict) -> dict:
    return {name: value for name, value in section.items() if name != "device"}


# ---------------------------------------------------------------- the stages as tasks


@stage_task(name="prepare")
def prepare_task(data: dict, teacher: dict, root: str, threads: int | None) -> dict:
    from pipeline.stages.prepare import prepare, tokenizer_source

    source = tokenizer_source(teacher)
    files = {name: _content_digest(data.get(name)) for name in ("train", "dev", "hub_dataset")}
    key = store.fingerprint("prepare", data, source, files)
    folder = Path(root) / "prepare" / key
    if done := _done(folder):
        return done
    _set_threads(threads)
    prepare(data, teacher, folder)
    return _finish(folder, "prepare", key, sample=store.folder_digest(folder / "sample"))


@stage_task(name="teacher")
def teacher_task(prepared: dict, teacher: dict, root: str, threads: int | None) -> dict:
    from pipeline.stages.teacher import make_teacher

    model = teacher["model"]
    params = _without_device(teacher) if model == "finetune" else {"model": model}
    key = store.fingerprint("teacher", params, _content_digest(model), prepared["key"])
    folder = Path(root) / "teacher" / key
    if done := _done(folder):
        return done
    _set_threads(threads)
    figures = make_teacher(teacher, Folders(prepared=Path(prepared["folder"]), teacher=folder))
    return _finish(folder, "teacher", key, digest=store.folder_digest(folder), dev=figures["dev"])


@stage_task(name="calibrate")
def calibrate_task(prepared: dict, teacher: dict, calibrate: dict, root: str, threads: int | None) -> dict:
    from pipeline.flows import calibrate_flow

    key = store.fingerprint("calibrate", calibrate["batch_size"], teacher["digest"], prepared["sample"])
    folder = Path(root) / "calibrate" / key
    if done := _done(folder):
        return done
    _set_threads(threads)
    folders = Folders(prepared=Path(prepared["folder"]), teacher=Path(teacher["folder"]), calibration=folder)
    calibrate_flow(calibrate["batch_size"], calibrate["device"], folders)
    return _finish(folder, "calibrate", key)


def _baseline_prune(job: Job, budget: float, folders: Folders, seq_len) -> tuple:
    """(key, run) of a baseline: Kwon et al. or weight magnitude on the prepared sample."""
    from kprune.baselines.kwon import KwonConfig, kwon_prune
    from kprune.baselines.magnitude import magnitude_prune
    from pipeline.flows import load_teacher
    from pipeline.task import sample_labels

    device = job.prune["device"]
    if job.method == "kwon":
        config = KwonConfig(flops_keep=budget, **{"seq_len": seq_len, **job.kwon})
        described = config.to_dict()
    else:
        described = {"method": "magnitude", "flops_keep": budget, "seq_len": seq_len}
    teacher_digest = store.read_json(folders.teacher / MARK)["digest"]
    sample_digest = store.read_json(folders.prepared / MARK)["sample"]
    key = store.fingerprint("prune", described, teacher_digest, sample_digest)

    def run():
        teacher = load_teacher("cpu", folders)
        sample = store.read_table(folders.prepared / "sample")
        if job.method == "kwon":
            labels = sample_labels(job.data, folders.prepared)
            return kwon_prune(teacher, sample, labels=labels, config=config, device=device)
        return magnitude_prune(teacher, sample, budget, seq_len=seq_len, device=device)

    return key, run


@stage_task(name="prune")
def prune_task(
    prepared: dict, teacher: dict, calibration: dict | None, job: Job, budget: float, root: str, threads
) -> dict:
    from kprune.io import save_pruned
    from kprune.memory import peak_rss_mb
    from pipeline.flows import prune_flow, prune_run_key
    from pipeline.stages.export import export
    from pipeline.stages.prune import prune_config, sequence_length

    folders = Folders(
        prepared=Path(prepared["folder"]),
        teacher=Path(teacher["folder"]),
        calibration=Path(calibration["folder"]) if calibration else Path(root) / "calibrate" / "none",
    )
    if job.method == "kprune":
        config = prune_config({**job.prune, "flops_keep": budget}, folders)
        key = prune_run_key(config, folders.calibration)  # the key of the prune stage's iteration files
    else:
        seq_len = sequence_length(job.prune["seq_len"], store.read_json(folders.prepared / "info.json"))
        key, run = _baseline_prune(job, budget, folders, seq_len)
    folders = dataclasses.replace(folders, prune=Path(root) / "prune" / key)
    if done := _done(folders.prune):
        return done
    _set_threads(threads)
    logger.info("start %s: %s at %g of the FLOPs", job.label(budget), job.method, budget)
    if job.method == "kprune":
        record = prune_flow(config, job.prune["device"], folders=folders)
        store.write_json(folders.record, record.to_dict())
        export(folders.prune / "model", folders)
    else:
        import transformers

        result = run()
        record = result.record
        store.write_json(folders.record, record.to_dict())
        tokenizer = transformers.AutoTokenizer.from_pretrained(folders.teacher)
        save_pruned(result.model, folders.prune / "model", record=record, tokenizer=tokenizer)
    return _finish(
        folders.prune,
        "prune",
        key,
        flops_kept=record.flops_kept,
        seconds=record.seconds,
        peak_rss_mb=peak_rss_mb(),
    )


@stage_task(name="evaluate")
def evaluate_task(prepared: dict, teacher: dict, pruned: dict, job: Job, root: str, threads) -> dict:
    from pipeline.stages.evaluate import evaluate

    key = store.fingerprint("evaluate", job.evaluate, pruned["key"])
    folder = Path(root) / "evaluate" / key
    if done := _done(folder):
        return done
    _set_threads(threads)
    folders = Folders(
        prepared=Path(prepared["folder"]),
        teacher=Path(teacher["folder"]),
        prune=Path(pruned["folder"]),
        evaluation=folder,
    )
    metrics = evaluate(job.evaluate, job.prune["device"], folders, Path(pruned["folder"]) / "model")
    return _finish(folder, "evaluate", key, metrics=metrics)


# ---------------------------------------------------------------- the flow


@dataclasses.dataclass
class JobRun:
    """One budget of one job: its chain of stage futures, prepare to evaluate."""

    job: Job
    budget: float
    futures: dict  # stage name -> Prefect future (shared with the other jobs of the same inputs)
    started: bool = False
    outcome: dict | None = None  # the stage outputs, or {"error": ...}


def threads_per_worker(workers: int) -> int:
    """Torch threads per worker: the cores torch would use, split, so workers do not oversubscribe them
    (two torch processes spinning on the same cores slow each other many times over)."""
    import torch

    return max(1, torch.get_num_threads() // workers)


def submit_jobs(jobs: JobsFile, root: Path, threads: int | None) -> list[JobRun]:
    """Every stage once per distinct inputs (by the params that decide them), jobs' chains sharing them."""
    shared: dict = {}
    root = str(root.resolve())

    def once(identity: tuple, stage, retries: int, *arguments):
        name = identity[0]
        if identity not in shared:
            shared[identity] = stage.with_options(
                retries=retries, task_run_name=f"{name} {len(shared)}"
            ).submit(*arguments, root, threads)
        return shared[identity]

    runs = []
    for job in jobs.jobs:
        retries = job.retries
        tokenizer = {key: job.teacher[key] for key in ("model", "base")}
        prepared = once(
            ("prepare", _freeze(job.data), _freeze(tokenizer)), prepare_task, retries, job.data, job.teacher
        )
        teacher_identity = ("teacher", prepared, _freeze(_without_device(job.teacher)))
        teacher = once(teacher_identity, teacher_task, retries, prepared, job.teacher)
        calibration = None
        if job.method == "kprune":
            calibration = once(
                ("calibrate", teacher, job.calibrate["batch_size"]),
                calibrate_task,
                retries,
                prepared,
                teacher,
                job.calibrate,
            )
        for budget in job.budgets:
            method = _freeze({"method": job.method, "prune": _without_device(job.prune), "kwon": job.kwon})
            pruned = once(
                ("prune", teacher, calibration, method, budget),
                prune_task,
                retries,
                prepared,
                teacher,
                calibration,
                job,
                budget,
            )
            evaluated = once(
                ("evaluate", pruned, _freeze(job.evaluate)),
                evaluate_task,
                retries,
                prepared,
                teacher,
                pruned,
                job,
            )
            futures = {
                "prepare": prepared,
                "teacher": teacher,
                "calibrate": calibration,
                "prune": pruned,
                "evaluate": evaluated,
            }
            runs.append(JobRun(job, budget, {name: f for name, f in futures.items() if f is not None}))
    return runs


def _freeze(value):
    """A hashable stand-in of params (dicts and lists), for telling shared stages apart."""
    return store.fingerprint(value)


FAILED_PREFIX = "Task run encountered an exception "  # Prefect's message of a failed task run


def _error(state) -> str:
    """A failed stage's error in one line: its exception's type and message."""
    error = state.result(raise_on_failure=False)
    if isinstance(error, BaseException) and not str(state.message or "").startswith(FAILED_PREFIX):
        text = f"{type(error).__name__}: {error}"
    else:  # a runner that hands back Prefect's summary (Dask: FailedRun) rather than the exception
        text = str(state.message).removeprefix(FAILED_PREFIX)
    return " ".join(text.split())


def _poll(run: JobRun) -> bool:
    """Update ``run`` from its futures' states; whether it has finished (completed, or failed somewhere)."""
    final = run.futures["evaluate"].state
    if final.is_completed():
        run.outcome = {name: future.result() for name, future in run.futures.items()}
        return True
    for name, future in run.futures.items():
        state = future.state
        if state.is_failed() or state.is_crashed() or state.is_cancelled():
            run.outcome = {"error": f"{name}: {_error(state)}"}
            return True
        if name == "prune" and state.is_running():
            run.started = True
    return False


def follow(runs: list[JobRun], on_start, on_finish, interval: float = 0.5) -> None:
    """Wait for every job, calling on_start(run) when its prune starts and on_finish(run) when it ends."""
    pending = list(runs)
    while pending:
        for run in list(pending):
            was_started = run.started
            finished = _poll(run)
            if (run.started or finished) and not was_started:
                run.started = True
                on_start(run)
            if finished:
                pending.remove(run)
                on_finish(run)
        if pending:
            time.sleep(interval)


@flow(name="batch-jobs")
def run_jobs_flow(jobs: JobsFile, root: str, threads: int | None, quiet: bool = False) -> list[dict]:
    """The jobs' stages as tasks on this flow's task runner; one summary row per (job, budget)."""
    from tqdm.auto import tqdm

    from pipeline.summary import job_line, summary_row

    runs = submit_jobs(jobs, Path(root), threads)
    metric = jobs.select.metric if jobs.select else None  # else each task's main metric
    rows = []
    with tqdm(total=len(runs), desc="batch jobs", unit="job", disable=quiet) as bar:

        def on_start(run: JobRun) -> None:
            bar.write(f"start  {run.job.label(run.budget)}: {run.job.method} at {run.budget:g} of the FLOPs")

        def on_finish(run: JobRun) -> None:
            rows.append(summary_row(run.job, run.budget, run.outcome, metric))
            bar.write(job_line(rows[-1]))
            bar.update()

        follow(runs, on_start, on_finish)
    order = {run.job.label(run.budget): index for index, run in enumerate(runs)}
    return sorted(rows, key=lambda row: order[row["job"]])


def task_runner(runner: str, workers: int, scheduler: str | None):
    """Prefect's task runner: this process (1 worker), a process pool, or Dask (a LocalCluster of
    `workers` processes of one thread each, or the cluster at `scheduler`)."""
    if runner == "dask":
        from prefect_dask import DaskTaskRunner

        if scheduler:
            return DaskTaskRunner(address=scheduler)
        cluster = {
            "n_workers": workers,
            "threads_per_worker": 1,
            "processes": True,
            "dashboard_address": None,
        }
        return DaskTaskRunner(cluster_kwargs=cluster)
    from prefect.task_runners import ProcessPoolTaskRunner, ThreadPoolTaskRunner

    return ThreadPoolTaskRunner(max_workers=1) if workers == 1 else ProcessPoolTaskRunner(max_workers=workers)


@contextlib.contextmanager
def environment_kept() -> Iterator[None]:
    """Give this process back its environment on exit. Dask's nanny sets OMP_NUM_THREADS=1 (and MKL's,
    OpenBLAS's) in its own process's environment before it spawns a worker and leaves it there: every
    process started from here afterwards (a notebook's next `dvc repro`, a stage) would run torch on one
    thread, more slowly and with different round-off than the same job started fresh."""
    saved = dict(os.environ)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


@flow(name="batch")
def batch_flow(
    jobs_file: str,
    store_dir: str = str(DEFAULT_STORE),
    out: str | None = None,
    runner: str = "local",
    workers: int = 1,
    scheduler: str | None = None,
    params_file: str = "params.yaml",
    quiet: bool = False,
) -> dict:
    """Run a jobs file: every job's stages in the store, then the summary (table, CSV, JSON, Pareto PNG,
    selected models) in ``out`` and one MLflow run with a nested run per job. Returns the summary."""
    import yaml

    from pipeline import summary, tracking
    from pipeline.jobs import read_jobs

    params = yaml.safe_load(Path(params_file).read_text())
    jobs = read_jobs(jobs_file, params)
    out_dir = Path(out) if out else Path(store_dir) / "results" / jobs.name
    threads = threads_per_worker(workers) if not scheduler else None
    if runner == "local" and workers == 1:
        threads = None  # this process: torch keeps its own setting
    started = time.perf_counter()
    batch_params = {"jobs_file": jobs_file, "store": store_dir, "runner": runner, "workers": workers}
    with tracking.open_run(f"batch {jobs.name}", batch_params) as parent:
        inner = run_jobs_flow.with_options(task_runner=task_runner(runner, workers, scheduler))
        with environment_kept():
            rows = inner(jobs, store_dir, threads, quiet)
        rows = summary.select(rows, jobs.select)
        result = summary.write_summary(rows, out_dir, jobs.select, seconds=time.perf_counter() - started)
        summary.log_runs(rows, parent)
        parent.log_metrics({"jobs": len(rows), "failed": result["failed"], "seconds": result["seconds"]})
        parent.log_artifacts(out_dir / "summary.json", "summary")
    return result
