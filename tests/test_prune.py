"""The whole iteration through the one-call API: budgets, identity, determinism, cached inputs, bad input."""

import copy

import pytest
import torch
from tiny import FAMILIES, model_inputs, tiny_model, tiny_sample

import kprune
from kprune.api import model_logits
from kprune.arch import encoder_input
from kprune.iterate import PruneState, run_step, teacher_step
from kprune.sample import average_length, make_batches
from kprune.sublayer import encoder_flops_of, sublayers, unit_counts


def run(model, sample, flops_keep, **options):
    return kprune.prune(model, sample, flops_keep=flops_keep, progress=False, **options)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("flops_keep", [0.15, 0.5, 0.8])
def test_pruned_flops_never_exceed_the_budget(family, flops_keep):
    model = tiny_model(family)
    sample = model_inputs(model, tiny_sample())
    result = run(model, sample, flops_keep)
    seq_len = average_length(sample)
    flops = encoder_flops_of(result.model, seq_len)
    assert flops == pytest.approx(result.record.flops_final)
    assert flops <= flops_keep * encoder_flops_of(model, seq_len) * (1 + 1e-9)
    # The budget is used, not wasted: at most one head's worth of FLOPs is left over.
    assert result.record.flops_budget - flops <= max(s.flops_kept for s in result.record.steps) + 1e-6
    assert result.record.heads and len(result.record.heads) == model.config.num_hidden_layers


@pytest.mark.parametrize("family,task", [(f, "classification") for f in FAMILIES] + [("bert", "qa")])
def test_keeping_all_flops_leaves_the_logits_unchanged(family, task):
    model = tiny_model(family, task)
    sample = model_inputs(model, tiny_sample())
    result = run(model, sample, 1.0)
    assert unit_counts(result.model) == unit_counts(model)
    torch.testing.assert_close(model_logits(result.model, sample), model_logits(model, sample))


def test_teacher_is_not_modified():
    model = tiny_model("bert")
    before = copy.deepcopy(model.state_dict())
    run(model, tiny_sample(), 0.4)
    after = model.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_same_seed_same_masks_for_sampled_fisher():
    model = tiny_model("bert", "qa")  # QA uses random projections: the seed must fix them
    sample = tiny_sample()
    first, second = run(model, sample, 0.4, seed=3), run(model, sample, 0.4, seed=3)
    assert first.record.heads == second.record.heads and first.record.neurons == second.record.neurons
    torch.testing.assert_close(model_logits(first.model, sample), model_logits(second.model, sample))


def test_tuning_lowers_the_reconstruction_error_and_can_be_switched_off():
    model = tiny_model("roberta")
    sample = tiny_sample(num=48)
    tuned = run(model, sample, 0.4)
    assert all(step.error_after <= step.error_before for step in tuned.record.steps)
    assert sum(step.error_after < 0.9 * step.error_before for step in tuned.record.steps) >= 2
    untuned = run(model, sample, 0.4, tune_weights=False)
    assert all(step.error_after == step.error_before for step in untuned.record.steps)
    # Without tuning the kept units keep their original output weights.
    layer = sublayers(untuned.model)[1]
    original = sublayers(model)[1].output.weight[:, untuned.record.neurons[0]]
    torch.testing.assert_close(layer.output.weight, original)


def test_each_step_feeds_the_next_from_the_cached_student_input():
    """The carried hidden states equal a fresh forward of the partly pruned student from its embeddings."""
    teacher = tiny_model("distilbert")
    sample = model_inputs(teacher, tiny_sample())
    student = copy.deepcopy(teacher).requires_grad_(False)
    config = kprune.KPruneConfig(flops_keep=0.3, batch_size=10)
    batches = make_batches(sample, config.batch_size)
    with torch.no_grad():
        teacher_logits = [model_logits(teacher, batch) for batch in batches]
        hidden = [encoder_input(teacher, batch) for batch in batches]
    state = PruneState(0, hidden, config.flops_keep * encoder_flops_of(teacher, 7.0))
    teacher_hidden = hidden
    for t in range(len(sublayers(student))):
        targets, teacher_hidden = teacher_step(teacher, t, teacher_hidden, batches)
        state = run_step(state, student, batches, teacher_logits, targets, "classification", 7.0, config)
        for batch, carried in zip(batches, state.student_hidden, strict=True):
            with torch.no_grad():
                fresh = encoder_input(student, batch)
                for sub in sublayers(student)[: t + 1]:
                    fresh = sub.forward(fresh, batch["attention_mask"])
            torch.testing.assert_close(carried, fresh, atol=1e-5, rtol=1e-5)
    assert state.sublayer == 4 and len(state.steps) == 4


def test_bad_input_gets_one_clear_error():
    model = tiny_model("bert")
    sample = tiny_sample()
    for bad in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match=r"flops_keep must be in \(0, 1\]"):
            run(model, sample, bad)
    with pytest.raises(ValueError, match="empty"):
        run(model, {k: v[:0] for k, v in sample.items()}, 0.5)
    with pytest.raises(ValueError, match="input_ids"):
        run(model, {"attention_mask": sample["attention_mask"]}, 0.5)
    with pytest.raises(ValueError, match="either flops_keep"):
        kprune.prune(model, sample, 0.5, config=kprune.KPruneConfig(flops_keep=0.5))
    with pytest.raises(kprune.UnsupportedModelError, match="no task head"):
        run(model.bert, sample, 0.5)
