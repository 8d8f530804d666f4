"""Faults on the pipeline: kill -9 at named points, damaged iteration files, a full disk, typo'd params,
Ctrl-C. Each test works on its own copy of the session's reference project (conftest.py) and compares the
model it ends with to the reference run's, bit for bit.

The kill points are deterministic (pipeline/faults.py): KPRUNE_KILL_AT names the point where a stage
SIGKILLs itself, KPRUNE_INTERRUPT_AT where it sends SIGINT to its process group, as Ctrl-C does.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from pipeline_project import SUBLAYERS, digest, dvc, run, servers_of, stages_run, wait_until

import kprune
from pipeline.faults import INTERRUPT_AT_ENV, KILL_AT_ENV

pytestmark = pytest.mark.slow

ITERATIONS = Path("data/prune/iterations")
STEP_FILES = ("knowledge.safetensors", "mask.json", "weight.safetensors")


def forget(project: Path, *outputs: str) -> None:
    """Remove outputs so that `dvc repro` recomputes them (and what depends on them)."""
    for output in outputs:
        path = project / output
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def killed(
    project: Path, point: str, *arguments: str, env: dict | None = None
) -> subprocess.CompletedProcess:
    result = dvc(project, "repro", *arguments, env={KILL_AT_ENV: point, **(env or {})}, check=False)
    assert result.returncode != 0
    assert f"{KILL_AT_ENV}: killed at {point}" in result.stderr  # the kill, not another failure
    return result


def temporaries(project: Path) -> list[Path]:
    return sorted(path for path in (project / "data").rglob(".*.tmp"))


def assert_same_model(project: Path, reference) -> None:
    """The exported folder holds the reference run's model, to the last bit, and nothing half-written."""
    export, expected = project / "data/export", reference.project / "data/export"
    assert sorted(p.name for p in export.iterdir()) == sorted(p.name for p in expected.iterdir())
    assert digest(export / "model.safetensors") == reference.export_weights
    assert digest(export / "config.json") == digest(expected / "config.json")
    assert temporaries(project) == []


def assert_same_iterations(project: Path, reference) -> None:
    for t in range(SUBLAYERS):
        for name in STEP_FILES:
            relative = ITERATIONS / f"{t:02d}" / name
            assert digest(project / relative) == digest(reference.project / relative), relative


# ---------------------------------------------------------------- SIGKILL at named points


def test_sigkill_during_calibrate(reference, workspace):
    """Killed in the middle of writing a sublayer's targets: the next repro reruns calibrate, whose files
    come out identical to the reference run's, so DVC reuses the prune, evaluation and export built on
    them (it compares their hashes) and the exported model is the reference's."""
    forget(workspace, "data/calibration")
    killed(workspace, "write:data/calibration/targets_01.arrow")
    calibration = workspace / "data/calibration"
    assert (calibration / "targets_00.arrow").is_file() and not (calibration / "targets_01.arrow").exists()

    resumed = dvc(workspace, "repro")
    assert stages_run(resumed) == ["calibrate"]
    for path in sorted((reference.project / "data/calibration").iterdir()):
        assert digest(calibration / path.name) == digest(path), path.name
    assert_same_model(workspace, reference)


def terminal_sigint() -> None:
    """SIGINT as at a terminal: a test run in the background inherits it ignored, and so would every
    process under it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_and_sigkills_during_pruning(reference, workspace):
    """One prune stopped three times, each next run resuming where the last stopped: Ctrl-C in
    `python -m pipeline run` while iteration 1 measures knowledge (one line, exit 2), kill -9 while
    iteration 2 tunes its weight (a bare `dvc repro`: the server its stage starts must not outlive it),
    kill -9 while iteration 3 measures knowledge; the last `dvc repro` finishes with the reference run's
    iteration files and exported model, bit for bit."""
    forget(workspace, "data/prune", "data/export")
    iterations = workspace / ITERATIONS
    interrupted = run(
        workspace,
        *(sys.executable, "-m", "pipeline", "run"),
        env={INTERRUPT_AT_ENV: "prune:knowledge:1"},
        check=False,
        start_new_session=True,  # Ctrl-C reaches the whole process group: ours, not pytest's
        preexec_fn=terminal_sigint,
    )
    assert interrupted.returncode == 2, interrupted.stdout + interrupted.stderr
    assert "Traceback" not in interrupted.stderr
    assert interrupted.stderr.splitlines()[-1] == (
        "pipeline: error: interrupted; resume with: python -m pipeline run (or dvc repro)"
    )
    assert sorted(path.parent.name for path in iterations.glob("*/step.json")) == ["00"]

    killed(workspace, "prune:tune:2", "prune", env={"PREFECT_API_URL": None})
    assert wait_until(lambda: not servers_of(workspace), seconds=10)
    assert sorted(path.name for path in (iterations / "02").iterdir()) == [
        "knowledge.safetensors",
        "mask.json",
    ]
    measured = {path: path.stat().st_mtime_ns for path in (iterations / "02").iterdir()}
    second = killed(workspace, "prune:knowledge:3", "prune")
    assert "resuming at iteration 2 of 4" in second.stderr
    assert {path: path.stat().st_mtime_ns for path in measured} == measured  # reused, not redone

    resumed = dvc(workspace, "repro")
    assert stages_run(resumed) == ["prune", "evaluate", "export"]
    assert "resuming at iteration 3 of 4" in resumed.stderr
    assert_same_iterations(workspace, reference)
    assert_same_model(workspace, reference)
    # the stage's MLflow run is written when its loop ends: none left RUNNING by the kills, and the
    # resumed run holds every iteration's figures, the three it resumed from included
    client, runs = stage_runs(workspace, "prune")
    assert "RUNNING" not in [run.info.status for run in runs] and runs[-1].info.status == "FINISHED"
    history = client.get_metric_history(runs[-1].info.run_id, "relative_error_after")
    assert sorted(metric.step for metric in history) == [0, 1, 2, 3]


def test_sigkill_during_the_exports_write_and_during_the_mlflow_write(reference, workspace):
    """Killed with the new folder complete under its temporary name: the previous model is whole and in
    place. Killed while the new folder is logged to MLflow: it is already in place. Each next repro
    finishes with the reference model and no temporary left."""
    killed(workspace, "write:data/export", "--force", "--single-item", "export")
    assert [path.parent for path in temporaries(workspace)] == [workspace / "data"]  # the killed write's
    assert digest(workspace / "data/export/model.safetensors") == reference.export_weights
    kprune.load_pruned(workspace / "data/export")  # whole: the old folder, not a mix

    killed(workspace, "mlflow:pruned-model", "--force", "--single-item", "export")
    assert_same_model(workspace, reference)  # swapped in before it is logged; the leftover is gone
    # the MLflow runs of the export stage: the reference's, the first killed one (marked KILLED when the
    # next export started), the one killed while logging (its process is gone, nobody has looked yet)
    assert export_run_statuses(workspace) == ["FINISHED", "KILLED", "RUNNING"]

    resumed = dvc(workspace, "repro")
    assert stages_run(resumed) == []  # the folder matches dvc.lock: nothing to redo
    assert_same_model(workspace, reference)


def stage_runs(project: Path, stage: str) -> tuple:
    """The MLflow client of the project's store and the runs of ``stage``, oldest first."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("kprune").experiment_id
    query = f"tags.`kprune.stage` = '{stage}'"
    return client, client.search_runs([experiment], query, order_by=["start_time ASC"])


def export_run_statuses(project: Path) -> list[str]:
    return [run.info.status for run in stage_runs(project, "export")[1]]


# ---------------------------------------------------------------- damaged iteration files


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize(
    "damage, file, resumes_at, message",
    [
        (truncate, "01/weight.safetensors", 1, "is unreadable (truncated?)"),
        (truncate, "02/mask.json", 2, "is unreadable (truncated?)"),
        (Path.unlink, "01/knowledge.safetensors", 1, "is missing"),
    ],
    ids=["truncated-weight", "truncated-mask", "deleted-in-the-middle"],
)
def test_a_damaged_iteration_is_recomputed_with_every_later_one(reference, workspace, monkeypatch, damage,
                                                                 file, resumes_at, message):  # fmt: skip
    """The prune stage finds the damage, recomputes from it and writes the reference run's files again;
    the model the export stage builds from them is the reference's exported model."""
    damage(workspace / ITERATIONS / file)
    resumed = dvc(workspace, "repro", "prune")
    assert stages_run(resumed) == ["prune"]
    warnings = [line for line in resumed.stderr.splitlines() if "WARNING pipeline.flows" in line]
    assert any(str(ITERATIONS / file) in line and message in line for line in warnings), warnings
    assert f"resuming at iteration {resumes_at} of {SUBLAYERS}" in resumed.stderr
    if resumes_at < SUBLAYERS - 1:
        assert any("discarding iterations" in line for line in warnings), warnings
    assert_same_iterations(workspace, reference)

    from pipeline.flows import load_teacher, pruned_student
    from pipeline.project import PIPELINE_FOLDERS

    monkeypatch.chdir(workspace)  # the stages' paths are relative to the project
    rebuilt = pruned_student(load_teacher("cpu"), PIPELINE_FOLDERS.iterations).state_dict()
    exported = kprune.load_pruned(reference.project / "data/export").state_dict()
    assert rebuilt.keys() == exported.keys()
    assert all(torch.equal(rebuilt[name], value) for name, value in exported.items())


# ---------------------------------------------------------------- bad params, Ctrl-C, a full disk


def add_param(project: Path, section: str, name: str, value) -> None:
    params_file = project / "params.yaml"
    params = yaml.safe_load(params_file.read_text())
    params[section][name] = value
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))


def outputs_state(project: Path) -> dict[str, int]:
    data = project / "data"
    return {
        str(path.relative_to(data)): path.stat().st_mtime_ns for path in data.rglob("*") if path.is_file()
    }


TYPOS = [("prune", "flops_kep", "flops_keep"), ("evaluate", "latency_batch_size", "latency_batch_sizes")]


@pytest.mark.parametrize("section, key, meant", TYPOS)
def test_an_unknown_params_key_is_rejected_before_any_output_is_touched(workspace, section, key, meant):
    add_param(workspace, section, key, 0.4)
    before = outputs_state(workspace)
    result = run(workspace, sys.executable, "-m", "pipeline", "run", check=False)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [result.stderr.strip()]  # one line
    assert result.stderr.startswith(f"pipeline: error: params.yaml: unknown key {section}.{key}; ")
    assert meant in result.stderr  # among the allowed keys
    assert outputs_state(workspace) == before


def test_an_unknown_params_key_stops_a_bare_dvc_repro_in_the_stage(reference, workspace):
    """A bare `dvc repro` runs the changed stage, which checks its sections before any work: one line."""
    add_param(workspace, "evaluate", "latency_batch_size", 1)
    result = dvc(workspace, "repro", check=False)
    assert result.returncode != 0 and stages_run(result) == ["evaluate"]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("pipeline: error:")]
    assert errors == [
        "pipeline: error: params.yaml: unknown key evaluate.latency_batch_size; the keys of 'evaluate' are "
        "batch_size, latency_batch_sizes, latency_repeats"
    ]
    assert_same_model(workspace, reference)


DISK_FULL_SCRIPT = """
set -e
cp -a data "$SAVED"
size=$(( $(du -sk data | cut -f1) + 1024 ))
mount -t tmpfs -o size=${size}k tmpfs data
cp -a "$SAVED"/. data/
set +e
"$PYTHON" -m dvc repro --force --single-item export > "$OUT/stdout" 2> "$OUT/stderr"
echo $? > "$OUT/returncode"
sha256sum data/export/model.safetensors | cut -d' ' -f1 > "$OUT/weights"
find data -name '.*.tmp' > "$OUT/temporaries"
"""


def test_a_full_disk_is_one_error_and_keeps_the_previous_model(reference, workspace, tmp_path):
    """data/ on a tmpfs with 1 MB free (in a private mount namespace): the export's new folder does not
    fit. The stage ends with one line, and the previous model is whole, with no temporary left behind."""
    out = tmp_path / "out"
    out.mkdir()
    places = {"SAVED": str(tmp_path / "saved"), "OUT": str(out), "PYTHON": sys.executable}
    run(workspace, "unshare", "-rm", "sh", "-c", DISK_FULL_SCRIPT, env=places)
    stderr = (out / "stderr").read_text()
    assert int((out / "returncode").read_text()) != 0
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("pipeline: error:")]
    assert len(errors) == 1 and errors[0].startswith("pipeline: error: stage export: disk full"), stderr
    assert (out / "weights").read_text().strip() == reference.export_weights
    assert (out / "temporaries").read_text() == ""


# ---------------------------------------------------------------- determinism


def test_two_fresh_processes_write_bit_identical_weights(reference, workspace):
    """The prune stage run again from nothing, in a new process, writes every iteration file of the
    reference run's process byte for byte."""
    forget(workspace, "data/prune")
    run(workspace, sys.executable, "-m", "pipeline.stages.prune")
    assert_same_iterations(workspace, reference)
