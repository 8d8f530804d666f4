"""save_pruned / load_pruned: a plain transformers model with the pruned shapes and identical logits."""

import json

import pytest
import torch
from tiny import FAMILIES, model_inputs, tiny_model, tiny_sample

import kprune
from kprune.io import META_FILE, read_meta
from kprune.models import model_logits
from kprune.sublayer import unit_counts


@pytest.mark.parametrize("family,task", [(f, "classification") for f in FAMILIES] + [("distilbert", "qa")])
def test_round_trip_gives_identical_logits(tmp_path, family, task):
    model = tiny_model(family, task)
    sample = model_inputs(model, tiny_sample())
    result = kprune.prune(model, sample, flops_keep=0.3, progress=False)
    kprune.save_pruned(result.model, tmp_path, record=result.record)
    loaded = kprune.load_pruned(tmp_path)
    assert type(loaded) is type(model)
    assert unit_counts(loaded) == unit_counts(result.model)
    assert torch.equal(model_logits(loaded, sample), model_logits(result.model, sample))
    meta = read_meta(tmp_path)
    assert meta["record"]["heads"] == result.record.heads
    assert meta["record"]["config"]["flops_keep"] == 0.3


def test_layer_without_heads_round_trips(tmp_path):
    model = tiny_model("bert")
    from kprune.sublayer import Sublayer

    Sublayer(model, 2).keep_units(torch.zeros(4, dtype=torch.bool))
    kprune.save_pruned(model, tmp_path)
    loaded = kprune.load_pruned(tmp_path)
    assert unit_counts(loaded) == ([4, 0], [24, 24])
    sample = tiny_sample()
    assert torch.equal(model_logits(loaded, sample), model_logits(model, sample))


def test_loading_something_else_fails_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a kprune pruned-model folder"):
        kprune.load_pruned(tmp_path)
    (tmp_path / META_FILE).write_text(json.dumps({"format": "other", "version": 9}))
    with pytest.raises(ValueError, match="unknown format"):
        kprune.load_pruned(tmp_path)


def test_a_folder_is_replaced_as_a_whole_or_not_at_all(tmp_path):
    from kprune.atomic import _replace_folder, atomic_folder

    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(KeyboardInterrupt), atomic_folder(out) as temporary:
        (temporary / "new.txt").write_text("new")
        raise KeyboardInterrupt  # Ctrl-C in the middle of a save
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no sibling left behind
    assert [p.name for p in out.iterdir()] == ["old.txt"]
    with atomic_folder(out) as temporary:
        (temporary / "new.txt").write_text("new")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert [p.name for p in out.iterdir()] == ["new.txt"]  # the old file went with the old folder

    # Where the system cannot swap two folders in one call: the old one is renamed aside first.
    new = tmp_path / "new"
    new.mkdir()
    (new / "newer.txt").write_text("newer")
    _replace_folder(new, out)
    assert [p.name for p in out.iterdir()] == ["newer.txt"]
    assert [p.name for p in new.iterdir()] == ["new.txt"]  # the old folder, for the caller to remove


def test_saving_over_a_previous_model_replaces_it_and_refuses_other_folders(tmp_path):
    first, second = (kprune.prune(tiny_model(), tiny_sample(), keep, progress=False) for keep in (0.6, 0.3))
    kprune.save_pruned(first.model, tmp_path / "out", record=first.record)
    kprune.save_pruned(second.model, tmp_path / "out", record=second.record)
    assert read_meta(tmp_path / "out")["record"]["config"]["flops_keep"] == 0.3
    assert unit_counts(kprune.load_pruned(tmp_path / "out")) == unit_counts(second.model)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="non-empty folder not written by kprune"):
        kprune.save_pruned(first.model, tmp_path / "notes")
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"


@pytest.fixture
def saved(tmp_path):
    result = kprune.prune(tiny_model(), tiny_sample(), 0.5, progress=False)
    return kprune.save_pruned(result.model, tmp_path / "pruned", record=result.record)


def test_truncated_weights_are_one_error_naming_the_file(saved):
    weights = saved / "pruned.safetensors"
    for size in (weights.stat().st_size // 2, 4):
        weights.write_bytes(weights.read_bytes()[:size])
        with pytest.raises(ValueError, match=f"{weights} is unreadable or truncated .*; prune again"):
            kprune.load_pruned(saved)


@pytest.mark.parametrize("damage", ["a head too many", "a layer too few", "truncated"])
def test_a_kprune_json_that_does_not_match_the_weights_is_one_error(saved, damage):
    path = saved / META_FILE
    meta = json.loads(path.read_text())
    if damage == "a head too many":
        meta["heads_per_layer"][0] += 1
    elif damage == "a layer too few":
        meta["heads_per_layer"], meta["neurons_per_layer"] = (
            meta["heads_per_layer"][:1],
            meta["neurons_per_layer"][:1],
        )
    path.write_text(json.dumps(meta)[: None if damage != "truncated" else 40])
    with pytest.raises(ValueError) as error:
        kprune.load_pruned(saved)
    expected = (
        "is damaged (not JSON" if damage == "truncated" else f"does not match {saved / 'pruned.safetensors'}"
    )
    assert str(path) in str(error.value) and expected in str(error.value)
