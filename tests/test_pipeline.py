"""The DVC pipeline end to end on a tiny configuration: real `dvc repro`, real Prefect flows, real MLflow.

The session's reference project (conftest.py: a git repo in a temporary folder with this checkout's
dvc.yaml, params.yaml and pipeline/, after one `python -m pipeline run`) is read by the tests that only
look; each scenario that changes a project (a no-op rerun, `dvc exp run -S` run bare, a queued sweep;
the kills and their resumes are in test_pipeline_faults.py) runs on its own copy, so the tests pass alone
and in any order. The teacher is a tiny random BERT with MiniLM's tokenizer, fine-tuned
for a few steps by the teacher stage on the embedded Rotten Tomatoes data.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
import yaml
from pipeline_project import SUBLAYERS, dvc, servers_of, stages_run, wait_until

import kprune
from kprune.iterate import iterate
from kprune.models import load_model
from kprune.search import budget_limit
from kprune.sublayer import sublayers, unit_counts
from pipeline import store

pytestmark = pytest.mark.slow


def test_repro_runs_every_stage_then_nothing(reference, workspace):
    first = reference.result
    assert stages_run(first) == ["prepare", "teacher", "calibrate", "prune", "evaluate", "export"]
    assert "pipeline finished" in first.stdout and "pruned model:" in first.stdout
    # one log line per prune iteration, with its figures
    assert sum("INFO kprune.iterate: iteration" in line for line in first.stderr.splitlines()) == SUBLAYERS

    metrics = json.loads((reference.project / "data/evaluate/metrics.json").read_text())
    assert metrics["flops_keep"] == 0.5 and metrics["flops_kept"] <= budget_limit(0.5)
    assert 0 <= metrics["teacher_accuracy"] <= 1 and 0 <= metrics["pruned_accuracy"] <= 1
    model = kprune.load_pruned(reference.project / "data/export")
    heads, neurons = unit_counts(model)
    assert sum(heads) + sum(neurons) < 2 * (4 + 48)

    second = dvc(workspace, "repro")
    assert stages_run(second) == []
    assert "Data and pipelines are up to date" in second.stdout


def test_the_exported_model_is_bit_identical_to_kprune_prune(reference):
    """The pipeline runs the library's loop: on the same teacher, sample and params, `dvc repro`'s
    exported model and one `kprune.prune` call agree to the last bit."""
    project = reference.project
    params = yaml.safe_load((project / "params.yaml").read_text())["prune"]
    config = kprune.KPruneConfig(**{name: value for name, value in params.items() if name != "device"})
    teacher, _ = load_model(str(project / "data/teacher"), torch.device("cpu"))
    sample = store.read_table(project / "data/prepared/sample")
    sample.pop("label", None)
    library = kprune.prune(teacher, sample, config=config, device="cpu", progress=False)
    exported = kprune.load_pruned(project / "data/export")
    record = json.loads((project / "data/prune/record.json").read_text())
    assert record["heads"] == library.record.heads and record["neurons"] == library.record.neurons
    assert record["seq_len"] == library.record.seq_len
    expected = library.model.state_dict()
    assert exported.state_dict().keys() == expected.keys()
    for name, value in exported.state_dict().items():
        assert torch.equal(value, expected[name]), name


def test_the_prune_stage_lets_its_teacher_go_and_prunes_alike(reference, tmp_path):
    """The prune stage's teacher side reads the calibration files and never runs the teacher: with
    release=True each of the teacher's sublayers is let go once the loop has read its targets through,
    and the loop prunes as it does with the teacher kept."""
    from pipeline.flows import CalibrationFiles, load_teacher, sample_batches
    from pipeline.project import Folders

    project, cpu = reference.project, torch.device("cpu")
    data = project / "data"
    folders = Folders(data / "prepared", data / "teacher", data / "calibration", tmp_path, tmp_path)
    params = yaml.safe_load((project / "params.yaml").read_text())["prune"]
    config = kprune.KPruneConfig(**{name: value for name, value in params.items() if name != "device"})
    models = {}
    for release in (False, True):
        teacher = load_teacher(cpu, folders)
        batches = sample_batches(teacher, config.batch_size, cpu, folders)
        side = CalibrationFiles(teacher, batches, cpu, folders.calibration, release=release)
        result = iterate(
            teacher, batches, config, teacher_side=side, keep_teacher=not release, progress=False
        )
        models[release] = result.model.state_dict()
        let_go = [p.numel() == 0 for sub in sublayers(teacher) for p in sub.module.parameters()]
        assert all(let_go) if release else not any(let_go)
    assert models[True].keys() == models[False].keys()
    for name, value in models[False].items():
        assert torch.equal(value, models[True][name]), name


def test_an_experiment_on_the_budget_reruns_only_prune_and_after_on_one_shared_server(workspace):
    """`dvc exp run -S` changes the budget in params.yaml and reproduces what depends on it, no more; run
    bare (no PREFECT_API_URL), as a new user runs dvc, its flow stages share one local server, which ends
    with dvc, and nothing prints an error."""
    project = workspace
    result = dvc(project, "exp", "run", "-S", "prune.flops_keep=0.3", env={"PREFECT_API_URL": None})
    assert stages_run(result) == ["prune", "evaluate", "export"]
    metrics = json.loads((project / "data/evaluate/metrics.json").read_text())
    assert metrics["flops_keep"] == 0.3 and metrics["flops_kept"] <= budget_limit(0.3)
    assert yaml.safe_load((project / "params.yaml").read_text())["prune"]["flops_keep"] == 0.3
    shown = json.dumps(json.loads(dvc(project, "exp", "show", "--json").stdout))
    assert '"flops_keep": 0.3' in shown

    output = result.stdout + result.stderr
    assert "Error logging to API" not in output and "Traceback" not in output
    # the two flows (prune, evaluate) were recorded by one server, started once (by the first stage or by
    # the run's warm process, whichever asked first) and reused
    assert len(set(re.findall(r"View at (http://127\.0\.0\.1:\d+)/", output))) == 1
    started, reused = output.count("local server, started"), output.count("local server, reused")
    assert started <= 1 and started + reused == 2
    assert wait_until(lambda: not servers_of(project), seconds=10)


def test_queued_budget_sweep_runs_and_exp_show_lists_both(workspace):
    """The DVC-native sweep of the README: one queued experiment per budget, two run at a time."""
    project = workspace
    for budget in ("0.3", "0.6"):
        dvc(project, "exp", "run", "--queue", "-S", f"prune.flops_keep={budget}")
    dvc(project, "queue", "start", "-j", "2")

    def finished() -> bool:
        status = dvc(project, "queue", "status").stdout
        return not any(word in status for word in ("Queued", "Running"))

    # each poll is a dvc process: poll rarely, not to take the 2 cores from the experiments
    assert wait_until(finished, 900, every=5), dvc(project, "queue", "status").stdout
    status = dvc(project, "queue", "status").stdout
    assert status.count("Success") == 2, status
    shown = json.dumps(json.loads(dvc(project, "exp", "show", "--json").stdout))
    assert '"flops_keep": 0.3' in shown and '"flops_keep": 0.6' in shown


def test_mlflow_holds_the_runs_with_per_iteration_metrics(reference):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{reference.project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("kprune")
    runs = client.search_runs([experiment.experiment_id])
    pipeline_runs = [run for run in runs if run.info.run_name == "pipeline"]
    assert len(pipeline_runs) == 1 and pipeline_runs[0].data.tags.get("git.commit")
    assert any(tag.startswith("dvc.prune.") for tag in pipeline_runs[0].data.tags)
    parent = pipeline_runs[0].info.run_id
    nested = {run.info.run_name for run in runs if run.data.tags.get("mlflow.parentRunId") == parent}
    assert nested == {"prepare", "teacher", "calibrate", "prune", "evaluate", "export"}

    prune_run = next(
        run
        for run in runs
        if run.data.tags.get("mlflow.parentRunId") == parent and run.info.run_name == "prune"
    )
    history = client.get_metric_history(prune_run.info.run_id, "relative_error_after")
    assert sorted(metric.step for metric in history) == list(range(SUBLAYERS))
    assert prune_run.data.params["prune.flops_keep"] == "0.5"
