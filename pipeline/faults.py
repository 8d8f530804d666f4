"""Crash tests made deterministic: a stage kills itself at a named point, chosen by an environment variable.

KPRUNE_KILL_AT=NAME makes the process that reaches the point NAME SIGKILL itself there (no cleanup, no
finally blocks: the same as kill -9 or a power cut), after one stderr line naming the point, so that a test
tells this kill from any other death (the exit status a caller sees depends on its shell);
KPRUNE_INTERRUPT_AT=NAME sends SIGINT to its whole process group instead (a stage forked by pipeline.warm:
its stage command's), as Ctrl-C at a terminal does.
The points:

    write:PATH              the file or folder PATH (as the stage names it, e.g. data/export) is complete
                            under its temporary name, not yet renamed into place
    prune:knowledge:T       iteration T's knowledge is measured, not yet written
    prune:tune:T            iteration T's output projection is solved, not yet written
    prune:finished:T        iteration T's step record is written
    mlflow:ARTIFACT_PATH    half of a folder's files are logged to MLflow (e.g. mlflow:pruned-model)
    warm:handed-over        a stage command has handed its stage to the warm process, whose fork's pid it
                            does not know yet (pipeline.warm)
"""

from __future__ import annotations

import os
import signal
import sys

KILL_AT_ENV = "KPRUNE_KILL_AT"
INTERRUPT_AT_ENV = "KPRUNE_INTERRUPT_AT"


def kill_point(name: str) -> None:
    if os.environ.get(KILL_AT_ENV) == name:
        print(f"{KILL_AT_ENV}: killed at {name}", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    if os.environ.get(INTERRUPT_AT_ENV) == name:  # the group a Ctrl-C at the stage's terminal reaches
        from pipeline.warm import stage_command_pid

        os.killpg(os.getpgid(stage_command_pid()), signal.SIGINT)
