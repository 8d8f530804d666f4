import random

import pytest
import torch

from kprune.search import search_mask


def brute_force_prefix_mask(scores: list[float], costs: list[float], budget: float) -> list[bool]:
    """Try every prefix of the ranking (score descending, ties by lower index); keep the largest that fits."""
    ranking = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    best: set[int] = set()
    for length in range(len(ranking) + 1):
        prefix = ranking[:length]
        if sum(costs[i] for i in prefix) <= budget and len(prefix) >= len(best):
            best = set(prefix)
    return [i in best for i in range(len(scores))]


def test_matches_brute_force_over_prefixes_with_mixed_costs_and_ties():
    rng = random.Random(0)
    for case in range(2000):
        n = rng.randint(1, 10) if case % 20 else rng.randint(50, 200)  # long runs of ties need a stable sort
        # small integer scores make ties frequent; heads cost 7, neurons cost 2
        scores = [float(rng.randint(0, 4)) for _ in range(n)]
        costs = [rng.choice([7.0, 2.0]) for _ in range(n)]
        budget = rng.choice([rng.uniform(0, 1.1 * sum(costs)), float(rng.randint(0, int(sum(costs))))])
        keep = search_mask(torch.tensor(scores), torch.tensor(costs), budget)
        assert keep.tolist() == brute_force_prefix_mask(scores, costs, budget), (scores, costs, budget)


def test_equal_costs_give_the_exhaustive_optimum_over_all_subsets():
    for seed in range(300):
        generator = torch.Generator().manual_seed(seed)
        n = int(torch.randint(1, 11, (), generator=generator))
        scores = torch.rand(n, generator=generator, dtype=torch.float64)
        cost = 3.0
        budget = float(torch.rand((), generator=generator, dtype=torch.float64)) * cost * (n + 1)
        subsets = (torch.arange(2**n)[:, None] >> torch.arange(n)) & 1 == 1  # (2^n, n)
        feasible = subsets.sum(dim=1) * cost <= budget
        subset_scores = subsets.double() @ scores
        subset_scores[~feasible] = -1.0
        best = subsets[subset_scores.argmax()]

        keep = search_mask(scores, torch.full((n,), cost), budget)
        assert torch.equal(keep, best), seed  # distinct continuous scores: the optimum is unique
        assert float(scores[keep].sum()) == pytest.approx(float(subset_scores.max()))


def test_kept_flops_fit_and_the_prefix_is_maximal():
    for seed in range(300):
        generator = torch.Generator().manual_seed(seed)
        n = int(torch.randint(1, 300, (), generator=generator))
        scores = torch.randn(n, generator=generator)
        costs = torch.rand(n, generator=generator, dtype=torch.float64) * 100 + 0.01
        budget = float(torch.rand((), generator=generator)) * float(costs.sum()) * 1.2
        keep = search_mask(scores, costs, budget)

        assert keep.dtype == torch.bool and keep.shape == scores.shape
        assert float(costs[keep].sum()) <= budget * (1 + 1e-9)
        if keep.any() and (~keep).any():
            assert scores[keep].min() >= scores[~keep].max()  # a score threshold
        if (~keep).any():
            dropped = (~keep).nonzero().squeeze(1)
            next_unit = dropped[scores[dropped].argmax()]  # argmax returns the first (lowest-index) maximum
            assert float(costs[keep].sum() + costs[next_unit]) > budget  # the next ranked unit does not fit


def test_budget_zero_keeps_nothing_and_budget_total_keeps_all():
    scores = torch.tensor([0.3, 0.1, 0.2])
    costs = torch.tensor([7.0, 2.0, 2.0])
    assert search_mask(scores, costs, 0.0).tolist() == [False, False, False]
    assert search_mask(scores, costs, 11.0).tolist() == [True, True, True]
    assert search_mask(scores, costs, 1e9).tolist() == [True, True, True]
    assert search_mask(torch.zeros(0), torch.zeros(0), 5.0).tolist() == []


def test_round_off_in_the_cumulative_sum_does_not_drop_a_unit_that_fits():
    costs = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)  # cumsum ends at 0.6000000000000001
    assert search_mask(torch.tensor([3.0, 2.0, 1.0]), costs, 0.6).tolist() == [True, True, True]


def test_ties_are_broken_by_lower_index():
    scores = torch.tensor([1.0, 2.0, 2.0, 1.0])
    costs = torch.ones(4)
    assert search_mask(scores, costs, 1).tolist() == [False, True, False, False]
    assert search_mask(scores, costs, 3).tolist() == [True, True, True, False]


def test_ranking_stops_at_the_first_unit_that_does_not_fit():
    # unit 2 alone would fit after unit 0, but unit 1 ranks higher and does not: a threshold, not a knapsack
    keep = search_mask(torch.tensor([3.0, 2.0, 1.0]), torch.tensor([1.0, 5.0, 1.0]), 2.0)
    assert keep.tolist() == [True, False, False]


@pytest.mark.parametrize(
    ("scores", "costs", "budget", "message"),
    [
        (torch.ones(2, 2), torch.ones(2, 2), 1.0, "1-D"),
        (torch.ones(3), torch.ones(2), 1.0, "same length"),
        (torch.tensor([1.0, float("nan")]), torch.ones(2), 1.0, "NaN"),
        (torch.ones(2), torch.tensor([1.0, 0.0]), 1.0, "> 0"),
        (torch.ones(2), torch.tensor([1.0, -2.0]), 1.0, "> 0"),
        (torch.ones(2), torch.tensor([1.0, float("inf")]), 1.0, "finite"),
        (torch.ones(2), torch.ones(2), -1.0, "budget"),
        (torch.ones(2), torch.ones(2), float("nan"), "budget"),
    ],
)
def test_bad_inputs_raise(scores, costs, budget, message):
    with pytest.raises(ValueError, match=message):
        search_mask(scores, costs, budget)
