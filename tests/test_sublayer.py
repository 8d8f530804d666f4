"""The sublayer formulas reproduce each family's transformers forward; surgery equals masking."""

import copy

import pytest
import torch
from tiny import FAMILIES, model_inputs, tiny_model, tiny_sample
from transformers import BertConfig, BertModel, GPT2Config, GPT2ForSequenceClassification

from kprune.arch import UnsupportedModelError, encoder_input, family_of, task_logits, task_of
from kprune.models import model_logits
from kprune.sublayer import Sublayer, set_unit_counts, sublayers, unit_counts

CASES = [(family, "classification") for family in FAMILIES] + [
    ("bert", "regression"),
    ("bert", "qa"),
    ("distilbert", "regression"),
    ("distilbert", "qa"),
]


def sublayer_logits(model, sample):
    hidden = encoder_input(model, sample)
    for sub in sublayers(model):
        hidden = sub.forward(hidden, sample["attention_mask"])
    return task_logits(model, hidden)


def valid_logits(logits, sample):
    # QA logits at padding positions are never used.
    return logits[sample["attention_mask"].bool()] if logits.dim() == 3 else logits


@pytest.mark.parametrize("family,task", CASES)
def test_sublayer_forward_matches_transformers(family, task):
    model = tiny_model(family, task)
    sample = model_inputs(model, tiny_sample())
    with torch.no_grad():
        expected = model_logits(model, sample)
        ours = sublayer_logits(model, sample)
    assert ours.shape == expected.shape
    torch.testing.assert_close(
        valid_logits(ours, sample), valid_logits(expected, sample), atol=1e-5, rtol=1e-5
    )


def masked_copy(model, keeps):
    """The unpruned model with pruned units silenced by zeroing their output-projection columns."""
    masked = copy.deepcopy(model)
    for sub, keep in zip(sublayers(masked), keeps, strict=True):
        columns = keep.repeat_interleave(sub.width)
        sub.output.weight.data[:, ~columns] = 0.0
    return masked


@pytest.mark.parametrize("family,task", CASES)
def test_physical_pruning_equals_masking(family, task):
    model = tiny_model(family, task)
    sample = model_inputs(model, tiny_sample())
    generator = torch.Generator().manual_seed(1)
    keeps = [torch.rand(sub.num_units, generator=generator) < 0.5 for sub in sublayers(model)]
    keeps[2][:] = False  # one attention sublayer loses every head: only its output bias remains
    keeps[1][:] = False  # and one FFN every neuron
    pruned = copy.deepcopy(model)
    for sub, keep in zip(sublayers(pruned), keeps, strict=True):
        sub.keep_units(keep)
    assert unit_counts(pruned) == ([int(k.sum()) for k in keeps[0::2]], [int(k.sum()) for k in keeps[1::2]])
    with torch.no_grad():
        expected = model_logits(masked_copy(model, keeps), sample)
        actual = model_logits(pruned, sample)
    torch.testing.assert_close(
        valid_logits(actual, sample), valid_logits(expected, sample), atol=1e-5, rtol=1e-5
    )


def test_fully_pruned_sublayer_keeps_its_bias():
    model = tiny_model("bert")
    sample = tiny_sample()
    sub = Sublayer(model, 2)
    bias = sub.output.bias.detach().clone()
    sub.keep_units(torch.zeros(sub.num_units, dtype=torch.bool))
    hidden = torch.randn(3, 5, model.config.hidden_size)
    features = sub.features(hidden, sample["attention_mask"][:3, :5])
    assert features.shape == (3, 5, 0, sub.width)
    torch.testing.assert_close(sub.residual_sum(hidden, features), hidden + bias)


def test_tuned_weight_is_installed():
    model = tiny_model("roberta")
    sub = Sublayer(model, 1)
    keep = torch.arange(sub.num_units) % 3 == 0
    weight = torch.randn(model.config.hidden_size, int(keep.sum()))
    sub.keep_units(keep, weight)
    torch.testing.assert_close(Sublayer(model, 1).output.weight, weight)
    with pytest.raises(ValueError, match="tuned weight"):
        Sublayer(model, 3).keep_units(keep, weight[:, :1])


def test_set_unit_counts_shapes_a_fresh_model():
    model = tiny_model("distilbert")
    set_unit_counts(model, [0, 3], [5, 24])
    assert unit_counts(model) == ([0, 3], [5, 24])
    with pytest.raises(ValueError, match="cannot keep"):
        set_unit_counts(tiny_model("distilbert"), [5, 3], [5, 24])


def test_tasks_and_families_are_detected():
    assert task_of(tiny_model("bert", "regression")) == "regression"
    assert task_of(tiny_model("bert", "qa")) == "question-answering"
    assert task_of(tiny_model("electra")) == "classification"
    assert family_of(tiny_model("xlm-roberta")).name == "xlm-roberta"


def test_unsupported_models_get_one_clear_error():
    gpt2 = GPT2ForSequenceClassification(GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=20))
    with pytest.raises(UnsupportedModelError, match="supported encoder families: bert, distilbert"):
        family_of(gpt2)
    base = BertModel(
        BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8)
    )
    with pytest.raises(UnsupportedModelError, match="no task head"):
        task_of(base)
