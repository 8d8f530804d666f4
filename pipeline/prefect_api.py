"""A Prefect API for the stages: the server named in PREFECT_API_URL, else a local one of our own.

Prefect's own temporary server outlives a stage that is killed (kill -9 leaves it running, busy, and
holding the stage's output pipes). Ours is started with the parent-death signal set, so it ends with
the process that started it, however that process ends. `python -m pipeline run` starts one for the
whole `dvc repro`, so its stages skip the 10-20 s start-up.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from pipeline.project import quiet_environment

STARTUP_TIMEOUT_SECONDS = 180
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGKILL it when the parent dies (Linux; elsewhere a no-op)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


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


@contextlib.contextmanager
def prefect_api(root: Path | None = None) -> Iterator[str]:
    """PREFECT_API_URL for the block: the user's, or a loopback server that dies with this process."""
    quiet_environment(root)  # the server inherits the settings: no telemetry, state in .prefect/
    if os.environ.get("PREFECT_API_URL"):
        yield os.environ["PREFECT_API_URL"]
        return
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    command = [
        sys.executable, "-m", "uvicorn", "--factory", "prefect.server.api.server:create_app",
        "--host", "127.0.0.1", "--port", str(port), "--log-level", "error",
        "--app-dir", str((root or Path.cwd()).resolve()),  # names the project in `ps`
    ]  # fmt: skip
    server = subprocess.Popen(
        command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, preexec_fn=_die_with_parent
    )
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
        while not _healthy(url):
            if server.poll() is not None:
                raise RuntimeError(f"the local Prefect server exited with code {server.returncode}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the local Prefect server did not start in {STARTUP_TIMEOUT_SECONDS} s")
            time.sleep(0.5)
        os.environ["PREFECT_API_URL"] = url
        yield url
    finally:
        os.environ.pop("PREFECT_API_URL", None)
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
