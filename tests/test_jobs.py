"""The jobs file of `kprune batch` (pipeline.jobs) and the batch's selection (pipeline.summary.select)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.jobs import JobsFileError, parse_jobs
from pipeline.summary import select

ROOT = Path(__file__).resolve().parents[1]
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())


def jobs_of(text: str):
    return parse_jobs(text, PARAMS, source="jobs.yaml")


def error_of(text: str) -> str:
    with pytest.raises(JobsFileError) as caught:
        jobs_of(text)
    return str(caught.value)


def test_a_one_job_file_is_the_pipeline_of_params_yaml():
    (job,) = jobs_of("jobs: [{}]").jobs
    assert job.method == "kprune"
    assert job.budgets == (PARAMS["prune"]["flops_keep"],)
    assert job.data == PARAMS["data"] and job.teacher == PARAMS["teacher"]
    assert job.prune == {k: v for k, v in PARAMS["prune"].items() if k != "flops_keep"}
    assert job.evaluate == PARAMS["evaluate"] and job.retries == 0


def test_overrides_replace_only_the_fields_they_give_defaults_first_then_the_job():
    jobs = jobs_of(
        """
defaults: {data: {sample_tokens: 500}, prune: {mu: 2.0}, retries: 2}
jobs:
  - {name: a, teacher: models/a, data: {seed: 3}, prune: {mu: 3.0}, method: kwon, budgets: [0.3, 0.6]}
  - {name: b, kwon: {num_samples: 64}}
"""
    ).jobs
    a, b = jobs
    assert a.teacher == {**PARAMS["teacher"], "model": "models/a"}  # the shorthand of teacher.model
    assert a.data == {**PARAMS["data"], "sample_tokens": 500, "seed": 3}
    assert (a.prune["mu"], b.prune["mu"]) == (3.0, 2.0)
    assert (a.method, a.budgets, a.retries) == ("kwon", (0.3, 0.6), 2)
    assert b.kwon == {"num_samples": 64} and b.data["sample_tokens"] == 500


def test_matrix_multiplies_teachers_data_and_methods_and_shares_the_other_fields():
    jobs = jobs_of(
        """
matrix:
  teacher: [models/a, models/b]
  data: [rotten_tomatoes, {task: classification, train: t.csv, dev: d.csv}]
  method: [kprune, magnitude]
  budgets: [0.4, 0.6]
  prune: {lam_rep: 1.0e-3}
"""
    ).jobs
    assert len(jobs) == 8
    combos = {(job.teacher["model"], job.data["task"], job.method) for job in jobs}
    assert len(combos) == 8
    assert all(job.budgets == (0.4, 0.6) and job.prune["lam_rep"] == 1e-3 for job in jobs)
    assert {job.name for job in jobs} >= {"a-rotten_tomatoes-kprune", "b-t.csv-magnitude"}
    assert len({job.name for job in jobs}) == 8


@pytest.mark.parametrize(
    "text, expected",
    [
        ("jobs: [{}]\nselect: {metric: accuracy, max_drop: 1}\nbudget: 0.5", "unknown key 'budget'"),
        ("jobs: [{name: x, budget: [0.5]}]", "job 'x': unknown key 'budget' (did you mean 'budgets'?)"),
        ("jobs: [{name: x, prune: {lamrep: 1}}]", "job 'x', field 'prune': unknown key 'lamrep'"),
        ("jobs: [{name: x, prune: {flops_keep: 0.3}}]", "field 'prune': unknown key 'flops_keep'"),
        ("jobs: [{name: x, data: {tsk: sst2}}]", "job 'x', field 'data': unknown key 'tsk'"),
        ("matrix: {teachers: [a]}", "matrix: unknown key 'teachers' (did you mean 'teacher'?)"),
        ("jobs: [{}]\nselect: {metrc: accuracy}", "select: unknown key 'metrc'"),
    ],
)
def test_unknown_keys_are_named_with_the_allowed_ones(text, expected):
    message = error_of(text)
    assert message.startswith("jobs.yaml: ") and expected in message and "allowed: " in message


@pytest.mark.parametrize(
    "text, expected",
    [
        ("jobs: [{name: x, budgets: [0.5, 1.5]}]", "job 'x', field 'budgets': 1.5 is not a fraction"),
        ("jobs: [{name: x, budgets: []}]", "job 'x', field 'budgets': give at least one budget"),
        ("jobs: [{name: x, method: kprun}]", "job 'x', field 'method': 'kprun' is not one of"),
        ("jobs: [{name: x, prune: {lam_rep: -1}}]", "job 'x', field 'prune': lam_rep must be >= 0"),
        ("jobs: [{name: x, method: kwon, kwon: {num_samples: 0}}]", "job 'x', field 'kwon': num_samples"),
        ("jobs: [{name: x, data: nosuchtask}]", "job 'x', field 'data.task': unknown task 'nosuchtask'"),
        ("jobs: [{name: x, retries: -1}]", "job 'x', field 'retries'"),
        ("jobs: [{name: x}, {name: x}]", "job 'x', field 'name': two jobs have this name"),
        ("jobs: [{name: x}]\nselect: {metric: f1x, max_drop: 1}", "select, field 'metric': 'f1x' is not"),
        ("jobs: [{name: x}]\nselect: {metric: accuracy}", "select, field 'max_drop'"),
        ("jobs: [{}, {teacher: [a]}]", "job '#2', field 'teacher': it must be a mapping"),
        ("jobs: []", "no jobs"),
        ("jobs: [{]", "not valid YAML"),
    ],
)
def test_errors_name_the_job_and_the_field(text, expected):
    assert expected in error_of(text)


def rows(*figures):
    return [
        {"model": model, "task": "t", "status": status, "flops_kept": kept, "drop": drop, "selected": False}
        for model, kept, drop, status in figures
    ]


def test_selection_marks_per_model_the_smallest_flops_within_the_drop():
    table = rows(
        ("a", 0.3, 2.5, "done"),  # too large a drop
        ("a", 0.5, 0.9, "done"),  # smallest within 1.0: selected
        ("a", 0.7, 0.1, "done"),
        ("a", 0.2, None, "failed"),
        ("b", 0.5, 1.0, "done"),  # on the floor counts as within
        ("b", 0.4, 1.01, "done"),
        ("c", 0.5, 3.0, "done"),  # nothing within: none selected
    )
    from pipeline.jobs import Selection

    chosen = [
        (row["model"], row["flops_kept"]) for row in select(table, Selection(None, 1.0)) if row["selected"]
    ]
    assert chosen == [("a", 0.5), ("b", 0.5)]


def test_the_example_jobs_file_is_the_embedded_default_at_two_budgets_and_both_methods():
    from pipeline.jobs import read_jobs

    jobs = read_jobs(ROOT / "examples/batch-default.yaml", PARAMS)
    assert sorted(job.method for job in jobs.jobs) == ["kprune", "kwon"]
    assert all(job.budgets == (0.4, 0.6) and job.data == PARAMS["data"] for job in jobs.jobs)
    assert all(job.teacher == PARAMS["teacher"] for job in jobs.jobs)
    assert jobs.select.metric == "accuracy" and jobs.name == "batch-default"
