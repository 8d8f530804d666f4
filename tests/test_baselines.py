"""Baselines (Kwon et al. 2022 Mask-Tuning, weight magnitude) pinned to brute force and hand computations."""

import copy
import itertools
import math

import numpy as np
import pytest
import torch
from tiny import FAMILIES, model_inputs, tiny_model, tiny_sample

import kprune
from kprune.arch import encoder_input, task_logits
from kprune.baselines import KwonConfig, kwon_masks, kwon_prune, magnitude_prune
from kprune.baselines.common import apply_masks, masked_logits, masked_sublayer, model_batches
from kprune.baselines.kwon import fisher
from kprune.baselines.kwon.fisher import fisher_block, mask_gradients
from kprune.baselines.kwon.labels import task_labels, task_loss
from kprune.baselines.kwon.rearrange import fisher_objective, rearrange_mask
from kprune.baselines.kwon.rescale import ScaleStats, rescale_masks, solve_scales
from kprune.baselines.kwon.search import search_heads_and_neurons
from kprune.baselines.magnitude import weight_magnitudes
from kprune.flops import head_flops, neuron_flops
from kprune.models import model_logits
from kprune.sample import average_length
from kprune.sublayer import Sublayer, encoder_flops_of, sublayers, unit_counts

TOLERANCE = 1 + 1e-9


def labels_for(model, sample, seed=0):
    """Random true labels of the model's task for the sample."""
    generator = torch.Generator().manual_seed(seed)
    num = sample["input_ids"].shape[0]
    if hasattr(model, "qa_outputs"):
        lengths = sample["attention_mask"].sum(1)
        start = (torch.rand(num, generator=generator) * lengths).long()
        end = torch.minimum(start + torch.randint(0, 3, (num,), generator=generator), lengths - 1)
        return torch.stack([start, end], 1)
    if model.config.num_labels == 1:
        return torch.randn(num, generator=generator)
    return torch.randint(0, model.config.num_labels, (num,), generator=generator)


def setup(family="bert", task="classification", num=32):
    model = tiny_model(family, task)
    sample = model_inputs(model, tiny_sample(num=num))
    return model, sample, labels_for(model, sample)


def valid_logits(logits, sample):
    return logits[sample["attention_mask"].bool()] if logits.dim() == 3 else logits


# ------------------------------------------------------------------------------------------- budgets


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("flops_keep", [0.2, 0.5, 0.8])
def test_kwon_flops_never_exceed_the_budget_and_use_it(family, flops_keep):
    model, sample, labels = setup(family)
    result = kwon_prune(model, sample, flops_keep, labels=labels, device="cpu")
    seq_len = average_length(sample)
    flops = encoder_flops_of(result.model, seq_len)
    budget = flops_keep * encoder_flops_of(model, seq_len)
    assert flops == pytest.approx(result.record.flops_final)
    assert flops <= budget * TOLERANCE
    assert result.record.budget_flops == pytest.approx(budget)
    # The search fills the budget: less than one neuron is left, unless every neuron is kept.
    heads, neurons = unit_counts(result.model)
    all_neurons = sum(sub.num_units for sub in sublayers(model)[1::2])
    assert budget - flops < neuron_flops(16, seq_len) or sum(neurons) == all_neurons
    assert [len(kept) for kept in result.record.heads] == heads
    assert [len(kept) for kept in result.record.neurons] == neurons
    assert result.record.config["method"] == "kwon2022-mask-tuning"


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("flops_keep", [0.2, 0.5, 0.8])
def test_magnitude_flops_never_exceed_the_budget(family, flops_keep):
    model, sample, _ = setup(family)
    result = magnitude_prune(model, sample, flops_keep, device="cpu")
    seq_len = average_length(sample)
    flops = encoder_flops_of(result.model, seq_len)
    assert flops == pytest.approx(result.record.flops_final)
    assert flops <= flops_keep * encoder_flops_of(model, seq_len) * TOLERANCE
    assert result.record.config["method"] == "magnitude"
    assert [len(kept) for kept in result.record.heads] == unit_counts(result.model)[0]


@pytest.mark.parametrize("family,task", [(f, "classification") for f in FAMILIES] + [("bert", "qa")])
def test_keeping_all_flops_leaves_the_logits_unchanged(family, task):
    model, sample, labels = setup(family, task)
    expected = model_logits(model, sample)
    for result in (
        kwon_prune(model, sample, 1.0, labels=labels, device="cpu"),
        magnitude_prune(model, sample, 1.0, device="cpu"),
    ):
        assert unit_counts(result.model) == unit_counts(model)
        torch.testing.assert_close(model_logits(result.model, sample), expected)


def test_keeping_all_flops_keeps_units_of_zero_importance():
    model, sample, labels = setup("bert")
    with torch.no_grad():
        Sublayer(model, 2).output.weight[:, :4] = 0.0  # head 0 of layer 1 no longer affects the loss
    masks = kwon_masks(model, sample, 1.0, labels=labels, device="cpu")
    assert float(masks.fisher[2][0]) == 0.0
    assert all(keep.all() for keep in masks.keep) and all(keep.all() for keep in masks.target_keep)
    partial = kwon_masks(model, sample, 0.6, labels=labels, device="cpu")
    assert not partial.keep[2][0]  # under a real budget a useless head goes first


def test_teacher_is_not_modified():
    model, sample, labels = setup("roberta")
    before = copy.deepcopy(model.state_dict())
    kwon_prune(model, sample, 0.4, labels=labels, device="cpu")
    magnitude_prune(model, sample, 0.4, device="cpu")
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_kwon_result_owns_its_memory_and_the_teacher_keeps_its_flags():
    """The method computes on the teacher's weights without copying them, so check that nothing of the
    result is still the teacher's and that the teacher's modes are its own."""
    model, sample, labels = setup("bert")
    model.train()
    result = kwon_prune(model, sample, 0.5, labels=labels, device="cpu")
    assert model.training and all(parameter.requires_grad for parameter in model.parameters())
    teacher = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    pruned = [*result.model.parameters(), *result.model.buffers()]
    assert not any(t.numel() and t.untyped_storage().data_ptr() in teacher for t in pruned)
    before = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        for parameter in result.model.parameters():
            parameter.add_(1.0)
    assert all(torch.equal(before[name], value) for name, value in model.state_dict().items())
    masks = kwon_masks(model, sample, 0.5, labels=labels, device="cpu")
    assert model.training and all(parameter.requires_grad for parameter in model.parameters())
    assert [k.nonzero().flatten().tolist() for k in masks.keep] == [
        step.kept_units for step in result.record.steps
    ]


# ------------------------------------------------------------------------------------------- search


def exhaustive_best(head_importance, neuron_importance, head_cost, neuron_cost, budget):
    """Best total importance over every (head set, neuron set) that fits, by enumeration."""
    units = head_importance.numel() + neuron_importance.numel()
    subsets = torch.tensor(list(itertools.product([0.0, 1.0], repeat=units)), dtype=torch.float64)
    importance = subsets @ torch.cat([head_importance, neuron_importance]).double()
    costs = torch.cat(
        [torch.full_like(head_importance, head_cost), torch.full_like(neuron_importance, neuron_cost)]
    )
    fits = subsets @ costs.double() <= budget * TOLERANCE
    best = int(torch.argmax(torch.where(fits, importance, -math.inf)))
    keep = subsets[best].bool()
    return float(importance[best]), keep[: head_importance.numel()], keep[head_importance.numel() :]


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("fraction", [0.0, 0.15, 0.4, 0.7, 1.0])
def test_head_neuron_search_equals_exhaustive_search_over_subsets(seed, fraction):
    generator = torch.Generator().manual_seed(seed)
    heads = torch.rand(5, generator=generator, dtype=torch.float64) * 3
    neurons = torch.rand(7, generator=generator, dtype=torch.float64)
    head_cost, neuron_cost = 2.5, 1.0  # a head costs 2.5 neurons
    budget = fraction * (5 * head_cost + 7 * neuron_cost)
    keep_heads, keep_neurons = search_heads_and_neurons(heads, neurons, head_cost, neuron_cost, budget)
    best, best_heads, best_neurons = exhaustive_best(heads, neurons, head_cost, neuron_cost, budget)
    assert float(heads[keep_heads].sum() + neurons[keep_neurons].sum()) == pytest.approx(best)
    assert torch.equal(keep_heads, best_heads) and torch.equal(keep_neurons, best_neurons)


def test_head_neuron_search_may_keep_no_head():
    # Heads carry almost nothing: the best use of a budget that fits one head is neurons only.
    heads, neurons = torch.full((4,), 1e-3, dtype=torch.float64), torch.ones(6, dtype=torch.float64)
    keep_heads, keep_neurons = search_heads_and_neurons(heads, neurons, 3.0, 1.0, 3.5)
    assert not keep_heads.any() and int(keep_neurons.sum()) == 3
    # And heads win when they carry more than the neurons they displace.
    keep_heads, keep_neurons = search_heads_and_neurons(heads * 4000, neurons, 3.0, 1.0, 3.5)
    assert int(keep_heads.sum()) == 1 and not keep_neurons.any()


def test_head_neuron_search_with_the_flops_model_beats_every_head_count():
    """With kprune's unit costs, the chosen head count is the best over all counts (brute force over h)."""
    generator = torch.Generator().manual_seed(0)
    heads = torch.rand(8, generator=generator, dtype=torch.float64)
    neurons = torch.rand(48, generator=generator, dtype=torch.float64) * 0.1
    head_cost, neuron_cost = head_flops(16, 4, 9.5), neuron_flops(16, 9.5)
    budget = 0.45 * (8 * head_cost + 48 * neuron_cost)
    keep_heads, keep_neurons = search_heads_and_neurons(heads, neurons, head_cost, neuron_cost, budget)
    chosen = float(heads[keep_heads].sum() + neurons[keep_neurons].sum())
    assert int(keep_heads.sum()) * head_cost + int(keep_neurons.sum()) * neuron_cost <= budget * TOLERANCE
    sorted_heads, sorted_neurons = heads.sort(descending=True).values, neurons.sort(descending=True).values
    totals = []
    for count in range(9):
        left = budget - count * head_cost
        if left >= 0:
            fill = min(48, int(left // neuron_cost))
            totals.append(float(sorted_heads[:count].sum() + sorted_neurons[:fill].sum()))
    assert chosen == pytest.approx(max(totals))
    assert 0 < int(keep_heads.sum()) < 8  # a real trade-off, not a corner


# ------------------------------------------------------------------------------------------- rearrange


def greedy_by_definition(keep, gradients):
    """Kwon et al.'s greedy rearrangement written naively: objectives evaluated from the gradient vectors."""
    fisher = gradients.T.double() @ gradients.double()
    objective = lambda pruned: float(fisher[pruned][:, pruned].sum())  # noqa: E731
    diagonal = fisher.diagonal()
    pruned = (~keep).nonzero().flatten().tolist()
    kept = keep.nonzero().flatten().tolist()
    for unit in sorted(kept, key=lambda i: (float(diagonal[i]), i)):
        candidates = pruned + [unit]
        costs = [objective([j for j in candidates if j != leaving]) for leaving in candidates]
        best = min(costs)
        # Ties: the newly added unit leaves (no swap without a strict improvement).
        leaving = unit if costs[-1] <= best else candidates[costs.index(best)]
        pruned = [j for j in candidates if j != leaving]
    result = torch.ones_like(keep)
    result[pruned] = False
    return result


def brute_force_best(keep, fisher):
    units, kept = keep.numel(), int(keep.sum())
    best = min(
        itertools.combinations(range(units), units - kept),
        key=lambda p: float(fisher[list(p)][:, list(p)].sum()),
    )
    result = torch.ones(units, dtype=torch.bool)
    result[list(best)] = False
    return result


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("kept", [1, 3, 5, 7])
def test_rearrangement_never_increases_the_objective_and_follows_the_greedy(seed, kept):
    generator = torch.Generator().manual_seed(seed)
    gradients = torch.randn(12, 8, generator=generator) * torch.rand(8, generator=generator)
    gradients[:, :2] += gradients[:, 2:4] * 0.8  # correlated units, so the choice matters
    fisher = fisher_block(gradients)
    keep = torch.zeros(8, dtype=torch.bool)
    keep[torch.argsort(fisher.diagonal(), descending=True)[:kept]] = True  # the search's choice
    new = rearrange_mask(keep, fisher)
    assert int(new.sum()) == kept
    assert fisher_objective(new, fisher) <= fisher_objective(keep, fisher) + 1e-12
    assert torch.equal(new, greedy_by_definition(keep, gradients))
    if kept == 1:  # one kept unit: a single greedy pass is provably optimal
        assert fisher_objective(new, fisher) == pytest.approx(
            fisher_objective(brute_force_best(keep, fisher), fisher)
        )


def test_rearrangement_finds_the_cancelling_pair():
    # Units a and b push the loss the same way, c the opposite way: pruning {b, c} costs far less than the
    # two smallest diagonals {a, b}.
    gradients = torch.tensor([[1.0, 1.05, -1.1], [0.0, 0.0, 0.1]])
    fisher = fisher_block(gradients)
    keep = torch.tensor([False, False, True])  # top-1 by Fisher diagonal
    new = rearrange_mask(keep, fisher)
    assert new.tolist() == [True, False, False]
    assert torch.equal(new, brute_force_best(keep, fisher))
    assert fisher_objective(new, fisher) == pytest.approx(0.0125)
    assert fisher_objective(keep, fisher) == pytest.approx(2.05**2)


def test_rearrangement_swaps_only_on_a_strict_improvement():
    # Independent units: every choice of the same diagonal total is equally good, so nothing moves.
    fisher = torch.diag(torch.tensor([1.0, 2.0, 2.0, 3.0], dtype=torch.float64))
    keep = torch.tensor([False, False, True, True])
    assert torch.equal(rearrange_mask(keep, fisher), keep)


def test_rearrangement_leaves_full_and_empty_layers_alone():
    fisher = fisher_block(torch.randn(5, 4))
    for keep in (torch.ones(4, dtype=torch.bool), torch.zeros(4, dtype=torch.bool)):
        assert torch.equal(rearrange_mask(keep, fisher), keep)


# ------------------------------------------------------------------------------------------- rescale


def explicit_design(features, weight, width, target, offset):
    """Design matrix of the scales: one column per unit, its output W_i f_i over all rows, flattened."""
    units = features.shape[1]
    columns = [
        (features[:, i, :].double() @ weight[:, i * width : (i + 1) * width].double().T).flatten()
        for i in range(units)
    ]
    if offset:
        columns.append(torch.ones(target.numel(), dtype=torch.float64))
    return torch.stack(columns, 1).numpy(), target.double().flatten().numpy()


@pytest.mark.parametrize("index,offset", [(1, False), (2, True), (3, False), (2, False)])
def test_scales_equal_numpy_least_squares(index, offset):
    model = tiny_model("bert")
    sample = tiny_sample(num=10)
    sub = Sublayer(model, index)
    generator = torch.Generator().manual_seed(index)
    hidden = torch.randn(10, sample["input_ids"].shape[1], 16, generator=generator)
    with torch.no_grad():
        features = sub.features(hidden, sample["attention_mask"])[sample["attention_mask"].bool()]
    kept = torch.tensor([0, 2, 3]) if sub.num_units == 4 else torch.arange(0, 24, 2)
    features = features[:, kept]
    columns = (kept[:, None] * sub.width + torch.arange(sub.width)).flatten()
    weight = sub.output.weight.detach()[:, columns]
    target = torch.randn(features.shape[0], 16, generator=generator, dtype=torch.float64)
    stats = ScaleStats(weight, sub.width)
    half = features.shape[0] // 2  # two batches
    stats.add(features[:half], target[:half])
    assert stats.gram.shape == (len(kept), len(kept))  # cached now; the next batch must refresh it
    stats.add(features[half:], target[half:])

    scales, solver = solve_scales(stats, ridge=0.0, offset=offset)
    design, rhs = explicit_design(features, weight, sub.width, target, offset)
    expected = np.linalg.lstsq(design, rhs, rcond=None)[0]
    assert solver == "cholesky"
    np.testing.assert_allclose(scales.numpy(), expected[: len(kept)], rtol=1e-6, atol=1e-8)
    # error() is the explicit squared residual (at the best offset when offset=True).
    residual = design @ expected - rhs
    without_offset = design[:, : len(kept)] @ scales.numpy() - rhs
    assert stats.error(scales, offset) == pytest.approx(
        float(residual @ residual if offset else without_offset @ without_offset)
    )
    ones = np.ones(len(kept))
    assert stats.error(torch.ones(len(kept)), False) == pytest.approx(
        float(np.sum((design[:, : len(kept)] @ ones - rhs) ** 2))
    )
    # A huge ridge pulls every scale to 1.
    assert torch.allclose(
        solve_scales(stats, ridge=1e8, offset=offset)[0],
        torch.ones(len(kept), dtype=torch.float64),
        atol=1e-5,
    )


def prepared(model, sample, labels, flops_keep=0.4):
    masks = kwon_masks(model, sample, flops_keep, labels=labels, device="cpu")
    batches, _ = model_batches(model, sample, 32, torch.device("cpu"))
    return masks, batches


def brute_force_rescale(model, keeps, target_keeps, sample, ridge):
    """The rescaling written out on the whole sample at once: sublayer by sublayer, bottom-up, the explicit
    design matrix of the kept units' outputs over every real token ([CLS] only for a classifier's last FFN),
    the ridge towards scale 1 as extra rows, solved by numpy's least squares."""
    subs = sublayers(model)
    attention_mask = sample["attention_mask"]
    classifier = not hasattr(model, "qa_outputs")
    scaled = []
    with torch.no_grad():
        student = target = encoder_input(model, dict(sample))
        for sub, keep, target_keep in zip(subs, keeps, target_keeps, strict=True):
            residual = masked_sublayer(sub, target, attention_mask, target_keep.float())[0]
            mask = keep.double()
            kept = keep.nonzero().flatten()
            if sub.index > 0 and kept.numel():  # the first attention is not rescaled
                rows = attention_mask.bool()
                if classifier and sub.index == len(subs) - 1:
                    rows = torch.zeros_like(rows)
                    rows[:, 0] = True
                features = sub.features(student, attention_mask)[rows][:, kept]
                columns = (kept[:, None] * sub.width + torch.arange(sub.width)).flatten()
                offset = sub.index % 2 == 0
                design, rhs = explicit_design(
                    features,
                    sub.output.weight[:, columns],
                    sub.width,
                    (residual - student - sub.output.bias)[rows],
                    offset,
                )
                units = kept.numel()
                lam = ridge * float((design[:, :units] ** 2).sum(0).mean())
                damping = np.zeros((units, design.shape[1]))
                damping[:, :units] = np.sqrt(lam) * np.eye(units)
                solution = np.linalg.lstsq(
                    np.vstack([design, damping]),
                    np.concatenate([rhs, np.full(units, np.sqrt(lam))]),
                    rcond=None,
                )[0]
                mask[kept] = torch.from_numpy(solution[:units])
            scaled.append(mask)
            student = masked_sublayer(sub, student, attention_mask, mask.float())[1]
            target = sub.layer_norm(residual)
    return scaled


@pytest.mark.parametrize("family,task", [("bert", "classification"), ("distilbert", "qa")])
def test_streamed_rescaling_equals_the_whole_sample_least_squares(family, task):
    model, sample, _ = setup(family, task, num=30)
    batches, _ = model_batches(model, sample, 7, torch.device("cpu"))
    generator = torch.Generator().manual_seed(3)
    keeps = [torch.rand(sub.num_units, generator=generator) < 0.6 for sub in sublayers(model)]
    targets = [keep | (torch.rand(keep.shape, generator=generator) < 0.5) for keep in keeps]
    expected = brute_force_rescale(model, keeps, targets, sample, ridge=1e-3)
    assert any(not torch.equal(mask, keep.double()) for mask, keep in zip(expected, keeps, strict=True))
    # Whole batches in RAM, and micro-batches of at most 20 padded tokens in RAM and offloaded to files.
    runs = [(10**6, False), (20, False), (20, True)]
    results = [
        rescale_masks(model, keeps, targets, batches, 1e-3, 1e9, max_tokens=tokens, offload=offload)
        for tokens, offload in runs
    ]
    for scaled, reports in results:
        assert [report.status for report in reports].count("rescaled") == len(reports) - 1
        for ours, theirs in zip(scaled, expected, strict=True):
            torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    # The files hold the hidden states exactly.
    assert all(torch.equal(a, b) for a, b in zip(results[1][0], results[2][0], strict=True))
    in_ram, offloaded = ([(r.status, r.rows, r.error_after) for r in result[1][1:]] for result in results[1:])
    assert in_ram == offloaded


def test_rescaling_lowers_every_reconstruction_error():
    model, sample, labels = setup("bert", num=48)
    masks, batches = prepared(model, sample, labels)
    rescaled = [report for report in masks.reports if report.status == "rescaled"]
    assert len(rescaled) >= 2
    assert all(report.error_after <= report.error_before for report in rescaled)
    assert any(report.error_after < 0.95 * report.error_before for report in rescaled)
    assert masks.reports[0].status == "first-attention"  # as in the reference code
    assert torch.equal(masks.masks[0], masks.keep[0].double())


def test_rescaling_against_an_identical_target_keeps_scale_one():
    """The fit reproduces the *target* model: when the target keeps the student's units, nothing changes."""
    model, sample, _ = setup("distilbert")
    batches, _ = model_batches(model, sample, 32, torch.device("cpu"))
    generator = torch.Generator().manual_seed(2)
    keeps = [torch.rand(sub.num_units, generator=generator) < 0.6 for sub in sublayers(model)]
    scaled, reports = rescale_masks(model, keeps, keeps, batches)
    assert {report.status for report in reports} <= {"exact", "first-attention", "no-units"}
    assert all(torch.equal(mask, keep.double()) for mask, keep in zip(scaled, keeps, strict=True))
    # Against the unpruned model the same student gets scales != 1.
    full = [torch.ones_like(keep) for keep in keeps]
    scaled, reports = rescale_masks(model, keeps, full, batches)
    assert any(report.status == "rescaled" for report in reports)
    assert any(not torch.equal(mask, keep.double()) for mask, keep in zip(scaled, keeps, strict=True))


@pytest.mark.parametrize("task", ["classification", "qa"])
def test_a_classifiers_last_ffn_is_fitted_on_the_first_token_only(task):
    model, sample, _ = setup("bert", task)
    batches, _ = model_batches(model, sample, 32, torch.device("cpu"))
    keeps = [torch.arange(sub.num_units) % 2 == 0 for sub in sublayers(model)]
    _, reports = rescale_masks(model, keeps, [torch.ones_like(keep) for keep in keeps], batches)
    tokens, sequences = int(sample["attention_mask"].sum()), sample["input_ids"].shape[0]
    assert [report.rows for report in reports[1:3]] == [tokens, tokens]
    assert reports[3].rows == (sequences if task == "classification" else tokens)


def test_rescaling_stops_at_the_first_scale_out_of_bounds():
    model, sample, _ = setup("bert")
    batches, _ = model_batches(model, sample, 32, torch.device("cpu"))
    keeps = [torch.arange(sub.num_units) % 2 == 0 for sub in sublayers(model)]
    full = [torch.ones_like(keep) for keep in keeps]
    scaled, reports = rescale_masks(model, keeps, full, batches, max_scale=1e-3)
    assert [report.status for report in reports] == ["first-attention", "out-of-bounds", "stopped", "stopped"]
    assert all(torch.equal(mask, keep.double()) for mask, keep in zip(scaled, keeps, strict=True))


def test_default_target_is_the_model_searched_at_the_square_root_budget():
    model, sample, labels = setup("bert")
    seq_len = average_length(sample)
    masks = kwon_masks(model, sample, 0.25, labels=labels, device="cpu")
    heads = [int(k.sum()) for k in masks.target_keep[0::2]]
    neurons = [int(k.sum()) for k in masks.target_keep[1::2]]
    target_flops = encoder_flops_of(model, seq_len) * 0.5
    assert encoder_flops_of_counts(heads, neurons, seq_len) <= target_flops * TOLERANCE
    assert encoder_flops_of_counts(heads, neurons, seq_len) > target_flops - neuron_flops(16, seq_len) - 1e-6
    assert masks.config.target_keep == pytest.approx(0.5)
    unpruned = kwon_masks(model, sample, 0.25, labels=labels, device="cpu", teacher_keep=1.0)
    assert all(k.all() for k in unpruned.target_keep)


def encoder_flops_of_counts(heads, neurons, seq_len):
    return sum(
        h * head_flops(16, 4, seq_len) + n * neuron_flops(16, seq_len)
        for h, n in zip(heads, neurons, strict=True)
    )


# ------------------------------------------------------------------------------------------- surgery


@pytest.mark.parametrize(
    "family,task",
    [
        ("bert", "classification"),
        ("roberta", "regression"),
        ("distilbert", "qa"),
        ("electra", "classification"),
    ],
)
def test_physically_pruned_model_equals_the_masked_and_scaled_model(family, task):
    model, sample, labels = setup(family, task, num=40)
    masks = kwon_masks(model, sample, 0.45, labels=labels, device="cpu")
    scaled = [
        m for m, k in zip(masks.masks, masks.keep, strict=True) if k.any() and not torch.equal(m, k.double())
    ]
    assert scaled, "some kept unit must carry a scale != 1, or this test cannot fail"
    result = kwon_prune(model, sample, 0.45, labels=labels, device="cpu")
    assert unit_counts(result.model) == (
        [int(k.sum()) for k in masks.keep[0::2]],
        [int(k.sum()) for k in masks.keep[1::2]],
    )
    with torch.no_grad():
        expected = masked_logits(model, sample, masks.masks)
    torch.testing.assert_close(
        valid_logits(model_logits(result.model, sample), sample),
        valid_logits(expected, sample),
        atol=1e-5,
        rtol=1e-5,
    )
    # And the scales matter: the unscaled selection computes something else.
    with torch.no_grad():
        unscaled = masked_logits(model, sample, [k.double() for k in masks.keep])
    assert not torch.allclose(valid_logits(unscaled, sample), valid_logits(expected, sample), atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_masked_forward_with_unit_masks_is_the_model(family):
    model, sample, _ = setup(family)
    with torch.no_grad():
        ones = masked_logits(model, sample, [None] * len(sublayers(model)))
    torch.testing.assert_close(ones, model_logits(model, sample), atol=1e-5, rtol=1e-5)
    masks = [torch.rand(sub.num_units) * (torch.rand(sub.num_units) < 0.7) for sub in sublayers(model)]
    pruned = copy.deepcopy(model)
    apply_masks(pruned, masks)
    with torch.no_grad():
        torch.testing.assert_close(
            model_logits(pruned, sample), masked_logits(model, sample, masks), atol=1e-5, rtol=1e-5
        )


# ------------------------------------------------------------------------------------------- Fisher


@pytest.mark.parametrize(
    "family,task", [("bert", "classification"), ("roberta", "regression"), ("bert", "qa")]
)
def test_per_example_mask_gradients_equal_single_example_autograd(family, task):
    model, sample, labels = setup(family, task, num=12)
    model.requires_grad_(False)
    batches, label_batches = model_batches(model, sample, 5, torch.device("cpu"), labels)
    gradients = mask_gradients(model, batches, label_batches)
    order = torch.argsort(sample["attention_mask"].sum(1), stable=True)
    for position in (0, 6, 11):
        row = int(order[position])
        length = int(sample["attention_mask"][row].sum())
        single = {name: value[row : row + 1, :length] for name, value in sample.items()}  # no padding at all
        masks = [torch.ones(sub.num_units, requires_grad=True) for sub in sublayers(model)]
        hidden = encoder_input(model, single)
        for sub, mask in zip(sublayers(model), masks, strict=True):
            features = sub.features(hidden, single["attention_mask"]) * mask[None, None, :, None]
            hidden = sub.layer_norm(sub.residual_sum(hidden, features))
        loss = task_loss(
            task_of_name(task), task_logits(model, hidden), labels[row : row + 1], single["attention_mask"]
        )
        expected = torch.autograd.grad(loss.sum(), masks)
        for sublayer, grad in enumerate(expected):
            torch.testing.assert_close(gradients[sublayer][position], grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("task", ["classification", "qa"])
def test_fisher_micro_batches_bound_each_backward_and_change_no_gradient(task, monkeypatch):
    model, sample, labels = setup("bert", task, num=20)
    model.requires_grad_(False)
    batches, label_batches = model_batches(model, sample, 8, torch.device("cpu"), labels)
    whole = mask_gradients(model, batches, label_batches, max_tokens=10**6)
    shapes = []

    def recording(model, batch, masks):
        shapes.append(tuple(batch["input_ids"].shape))
        return masked_logits(model, batch, masks)

    monkeypatch.setattr(fisher, "masked_logits", recording)
    for max_tokens in (1, 25):
        shapes.clear()
        split = mask_gradients(model, batches, label_batches, max_tokens=max_tokens)
        assert sum(rows for rows, _ in shapes) == 20 and len(shapes) > len(batches)
        assert all(rows * length <= max_tokens or rows == 1 for rows, length in shapes)
        for ours, expected in zip(split, whole, strict=True):
            torch.testing.assert_close(ours, expected, atol=1e-6, rtol=1e-5)
    offloaded = mask_gradients(model, batches, label_batches, max_tokens=25, offload=True)
    assert len(offloaded) == len(split)
    assert all(torch.equal(offloaded[index], split[index]) for index in range(len(split)))
    offloaded.close()


def test_offloading_changes_no_result():
    model, sample, labels = setup("bert", num=40)
    in_ram = kwon_masks(model, sample, 0.45, labels=labels, device="cpu", offload=False)
    offloaded = kwon_masks(model, sample, 0.45, labels=labels, device="cpu", offload=True)
    for name in ("masks", "keep", "searched", "target_keep", "fisher"):
        assert all(
            torch.equal(a, b) for a, b in zip(getattr(in_ram, name), getattr(offloaded, name), strict=True)
        )
    assert any(report.status == "rescaled" for report in offloaded.reports)


def task_of_name(task):
    return {"classification": "classification", "regression": "regression", "qa": "question-answering"}[task]


def test_task_loss_matches_transformers_loss():
    for task in ("classification", "regression", "qa"):
        model, sample, labels = setup("bert", task, num=8)
        full = {name: value for name, value in sample.items()}
        if task == "qa":
            # transformers does not mask padding: compare on unpadded sequences of one length
            full = {name: value[:, :3] for name, value in sample.items()}
            labels = labels.clamp(max=2)
            outputs = model(**full, start_positions=labels[:, 0], end_positions=labels[:, 1])
            logits = torch.stack([outputs.start_logits, outputs.end_logits], -1)
        else:
            outputs = model(**full, labels=labels)
            logits = outputs.logits
        ours = task_loss(task_of_name(task), logits, labels, full["attention_mask"]).mean()
        torch.testing.assert_close(ours, outputs.loss)


def test_labels_are_checked_and_read_from_the_sample():
    model, sample, labels = setup("bert", "qa")
    with pytest.raises(ValueError, match="need true labels"):
        kwon_prune(model, sample, 0.5, device="cpu")
    with_positions = {**sample, "start_positions": labels[:, 0], "end_positions": labels[:, 1]}
    assert torch.equal(task_labels(model, with_positions), labels)
    classifier, sample, labels = setup("bert")
    assert torch.equal(task_labels(classifier, {**sample, "labels": labels}), labels)
    with pytest.raises(ValueError, match="class ids"):
        task_labels(classifier, sample, labels.float())
    with pytest.raises(ValueError, match=r"in \[0, 3\)"):
        task_labels(classifier, sample, labels + 3)
    with pytest.raises(ValueError, match="labels for"):
        task_labels(classifier, sample, labels[:-1])


def test_label_batches_follow_the_length_sorted_batches():
    model, sample, _ = setup("bert", num=30)
    index = torch.arange(30)
    batches, label_batches = model_batches(model, sample, 7, torch.device("cpu"), index)
    for batch, rows in zip(batches, label_batches, strict=True):
        length = batch["input_ids"].shape[1]
        assert torch.equal(batch["input_ids"], sample["input_ids"][rows, :length])
        assert torch.equal(batch["attention_mask"], sample["attention_mask"][rows, :length])
    assert sorted(torch.cat(label_batches).tolist()) == list(range(30))


def test_num_samples_takes_a_seeded_subset():
    model, sample, labels = setup("bert", num=40)
    result = kwon_prune(model, sample, 0.5, labels=labels, device="cpu", num_samples=16, seed=1)
    assert result.record.num_sequences == 16
    again = kwon_prune(model, sample, 0.5, labels=labels, device="cpu", num_samples=16, seed=1)
    assert result.record.heads == again.record.heads and result.record.neurons == again.record.neurons
    # The FLOPs model still uses the whole sample's average length, as kprune.prune does.
    assert result.record.seq_len == pytest.approx(average_length(sample))
    with pytest.raises(ValueError, match="flops_keep"):
        KwonConfig(flops_keep=0.0)


# ------------------------------------------------------------------------------------------- magnitude


def test_magnitude_scores_and_ranking_match_a_hand_computation():
    model, sample, _ = setup("bert")
    model.requires_grad_(False)
    seq_len = average_length(sample)
    layers = model.bert.encoder.layer
    d_h = 4
    hand_scores, hand_flops, hand_units = [], [], []
    for number, layer in enumerate(layers):
        attention = layer.attention
        head_magnitudes = []
        for head in range(4):
            rows = slice(head * d_h, (head + 1) * d_h)
            total = 0.0
            for linear in (attention.self.query, attention.self.key, attention.self.value):
                total += float((linear.weight[rows, :] ** 2).sum())
            total += float((attention.output.dense.weight[:, rows] ** 2).sum())
            head_magnitudes.append(total)
            hand_scores.append(total / head_flops(16, d_h, seq_len))
            hand_flops.append(head_flops(16, d_h, seq_len))
            hand_units.append(("head", number, head))
        assert weight_magnitudes(Sublayer(model, 2 * number)).tolist() == pytest.approx(head_magnitudes)
        neuron_magnitudes = []
        for neuron in range(24):
            total = float((layer.intermediate.dense.weight[neuron, :] ** 2).sum())
            total += float((layer.output.dense.weight[:, neuron] ** 2).sum())
            neuron_magnitudes.append(total)
            hand_scores.append(total / neuron_flops(16, seq_len))
            hand_flops.append(neuron_flops(16, seq_len))
            hand_units.append(("neuron", number, neuron))
        assert weight_magnitudes(Sublayer(model, 2 * number + 1)).tolist() == pytest.approx(neuron_magnitudes)

    budget = 0.5 * encoder_flops_of(model, seq_len)
    kept, used = set(), 0.0
    for position in sorted(range(len(hand_scores)), key=lambda i: -hand_scores[i]):
        if used + hand_flops[position] > budget:
            break
        used += hand_flops[position]
        kept.add(hand_units[position])
    result = magnitude_prune(model, sample, 0.5, device="cpu")
    for number in range(2):
        assert result.record.heads[number] == sorted(
            h for kind, n, h in kept if kind == "head" and n == number
        )
        assert result.record.neurons[number] == sorted(
            i for kind, n, i in kept if kind == "neuron" and n == number
        )
    # No tuning: the kept columns are the original ones.
    original = Sublayer(model, 1).output.weight[:, result.record.neurons[0]]
    torch.testing.assert_close(Sublayer(result.model, 1).output.weight, original)


def test_magnitude_needs_only_a_length():
    model, sample, _ = setup("electra")
    with_length = magnitude_prune(model, None, 0.5, seq_len=average_length(sample), device="cpu")
    with_sample = magnitude_prune(model, sample, 0.5, device="cpu")
    assert with_length.record.heads == with_sample.record.heads
    with pytest.raises(ValueError, match="seq_len"):
        magnitude_prune(model, None, 0.5)


def test_baseline_results_save_and_load(tmp_path):
    model, sample, labels = setup("distilbert")
    for name, result in (
        ("kwon", kwon_prune(model, sample, 0.4, labels=labels, device="cpu")),
        ("magnitude", magnitude_prune(model, sample, 0.4, device="cpu")),
    ):
        kprune.save_pruned(result.model, tmp_path / name, record=result.record)
        loaded = kprune.load_pruned(tmp_path / name)
        torch.testing.assert_close(model_logits(loaded, sample), model_logits(result.model, sample))
