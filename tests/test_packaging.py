"""Dependencies fit a library: ranges for what kprune/ imports, the pipeline's stack in an extra, the
exact tested versions in constraints.txt (within every declared range)."""

import ast
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
BASE = [Requirement(line) for line in PROJECT["dependencies"]]
EXTRAS = {
    name: [Requirement(line) for line in lines] for name, lines in PROJECT["optional-dependencies"].items()
}


def declared(*extras: str) -> set[str]:
    """Distributions declared by the base requirements and the given extras (self-references expanded)."""
    names, pending = {canonicalize_name(r.name) for r in BASE}, list(extras)
    while pending:
        for requirement in EXTRAS[pending.pop()]:
            if canonicalize_name(requirement.name) == "kprune":
                pending += sorted(requirement.extras)
            else:
                names.add(canonicalize_name(requirement.name))
    return names


def third_party_imports(*sources: str) -> dict[str, set[str]]:
    """Third-party modules the .py files under the ``sources`` (folders or files) import, each with the
    distributions providing it."""
    modules = set()
    for source in map(ROOT.joinpath, sources):
        for path in source.rglob("*.py") if source.is_dir() else [source]:
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    modules |= {alias.name.split(".")[0] for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0:
                    modules.add(node.module.split(".")[0])
    distributions = packages_distributions()
    # bench.repro puts tests/ on its path to build the tests' tiny pipeline project
    local = {"kprune", "pipeline", "bench"} | {path.stem for path in (ROOT / "tests").glob("*.py")}
    return {
        module: {canonicalize_name(name) for name in distributions[module]}
        for module in modules - local - set(sys.stdlib_module_names)
    }


def test_the_library_needs_no_pipeline_stack_and_pins_nothing():
    names = {canonicalize_name(r.name) for r in BASE}
    assert not names & {"prefect", "dvc", "mlflow", "fastapi", "prefect-dask", "distributed"}
    assert all(not any(spec.operator == "==" for spec in r.specifier) for r in BASE)
    assert {"torch", "transformers", "safetensors"} <= names


@pytest.mark.parametrize(
    "sources,extras",
    [
        (("kprune",), ("data", "onnx")),
        (("pipeline",), ("pipeline", "data")),
        (("bench", "tests/pipeline_project.py"), ("bench",)),
    ],
)
def test_every_imported_distribution_is_declared(sources, extras):
    # Two kprune modules import an extra's packages, only when used: kprune.demo the shipped MiniLM of
    # "data", kprune.onnx_export the onnx packages of "onnx" (export-onnx names the extra if missing).
    names = declared(*extras)
    undeclared = [
        module for module, providers in third_party_imports(*sources).items() if not providers & names
    ]
    assert undeclared == []


def test_constraints_pin_every_declared_distribution_within_its_range():
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            requirement = Requirement(line)
            (spec,) = requirement.specifier
            assert spec.operator == "==", line
            pins[canonicalize_name(requirement.name)] = spec.version
    for requirement in BASE + [r for lines in EXTRAS.values() for r in lines]:
        name = canonicalize_name(requirement.name)
        if name != "kprune":
            assert name in pins, f"{name} has no tested version in constraints.txt"
            assert requirement.specifier.contains(pins[name], prereleases=True), (requirement, pins[name])
