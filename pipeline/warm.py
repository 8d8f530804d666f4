"""One warm interpreter per `dvc repro`: every stage forks from it instead of importing its libraries anew.

A stage started by DVC is a new Python process, and most of what it spends outside its own work is the
import of torch, transformers, datasets, Prefect and MLflow (5-8 s on 2 cores, bench.repro). Under
`dvc repro` (DVC sets DVC_STAGE; `make run` runs one too), the first stage starts a warm process owned by
the dvc process, as the shared Prefect server is (pipeline.prefect_api), and runs in its own process
meanwhile; the warm process imports those libraries once, starts the run's Prefect server and waits on
a Unix socket. Each later stage command hands it its standard streams, working directory,
environment and arguments; the warm process forks, the fork runs the stage module as `python -m` would,
and the stage command exits with the fork's status, or is ended by the signal that ended it. A Ctrl-C or
a kill of the stage command reaches the fork; the warm process ends with the dvc process.

The forks import the project's own modules (pipeline, kprune) afresh, so an edit between two stages is
seen; only third-party libraries come warm. A stage whose environment differs from the warm process's
(other than DVC's own variables) runs in its own process, as it does without DVC, without /proc or
pidfds (not Linux), or with KPRUNE_WARM=0.

    python -m pipeline.warm --owner PID --owner-start T PROJECT
        is the warm process (``hand_over()`` starts it; PROJECT only names it in `ps`)
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import runpy
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

from pipeline.faults import kill_point
from pipeline.prefect_api import (
    OWNER_ENV,
    alive,
    dvc_process,
    recorded_helper,
    records_locked,
    shared_server,
    spawn_owned,
)
from pipeline.project import quiet_environment

SWITCH_ENV = "KPRUNE_WARM"  # "0": every stage in a process of its own
CHILD_ENV = "KPRUNE_WARM_CHILD"  # in a fork: the pid of the stage command it runs for
WARM_MODULE = "pipeline.warm"
STARTUP_TIMEOUT_SECONDS = 120
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)  # Ctrl-C, kill: the command's to its fork
# Imported by the warm process: every stage module and what they import on the way (torch, transformers,
# datasets, Prefect, MLflow); the project's own modules are then dropped so that each fork reads them anew.
PRELOAD = (
    "pipeline.flows",
    "pipeline.stages.prepare",
    "pipeline.stages.teacher",
    "pipeline.stages.calibrate",
    "pipeline.stages.prune",
    "pipeline.stages.evaluate",
    "pipeline.stages.export",
    "mlflow.store.tracking.sqlalchemy_store",
)
PROJECT_PACKAGES = ("pipeline", "kprune")

logger = logging.getLogger("pipeline.warm")


def _address(owner: tuple[int, int]) -> str:
    """An abstract Unix socket (Linux): no file to clean up, no path-length limit."""
    return f"\0kprune-warm-{os.getuid()}-{owner[0]}-{owner[1]}"


def _comparable(environment: dict[str, str]) -> dict[str, str]:
    """What a stage's environment must share with the warm process's (DVC's own variables vary)."""
    return {name: value for name, value in environment.items() if not name.startswith("DVC_")}


# ---------------------------------------------------------------- the stage command's side


def hand_over(module: str) -> None:
    """Run stage ``module`` in a fork of this dvc repro's warm process and exit with its status; return
    (and let the caller run it here) when there is no dvc repro, no warm process can be had, or this is
    already a fork."""
    if os.environ.get(SWITCH_ENV) == "0" or os.environ.get(CHILD_ENV) or not hasattr(os, "pidfd_open"):
        return
    owner = dvc_process()
    if owner is None:
        return
    quiet_environment()  # the warm process is started with, and compares against, the quiet settings
    connection = _connect(owner)
    if connection is None:
        return
    child, pending = None, []

    def forward(number: int, _frame) -> None:  # to the fork, as soon as its pid is known
        if child is None:
            pending.append(number)
        else:
            _signal(child, number)

    with connection:
        request = {
            "module": module,
            "argv": sys.argv,
            "executable": sys.executable,
            "cwd": os.getcwd(),
            "env": dict(os.environ),
        }
        payload = json.dumps(request).encode()
        previous = {number: signal.signal(number, forward) for number in FORWARDED_SIGNALS}
        socket.send_fds(connection, [struct.pack("!I", len(payload)) + payload], [0, 1, 2])
        kill_point("warm:handed-over")
        reader = connection.makefile("r")
        reply = json.loads(reader.readline() or '{"refused": "it ended"}')
        if "refused" in reply:  # nothing has run: the stage runs here, unless a signal came meanwhile
            for number, handler in previous.items():
                signal.signal(number, handler)
            if pending:
                signal.signal(pending[0], signal.SIG_DFL)
                os.kill(os.getpid(), pending[0])
            logger.info("warm process not used: %s", reply["refused"])
            return
        child = reply["pid"]
        for number in pending:
            _signal(child, number)
        status = json.loads(reader.readline() or '{"status": null}')["status"]
    if status is None:
        print("pipeline: error: the warm process ended before its stage did", file=sys.stderr, flush=True)
        raise SystemExit(1)
    if os.WIFSIGNALED(status):  # end the way the fork ended, so dvc reports the same
        number = os.WTERMSIG(status)
        signal.signal(number, signal.SIG_DFL)
        os.kill(os.getpid(), number)
    raise SystemExit(os.waitstatus_to_exitcode(status))


def _signal(pid: int, number: int) -> None:
    try:
        os.kill(pid, number)
    except ProcessLookupError:
        pass


def _connect(owner: tuple[int, int]) -> socket.socket | None:
    """A connection to the warm process of dvc process ``owner``; None when it has none yet (it is then
    started, and this stage runs in its own process meanwhile) or it ended before taking connections."""
    with records_locked("warm") as folder:  # one start among concurrent stages
        connection = _try_connect(owner)
        if connection is not None:
            return connection
        known, started = recorded_helper(folder, owner, functools.partial(_spawn_warm, owner))
        if started is not None:
            return None
    deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS  # it is starting: a few seconds
    while time.monotonic() < deadline and alive(known["pid"], known["start"]):
        connection = _try_connect(owner)
        if connection is not None:
            return connection
        time.sleep(0.05)
    logger.warning("the warm process ended before taking stages (see %s)", folder.parent / "warm.log")
    return None


def _spawn_warm(owner: tuple[int, int], _record: Path) -> tuple[subprocess.Popen, dict]:
    return spawn_owned(WARM_MODULE, owner, [], Path.cwd(), "warm.log"), {}


def _try_connect(owner: tuple[int, int]) -> socket.socket | None:
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        connection.connect(_address(owner))
    except OSError:
        connection.close()
        return None
    return connection


# ---------------------------------------------------------------- the warm process


def serve(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog=f"python -m {WARM_MODULE}", description="A warm interpreter that forks a process per stage."
    )
    parser.add_argument("--owner", type=int, required=True, help="the dvc process whose end ends this one")
    parser.add_argument("--owner-start", type=int, required=True, help="its start time (/proc stat)")
    parser.add_argument("project", help="names the project in `ps`")
    args = parser.parse_args(argv)
    owner = (args.owner, args.owner_start)
    owner_exit = os.pidfd_open(owner[0])
    if not alive(*owner):
        return
    # what a stage must share with this process to run in a fork of it; taken before imports add to it
    startup = {"executable": sys.executable, "cwd": os.getcwd(), "env": _comparable(dict(os.environ))}
    from kprune.memory import configure_cpu_memory

    configure_cpu_memory()  # before torch's first allocation, as a stage does it
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    for name in PRELOAD:
        __import__(name)
    # Prefect's import gives the root logger its console handler when the root has none; a stage sets
    # the root's up before it imports Prefect (then Prefect leaves it alone), so the forks get it bare.
    root.handlers[:] = handlers
    root.setLevel(level)
    for name in [name for name in sys.modules if name.split(".")[0] in PROJECT_PACKAGES]:
        del sys.modules[name]
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(_address(owner))
    listener.listen()
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the supervisors are reaped by the kernel
    if not os.environ.get("PREFECT_API_URL"):  # up by the time the first flow stage asks for it
        shared_server(Path.cwd(), owner)
    while True:
        ready, _, _ = select.select([listener, owner_exit], [], [])
        if owner_exit in ready:
            os._exit(0)  # the dvc run is over; a stage still running is ended by its own command's end
        connection, _ = listener.accept()
        if os.fork() == 0:
            listener.close()
            os.close(owner_exit)
            module = _supervise(connection, owner, startup)  # returns only in the stage's fork
            run_stage_module(module)
            return
        connection.close()


def _receive(connection: socket.socket) -> tuple[dict, list[int]]:
    header, fds, _, _ = socket.recv_fds(connection, 4, 3)
    (length,) = struct.unpack("!I", header)
    payload = b""
    while len(payload) < length:
        chunk = connection.recv(length - len(payload))
        if not chunk:
            raise ConnectionError("the stage command went away")
        payload += chunk
    return json.loads(payload), fds


def _refusal(request: dict, startup: dict) -> str | None:
    """Why the warm process cannot run this stage as its own process would, if it cannot."""
    if request["executable"] != startup["executable"]:
        return f"the stage runs {request['executable']}, the warm process {startup['executable']}"
    if request["cwd"] != startup["cwd"]:
        return f"the stage runs in {request['cwd']}, the warm process in {startup['cwd']}"
    environment = _comparable(request["env"])
    differing = sorted({*environment.items()} ^ {*startup["env"].items()})
    return f"the environment differs in {differing[0][0]}" if differing else None


def _send(connection: socket.socket, message: dict) -> None:
    connection.sendall((json.dumps(message) + "\n").encode())


def _supervise(connection: socket.socket, owner: tuple[int, int], startup: dict) -> str:
    """In a fork of the warm process: fork the stage, tell the stage command its pid and, once it ends,
    its wait status. Returns only in the stage's own fork, set up to run it: the stage's module."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    request, fds = _receive(connection)
    client, user = _peer(connection)
    refusal = "another user's stage" if user != os.getuid() else _refusal(request, startup)
    if refusal:
        _send(connection, {"refused": refusal})
        os._exit(0)
    stage = os.fork()
    if stage == 0:
        _become_stage(request, fds, client, owner)
        connection.close()
        return request["module"]
    for fd in fds:
        os.close(fd)
    _send(connection, {"pid": stage})
    print(f"{time.strftime('%H:%M:%S')} {request['module']}: forked as {stage} for {client}", flush=True)
    _, status = os.waitpid(stage, 0)
    try:
        _send(connection, {"status": status})
    except OSError:  # the stage command is gone
        pass
    os._exit(0)


def _peer(connection: socket.socket) -> tuple[int, int]:
    """The pid and user id of the process at the other end."""
    pid, user, _ = struct.unpack("3i", connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    return pid, user


def _become_stage(request: dict, fds: list[int], client: int, owner: tuple[int, int]) -> None:
    """Take the stage command's streams, directory, environment and arguments, and end with it."""
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    # The stage command's environment is the warm process's at its start (_refusal checks it) but DVC's
    # own variables; what the warm process's imports added stays, as it would in the stage's own process.
    for name in [name for name in os.environ if name.startswith("DVC_")]:
        del os.environ[name]
    stage_dvc = {name: value for name, value in request["env"].items() if name.startswith("DVC_")}
    os.environ.update(stage_dvc, **{CHILD_ENV: str(client), OWNER_ENV: f"{owner[0]}:{owner[1]}"})
    sys.argv = request["argv"]
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.stdout.reconfigure(line_buffering=sys.stdout.isatty())
    watch = os.pidfd_open(client)
    threading.Thread(target=_end_with, args=(watch,), daemon=True, name="warm-client-watch").start()


def stage_command_pid() -> int:
    """The stage command's pid: this process's, or, in a fork, that of the command it runs for."""
    return int(os.environ.get(CHILD_ENV) or os.getpid())


def _end_with(watch: int) -> None:
    """Kill this stage when its command ends (killed, say): nobody would read its output or status."""
    select.select([watch], [], [])
    os.kill(os.getpid(), signal.SIGKILL)


def run_stage_module(module: str) -> None:
    """Run ``module`` as `python -m` would, in a stage's fork."""
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit:
        raise
    except BaseException:
        traceback.print_exc()
        raise SystemExit(1) from None


if __name__ == "__main__":
    serve()
