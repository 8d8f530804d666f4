"""Fixtures shared by the pipeline test modules: one Prefect server and one uninterrupted reference run of
the tiny pipeline project for the whole session (for each pytest-xdist worker that needs them); each test
that changes a project works on its own copy."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from pipeline_project import SUBLAYERS, Reference, commit, make_project, run, set_param, tiny_base_model


def pytest_configure(config):
    """Under pytest-xdist (`make test` runs two workers): one torch thread per worker and per process it
    starts, so that two workers on two cores do not slow each other down with spinning OpenMP threads,
    and a Prefect home (its SQLite database) per worker, so that their servers never share one."""
    if worker := os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)
        home = os.environ.get("PREFECT_HOME") or os.path.expanduser("~/.prefect")  # Prefect's own default
        os.environ["PREFECT_HOME"] = os.path.join(home, worker)


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory) -> Iterator[str]:
    """One Prefect server for the session (as `python -m pipeline run` has one for a whole dvc repro); it
    sets PREFECT_API_URL, which the stages inherit."""
    from pipeline.prefect_api import prefect_api

    with prefect_api(tmp_path_factory.mktemp("prefect")) as url:
        yield url


@pytest.fixture(scope="session")
def reference(tmp_path_factory, prefect_server) -> Reference:
    """The tiny project after one uninterrupted `python -m pipeline run`. Read it, never change it: copy it
    with the ``workspace`` fixture."""
    project = make_project(tmp_path_factory.mktemp("reference") / "project")
    base = tiny_base_model(tmp_path_factory.mktemp("base"), layers=SUBLAYERS // 2)
    set_param(project, "teacher", "base", str(base))
    set_param(project, "teacher", "epochs", 0.05)
    set_param(project, "data", "sample_tokens", 2000)
    set_param(project, "evaluate", "latency_repeats", 2)
    commit(project)
    return Reference(project, run(project, sys.executable, "-m", "pipeline", "run"))


@pytest.fixture
def workspace(reference, tmp_path) -> Path:
    """A copy of the reference project (git, DVC cache, MLflow store and outputs) that a test may change."""
    copy = tmp_path / "project"
    shutil.copytree(reference.project, copy, symlinks=True, ignore=shutil.ignore_patterns(".prefect"))
    return copy
