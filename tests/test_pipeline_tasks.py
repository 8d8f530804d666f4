"""The pipeline on other tasks than the embedded default, chosen in params.yaml only: a GLUE pair task
and SQuAD v2 with unanswerable questions, each from a local folder standing in for its hub repository."""

from __future__ import annotations

import json
import sys

import pytest
from hub import glue_repo, squad_repo
from pipeline_project import commit, make_project, run, set_param, stages_run, tiny_base_model
from tiny import tiny_model, tiny_tokenizer
from transformers import BertForQuestionAnswering, BertForSequenceClassification

import kprune
from kprune.search import budget_limit

pytestmark = pytest.mark.slow
STAGES = ["prepare", "teacher", "calibrate", "prune", "evaluate", "export"]


def run_pipeline(project):
    """`python -m pipeline run` on the session's Prefect server (the prefect_server fixture)."""
    set_param(project, "evaluate", "latency_repeats", 2)
    commit(project)
    result = run(project, sys.executable, "-m", "pipeline", "run")
    assert stages_run(result) == STAGES
    metrics = json.loads((project / "data/evaluate/metrics.json").read_text())
    info = json.loads((project / "data/prepared/info.json").read_text())
    return result, metrics, info


def test_glue_pair_task_with_a_fine_tuned_teacher(tmp_path, prefect_server):
    project = make_project(tmp_path / "project")
    set_param(project, "data", "task", "glue/mrpc")
    set_param(project, "data", "hub_dataset", str(glue_repo(tmp_path / "glue")))
    set_param(project, "data", "sample_tokens", 500)
    set_param(project, "teacher", "base", str(tiny_base_model(tmp_path / "base")))
    set_param(project, "teacher", "epochs", 0.5)
    result, metrics, info = run_pipeline(project)

    assert (info["task"], info["dev"]["validation"]["rows"]) == ("glue/mrpc", 20)
    for model in ("teacher", "pruned"):
        assert 0 <= metrics[f"{model}_accuracy"] <= 1 and 0 <= metrics[f"{model}_f1"] <= 1
    assert metrics["flops_kept"] <= budget_limit(0.5)
    assert "dev f1: teacher" in result.stdout
    assert isinstance(kprune.load_pruned(project / "data/export"), BertForSequenceClassification)


def test_squad_v2_with_a_given_qa_teacher(tmp_path, prefect_server):
    teacher = tmp_path / "qa"
    tiny_model("bert", task="qa").save_pretrained(teacher)
    tiny_tokenizer(teacher).save_pretrained(teacher)
    project = make_project(tmp_path / "project")
    set_param(project, "data", "task", "squad_v2")
    set_param(project, "data", "hub_dataset", str(squad_repo(tmp_path / "squad", unanswerable=4)))
    set_param(project, "data", "sample_tokens", 400)
    # the tiny model has 64 positions: short windows, sharing 8 context tokens, questions cut to 8
    set_param(project, "data", "max_length", 32)
    set_param(project, "data", "stride", 8)
    set_param(project, "data", "max_question_tokens", 8)
    set_param(project, "teacher", "model", str(teacher))
    result, metrics, info = run_pipeline(project)

    assert (info["kind"], info["max_length"], info["stride"], info["max_question_tokens"]) == (
        "question-answering",
        32,
        8,
        8,
    )
    assert info["sample"]["tokens"] >= 400 and info["sample"]["average_length"] <= 32
    for model in ("teacher", "pruned"):
        assert 0 <= metrics[f"{model}_exact_match"] <= metrics[f"{model}_f1"] <= 1
        assert metrics[f"{model}_num_examples"] == 16
    assert metrics["flops_kept"] <= budget_limit(0.5)
    assert "dev exact_match: teacher" in result.stdout
    assert isinstance(kprune.load_pruned(project / "data/export"), BertForQuestionAnswering)
