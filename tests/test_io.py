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
