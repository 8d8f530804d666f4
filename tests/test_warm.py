"""pipeline.warm: a stage command under dvc runs in a fork of the run's warm process, as in its own process.

A stand-in for dvc (a process without DVC_STAGE running stage commands with it) runs a probe stage that
the test adds to a copy of the project: it reports where it runs and then exits, fails, signals itself
or sleeps. The real pipeline's stages go through the same path in test_pipeline.py and
test_pipeline_faults.py (every `dvc repro` there forks its stages from a warm process).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from pipeline_project import environment, make_project

pytestmark = pytest.mark.slow

PROBE = """
import json, os, signal, sys, time
from pathlib import Path

import pipeline.project  # imported by the warm process too, before the test edits it

VERSION = getattr(pipeline.project, "PROBE_VERSION", 1)
parent = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().replace(b"\\0", b" ").decode()
print(json.dumps({"version": VERSION, "pid": os.getpid(), "parent": parent, "argv": sys.argv[1:],
                  "cwd": os.getcwd(), "stage": os.environ.get("DVC_STAGE")}), flush=True)
print("to stderr", file=sys.stderr, flush=True)
action = sys.argv[1]
if action == "fail":
    raise SystemExit(3)
if action == "raise":
    raise ValueError("the probe's error")
if action == "terminate":
    os.kill(os.getpid(), signal.SIGTERM)
if action == "sleep":
    time.sleep(120)
"""

# The stand-in for dvc: runs `python -m pipeline.stages.probe ACTION` with DVC_STAGE set, once per action
# ("edit" adds PROBE_VERSION = 2 to the project's pipeline/project.py; "kill" starts a sleeping probe,
# SIGKILLs its command and reports whether the probe's own process ended too; "interrupt" starts a sleeping
# probe and interrupts it as Ctrl-C would, the moment its command has handed it to the warm process).
STAND_IN = """
import json, os, signal, subprocess, sys, time
from pathlib import Path

actions = json.loads(sys.argv[1])
command = [sys.executable, "-m", "pipeline.stages.probe"]
env = dict(os.environ, DVC_STAGE="probe")
results = []
for action in actions:
    if action == "edit":
        with open("pipeline/project.py", "a") as module:
            module.write("\\nPROBE_VERSION = 2\\n")
        continue
    if action == "kill":
        stage = subprocess.Popen([*command, "sleep"], env=env, stdout=subprocess.PIPE, text=True)
        pid = json.loads(stage.stdout.readline())["pid"]
        stage.kill()
        stage.wait()
        deadline = time.monotonic() + 10
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        results.append({"fork_ended": not Path(f"/proc/{pid}").exists(), "fork": pid})
        continue
    if action == "interrupt":  # Ctrl-C before the command learns its fork's pid (its own process group)
        interrupt = dict(env, KPRUNE_INTERRUPT_AT="warm:handed-over")
        done = subprocess.run([*command, "sleep"], env=interrupt, capture_output=True, text=True,
                              start_new_session=True, timeout=60)
    else:
        done = subprocess.run([*command, action], env=env, capture_output=True, text=True)
    results.append({"code": done.returncode, "stdout": done.stdout, "stderr": done.stderr})
print(json.dumps(results))
"""


def run_stand_in(project: Path, actions: list[str], env: dict | None = None) -> list[dict]:
    (project / "pipeline" / "stages" / "probe.py").write_text(PROBE)
    env = {
        "PREFECT_HOME": str(project / ".prefect"),
        "PREFECT_API_URL": "http://127.0.0.1:9/api",  # the probe needs no Prefect server: none started
        "DVC_STAGE": None,
        **(env or {}),
    }
    done = subprocess.run(
        [sys.executable, "-c", STAND_IN, json.dumps(actions)],
        cwd=project,
        env=environment(env),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    return make_project(tmp_path_factory.mktemp("warm") / "project")


def report(result: dict) -> dict:
    return json.loads(result["stdout"].splitlines()[0])


def test_a_stage_runs_in_a_fork_with_its_command_s_streams_arguments_status_and_signal(project):
    """The first stage starts the warm process and runs in its own meanwhile; the next ones fork."""
    actions = ["ok", "ok", "fail", "raise", "terminate", "edit", "ok", "kill", "interrupt"]
    starter, ok, fail, error, terminated, edited, killed, interrupted = run_stand_in(project, actions)
    assert starter["code"] == 0 and "-m pipeline.warm" not in report(starter)["parent"]  # meanwhile
    first = report(ok)
    assert "-m pipeline.warm" in first["parent"]  # forked by the warm process's supervisor
    assert first["argv"] == ["ok"] and first["cwd"] == str(project) and first["stage"] == "probe"
    assert ok["code"] == 0 and ok["stderr"] == "to stderr\n"
    assert fail["code"] == 3
    assert error["code"] == 1 and error["stderr"].rstrip().endswith("ValueError: the probe's error")
    assert terminated["code"] == -15  # the command ends by the signal that ended its stage
    # a stage reads the project's code as it is when the stage starts, not as the warm process imported it
    assert first["version"] == 1 and report(edited)["version"] == 2
    assert len({report(result)["parent"] for result in (ok, fail, edited)}) == 1  # one warm process
    assert killed["fork_ended"], f"the stage {killed['fork']} outlived its killed command"
    # a Ctrl-C that comes before the command knows its fork's pid reaches the fork all the same (which
    # ends by it, or by its KeyboardInterrupt once the probe runs), and the command prints no traceback
    assert interrupted["code"] in (-2, 1), interrupted
    assert "hand_over" not in interrupted["stderr"], interrupted["stderr"]


def test_without_dvc_or_when_switched_off_a_stage_runs_in_its_own_process(project):
    (switched_off,) = run_stand_in(project, ["ok"], env={"KPRUNE_WARM": "0"})
    assert "-m pipeline.warm" not in report(switched_off)["parent"]
    alone = subprocess.run(
        [sys.executable, "-m", "pipeline.stages.probe", "ok"],
        cwd=project,
        env=environment({"DVC_STAGE": None}),
        capture_output=True,
        text=True,
    )
    assert alone.returncode == 0 and "-m pipeline.warm" not in report({"stdout": alone.stdout})["parent"]
