"""A Prefect API for the stages: PREFECT_API_URL's server, else a local one that ends with its owner.

Prefect 3.8.8 runs no flow or task without an API server: with no PREFECT_API_URL it starts a temporary
server of its own in each process (seconds of start-up per stage, and a `kill -9` leaves it running,
busy, and holding the stage's output pipes), or, with PREFECT_SERVER_EPHEMERAL_ENABLED=false, raises.
So the stages never leave it to Prefect; ``prefect_api()`` picks, in this order:

- PREFECT_API_URL when it is set: a server of the user's (`prefect server start`), or the one that
  `python -m pipeline run` (`make run`) starts for its whole `dvc repro`;
- under a bare `dvc repro` (DVC sets DVC_STAGE for every stage command): one local server for all the
  stages of that dvc process. The run's warm process (pipeline.warm) starts it once its imports are done,
  while the first stages work, or else the first stage that needs it; its address is recorded in
  $PREFECT_HOME/servers/; the later stages of the run find it there and reuse it at no cost. Its owner
  is the dvc process, not the stage: the server watches it (a Linux pidfd) and exits as soon as dvc
  ends, however it ends, after a failed or killed stage too;
- otherwise (`python -m pipeline run` itself, a stage run by hand, a test): a local server owned by this
  process, stopped at the end of the block, and ended by the same watch if the process dies first.
  Without /proc (not Linux) every stage is in this case.

A stage imports its flows (torch, Prefect) while the server starts, so the first flow stage of a run
waits only for what is left of the start-up (0-4 s here; about 9 s once, when $PREFECT_HOME/prefect.db
is created). The server writes to $PREFECT_HOME/server.log, never into a stage's output. Before an owned
server is stopped, Prefect's log and event workers are drained: a batch of logs still queued when the
server went away was retried for about a minute at the stage's exit and then printed as "--- Error
logging to API --- All connection attempts failed". A shared server outlives its stages, so their
exit-time flush always reaches it. Flow runs are kept in $PREFECT_HOME/prefect.db: the UI of a running
server shows them, and so does a later `prefect server start` with the same PREFECT_HOME.

    python -m pipeline.prefect_api --port P --owner PID --owner-start T [--record FILE] PROJECT
        is the server (``prefect_api()`` starts it; PROJECT only names it in `ps`)
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import importlib
import json
import logging
import os
import select
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

from pipeline.project import quiet_environment

STARTUP_TIMEOUT_SECONDS = 180
SERVER_MODULE = "pipeline.prefect_api"  # in the server's command line: `ps`, and tests, find it by it
DVC_STAGE_ENV = "DVC_STAGE"  # set by DVC for every stage command
OWNER_ENV = "KPRUNE_DVC_OWNER"  # "pid:start" of the dvc process, in a stage forked by pipeline.warm

logger = logging.getLogger("pipeline.prefect_api")


# ---------------------------------------------------------------- processes (Linux /proc)


def _stat(pid: int) -> list[str] | None:
    """Fields 3 on of /proc/PID/stat (state, parent, ...), or None if there is no such process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()  # the name may hold ")"
    except OSError:
        return None


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (with the pid, its identity), or None."""
    stat = _stat(pid)
    return int(stat[19]) if stat else None


def _parent(pid: int) -> int:
    stat = _stat(pid)
    if stat is None:
        raise ProcessLookupError(pid)
    return int(stat[1])


def _environment_of(pid: int) -> dict[str, str]:
    entries = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(entry.decode(errors="replace").partition("=")[::2] for entry in entries if entry)


def dvc_process() -> tuple[int, int] | None:
    """(pid, start time) of the dvc process running this stage, or None when none does (or no /proc).

    DVC runs a stage as `$SHELL -c <cmd>` with DVC_STAGE=<stage> in its environment; the first ancestor
    whose own environment lacks that value is dvc (a shell between the two inherits it).
    """
    stage = os.environ.get(DVC_STAGE_ENV)
    if not stage or not Path("/proc/self/stat").is_file():
        return None
    if OWNER_ENV in os.environ:  # a fork of the warm process, which is not dvc's descendant
        pid, _, started = os.environ[OWNER_ENV].partition(":")
        return int(pid), int(started)
    try:
        pid = os.getppid()
        while pid > 1:
            if _environment_of(pid).get(DVC_STAGE_ENV) != stage:
                started = start_time(pid)
                return (pid, started) if started is not None else None
            pid = _parent(pid)
    except OSError:
        return None
    return None


def alive(pid: int, started: int) -> bool:
    """Whether process ``pid`` started at ``started`` runs (without /proc: whether ``pid`` runs)."""
    if Path("/proc/self/stat").is_file():
        stat = _stat(pid)  # an exited process not yet reaped (state Z or X) counts as ended
        return stat is not None and stat[0] not in "ZX" and int(stat[19]) == started
    try:  # a reused pid would keep a server up: rare, and harmless
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---------------------------------------------------------------- the server


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def _home() -> Path:
    return Path(os.environ["PREFECT_HOME"])  # quiet_environment() sets it


def spawn_owned(
    module: str, owner: tuple[int, int], arguments: list[str], root: Path, log_name: str, env=None
) -> subprocess.Popen:
    """Start `python -m MODULE ARGUMENTS --owner PID --owner-start T ROOT`, a helper process that ends with
    ``owner``, its output appended to $PREFECT_HOME/LOG_NAME (the Prefect server, pipeline.warm)."""
    command = [
        sys.executable, "-m", module, *arguments,
        "--owner", str(owner[0]), "--owner-start", str(owner[1]), str(root.resolve()),
    ]  # fmt: skip
    _home().mkdir(parents=True, exist_ok=True)
    with open(_home() / log_name, "ab") as log:
        return subprocess.Popen(
            command,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,  # a Ctrl-C reaches the stages; the helper ends with its owner
        )


def _spawn(root: Path, owner: tuple[int, int], record: Path | None = None) -> tuple[subprocess.Popen, str]:
    """Start a server that exits when ``owner`` does; returns it and its API URL (not yet serving)."""
    port = _free_port()
    arguments = ["--port", str(port), *(["--record", str(record)] if record else [])]
    url = f"http://127.0.0.1:{port}/api"
    env = dict(os.environ, PREFECT_API_URL=url)  # the UI it serves calls this address
    return spawn_owned(SERVER_MODULE, owner, arguments, root, "server.log", env), url


def _wait_until_healthy(url: str, running: Callable[[], bool]) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
    while not _healthy(url):
        if not running():
            raise RuntimeError(f"the local Prefect server exited; see {_home() / 'server.log'}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"the local Prefect server did not start in {STARTUP_TIMEOUT_SECONDS} s")
        time.sleep(0.2)


@contextlib.contextmanager
def records_locked(kind: str = "servers") -> Iterator[Path]:
    """$PREFECT_HOME/KIND/, where each dvc run's helper process of that kind is recorded as
    OWNER-START.json, locked against a concurrent stage; records of ended dvc runs removed."""
    folder = _home() / kind
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for record in folder.glob("*.json"):
            owner, _, started = record.stem.partition("-")
            if not alive(int(owner), int(started)):
                record.unlink(missing_ok=True)
        yield folder


def recorded_helper(
    folder: Path, owner: tuple[int, int], spawn: Callable[[Path], tuple[subprocess.Popen, dict]]
) -> tuple[dict, subprocess.Popen | None]:
    """In a ``records_locked`` folder: the record ({"pid", "start", ...}) of dvc process ``owner``'s helper
    while that helper lives, with None; else the helper ``spawn(record_path)`` starts (its process and
    the record's other fields), recorded, with its process."""
    record = folder / f"{owner[0]}-{owner[1]}.json"
    known = json.loads(record.read_text()) if record.is_file() else None
    if known is not None and alive(known["pid"], known["start"]):
        return known, None
    process, fields = spawn(record)
    known = {**fields, "pid": process.pid, "start": start_time(process.pid)}
    record.write_text(json.dumps(known))
    return known, process


def shared_server(root: Path, owner: tuple[int, int]) -> tuple[str, Callable[[], bool], bool]:
    """URL of the server of dvc process ``owner``, started if it has none; whether it runs; new?"""

    def spawn(record: Path) -> tuple[subprocess.Popen, dict]:
        server, url = _spawn(root, owner, record)
        return server, {"url": url}

    with records_locked() as folder:
        known, server = recorded_helper(folder, owner, spawn)
    if server is None:
        return known["url"], lambda: alive(known["pid"], known["start"]), False
    # not reaped by this stage: once it exits it is reparented and reaped by init (or a subreaper)
    return known["url"], lambda: server.poll() is None, True


def _drain_prefect() -> None:
    """Send the logs and events Prefect still holds while the server is there to take them."""
    if "prefect" not in sys.modules:
        return
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=10)
    EventsWorker.drain_all(timeout=10)


@contextlib.contextmanager
def prefect_api(root: Path | None = None, preload: str | None = None) -> Iterator[str]:
    """PREFECT_API_URL for the block: the user's, this dvc repro's shared server, or one of our own.

    ``preload`` names a module imported while a server starts (a stage's flows: torch and Prefect, a few
    seconds); PREFECT_API_URL is set by then, so the Prefect it imports reads the right address.
    """
    quiet_environment(root)  # the server inherits the settings: no telemetry, state in .prefect/
    root = root or Path.cwd()
    if os.environ.get("PREFECT_API_URL"):
        if preload:
            importlib.import_module(preload)
        yield os.environ["PREFECT_API_URL"]
        return
    started = time.monotonic()
    owner = dvc_process()
    server = None
    if owner:
        url, running, new = shared_server(root, owner)
    else:
        server, url = _spawn(root, (os.getpid(), start_time(os.getpid()) or 0))
        running, new = (lambda: server.poll() is None), True
    os.environ["PREFECT_API_URL"] = url
    if "prefect.context" in sys.modules:  # imported before the address was known (pipeline.warm)
        sys.modules["prefect.context"].refresh_global_settings_context()
    try:
        spent = time.monotonic() - started
        if preload:
            importlib.import_module(preload)
        waiting = time.monotonic()
        _wait_until_healthy(url, running)
        spent += time.monotonic() - waiting
        logger.info(
            "Prefect API %s: %s local server, %s; %.1f s spent on it",
            url,
            "this dvc repro's" if owner else "this process's",
            "started" if new else "reused",
            spent,
        )
        yield url
    finally:
        os.environ.pop("PREFECT_API_URL", None)
        if server is not None:
            _drain_prefect()
            server.terminate()
            try:
                server.wait(timeout=15)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


# ---------------------------------------------------------------- the server process


def _exit_with(owner: int, owner_start: int, record: Path | None) -> None:
    """Block until the owner ends, then end this process at once (no graceful shutdown to wait for)."""
    try:
        handle = os.pidfd_open(owner)
    except (AttributeError, OSError):  # no pidfd (not Linux), or the owner is already gone
        handle = None
    if handle is not None and alive(owner, owner_start):  # the pid is still the owner's
        select.select([handle], [], [])  # readable once the process has exited
    while alive(owner, owner_start):
        time.sleep(0.5)
    if record is not None:
        record.unlink(missing_ok=True)
    os._exit(0)


def serve(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog=f"python -m {SERVER_MODULE}", description="A local Prefect server that ends with its owner."
    )
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--owner", type=int, required=True, help="the process whose end ends the server")
    parser.add_argument("--owner-start", type=int, required=True, help="its start time (/proc stat)")
    parser.add_argument("--record", type=Path, help="the file naming this server, removed on exit")
    parser.add_argument("project", help="names the project in `ps`")
    args = parser.parse_args(argv)
    watch = threading.Thread(target=_exit_with, args=(args.owner, args.owner_start, args.record), daemon=True)
    watch.start()
    import uvicorn

    uvicorn.run(
        "prefect.server.api.server:create_app",
        factory=True,
        host="127.0.0.1",
        port=args.port,
        log_level="error",
        lifespan="on",
    )


if __name__ == "__main__":
    serve()
