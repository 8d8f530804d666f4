"""The model card of a pruned folder: hub metadata, what was kept, metrics added by kprune eval."""

import json

import pandas as pd
import pytest
from huggingface_hub import ModelCard
from test_cli import eval_args, prune_args, save_tiny
from tiny import model_inputs, sentences, tiny_model, tiny_sample

import kprune
from kprune.card import parameter_counts
from kprune.cli import main
from kprune.io import read_meta
from kprune.search import budget_limit
from kprune.sublayer import unit_counts


@pytest.mark.parametrize("family,task", [("bert", "classification"), ("distilbert", "qa")])
def test_card_states_source_budget_and_what_was_kept(tmp_path, family, task):
    teacher = tiny_model(family, task)
    teacher.config._name_or_path = "someone/tiny-teacher"
    teacher_parameters = sum(parameter.numel() for parameter in teacher.parameters())
    result = kprune.prune(teacher, model_inputs(teacher, tiny_sample()), flops_keep=0.4, progress=False)
    kprune.save_pruned(result.model, tmp_path, record=result.record, command="python make_it.py")

    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.library_name == "transformers"
    assert card.data.pipeline_tag == ("question-answering" if task == "qa" else "text-classification")
    assert card.data.base_model == "someone/tiny-teacher"
    assert {"kprune", family} <= set(card.data.tags)
    kept, original = parameter_counts(result.model)
    assert (kept, original) == (sum(p.numel() for p in result.model.parameters()), teacher_parameters)
    assert f"| parameters | {kept:,} of {original:,} " in card.text
    assert f"| encoder FLOPs | {100 * result.record.flops_kept:.1f}% (budget 40.0%)" in card.text
    assert f"`lam_rep={result.record.config['lam_rep']}`" in card.text and "python make_it.py" in card.text
    heads, neurons = unit_counts(result.model)
    for layer, (layer_heads, layer_neurons) in enumerate(zip(heads, neurons, strict=True)):
        assert f"| {layer} | {layer_heads}/4 | {layer_neurons}/24 |" in card.text
    assert f"kprune {kprune.__version__}" in card.text


def test_a_local_source_is_not_named_as_base_model(tmp_path):
    teacher = tiny_model()
    teacher.config._name_or_path = str(tmp_path)  # a folder on this machine, not a hub id
    result = kprune.prune(teacher, tiny_sample(), flops_keep=0.5, progress=False)
    kprune.save_pruned(result.model, tmp_path / "out", record=result.record)
    assert ModelCard.load(tmp_path / "out" / "README.md").data.base_model is None


def test_prune_records_its_command_and_eval_adds_metrics(tmp_path):
    model_dir = save_tiny(tmp_path / "model")
    data = tmp_path / "train.csv"
    pd.DataFrame({"sentence": sentences(80), "label": ["pos", "neg"] * 40}).to_csv(data, index=False)
    out = tmp_path / "pruned"
    assert main(prune_args(model_dir, data, out, "--flops-keep", "0.5")) == 0
    assert read_meta(out)["command"].startswith(f"kprune prune --model {model_dir}")
    assert "## Metrics" not in (out / "README.md").read_text()

    options = ["--text-column", "sentence", "--add-to-card"]
    assert main(eval_args(out, data, *options)) == 0
    metrics = read_meta(out)["metrics"]
    ((name, measured),) = metrics.items()
    assert str(data) in name and 0 <= measured["accuracy"] <= 1
    assert f"accuracy {measured['accuracy']:.4f}" in (out / "README.md").read_text()
    assert json.loads((out / "kprune.json").read_text())["record"]["flops_kept"] <= budget_limit(0.5)


def test_add_to_card_needs_a_kprune_folder(tmp_path, capsys):
    model_dir = save_tiny(tmp_path / "model")
    with pytest.raises(SystemExit) as exit_info:
        main(eval_args(model_dir, tmp_path / "missing.csv", "--add-to-card"))
    assert exit_info.value.code == 2
    assert "--add-to-card" in capsys.readouterr().err
