import logging

import numpy as np
import pytest
import torch

from kprune.tune import (
    LeastSquaresStats,
    TuneReport,
    check_sequences,
    ridge_towards,
    ridged,
    solve_output_projection,
    solve_towards_current,
)

ZERO_WEIGHT = torch.zeros(5, 8, dtype=torch.float64)  # (d, k) of random_problem's default sizes


def random_problem(seed: int, n: int = 300, k: int = 8, d: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(n, k, generator=generator, dtype=torch.float64)
    target = features @ torch.randn(k, d, generator=generator, dtype=torch.float64)
    target += 0.3 * torch.randn(n, d, generator=generator, dtype=torch.float64)  # not exactly reachable
    return features, target


def stats_of(features: torch.Tensor, target: torch.Tensor) -> LeastSquaresStats:
    stats = LeastSquaresStats(features.shape[1], target.shape[1])
    stats.add(features, target)
    return stats


def direct_error(features: torch.Tensor, weight: torch.Tensor, target: torch.Tensor) -> float:
    return float((features.double() @ weight.double().T - target.double()).square().sum())


def lstsq_minimum_error(features: torch.Tensor, target: torch.Tensor) -> float:
    """min_W ||F W^T - R||^2 by numpy's SVD-based lstsq (its residuals are empty for rank-deficient F)."""
    solution = np.linalg.lstsq(features.numpy(), target.numpy(), rcond=None)[0]
    return direct_error(features, torch.from_numpy(solution.T.copy()), target)


def exact_sums(features: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    f, r = features.double(), target.double()
    return f.T @ f, f.T @ r, float(r.square().sum())


# (rows summed before a flush, narrowest Gram strip, rows cast at a time in a flush): with 8 features, one
# strip of 8, four of 2, 3+3+2; flushed in blocks of 8, 3+3+2, 1 or 5+3 rows
SUMMATIONS = [(1, 256, 64), (50, 2, 3), (4096, 3, 1), (50, 256, 5)]


@pytest.fixture(params=SUMMATIONS, ids=lambda sizes: "pending{}-strip{}-flush{}".format(*sizes))
def summation(request, monkeypatch):
    pending_rows, strip_width, flush_rows = request.param
    monkeypatch.setattr(LeastSquaresStats, "PENDING_ROWS", pending_rows)
    monkeypatch.setattr(LeastSquaresStats, "MIN_STRIP_WIDTH", strip_width)
    monkeypatch.setattr(LeastSquaresStats, "FLUSH_ROWS", flush_rows)


def test_float64_rows_are_summed_in_float64(summation):
    # Entries 1 + 1e-9 x: a float32 sum anywhere would round the 1e-9 parts away (relative error ~1e-8).
    features, target = random_problem(0, n=100)
    features = 1 + 1e-9 * features
    stats = LeastSquaresStats(8, 5)
    for start in range(0, 100, 30):
        stats.add(features[start : start + 30], target[start : start + 30])
    gram, cross, target_sq = exact_sums(features, target)
    assert stats.gram.dtype == stats.cross.dtype == torch.float64
    torch.testing.assert_close(stats.gram, gram, rtol=1e-14, atol=0)
    torch.testing.assert_close(stats.cross, cross, rtol=1e-12, atol=1e-12)
    assert stats.target_sq == pytest.approx(target_sq, rel=1e-14)
    assert stats.num_rows == 100


def test_lower_precision_rows_are_summed_in_float32_within_a_pending_group(summation):
    features, target = random_problem(1, n=100)
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.double]
    batches = list(zip([0, 30, 55, 56], [30, 55, 56, 100], dtypes, strict=True))
    stats = LeastSquaresStats(8, 5)
    cast_features, cast_target = [], []
    for start, stop, dtype in batches:
        f, r = features[start:stop].to(dtype), target[start:stop].to(dtype)
        stats.add(f, r)
        cast_features.append(f.double())
        cast_target.append(r.double())
        if start == 30:  # a read in between flushes the pending sums; later rows still count
            assert stats.num_rows == 55 and stats.gram.shape == (8, 8)
    gram, cross, target_sq = exact_sums(torch.cat(cast_features), torch.cat(cast_target))
    # float32 round-off over at most a pending group's rows (a bfloat16 sum would miss by ~1e-3)
    torch.testing.assert_close(stats.gram, gram, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats.cross, cross, rtol=1e-5, atol=1e-5)
    assert stats.target_sq == pytest.approx(target_sq, rel=1e-6)
    assert stats.num_rows == 100


def test_add_rejects_wrong_shapes():
    stats = LeastSquaresStats(3, 2)
    with pytest.raises(ValueError, match="features"):
        stats.add(torch.zeros(4, 2), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="target"):
        stats.add(torch.zeros(4, 3), torch.zeros(5, 2))


def test_error_from_stats_equals_direct_error():
    features, target = random_problem(1)
    weight = torch.randn(5, 8, generator=torch.Generator().manual_seed(2))
    stats = stats_of(features, target)
    assert stats.error(weight) == pytest.approx(direct_error(features, weight, target), rel=1e-10)
    assert stats.error(torch.zeros(5, 8)) == pytest.approx(float(target.square().sum()), rel=1e-12)


def test_select_with_bool_mask_and_indices_matches_sliced_features():
    features, target = random_problem(3)
    stats = stats_of(features, target)
    keep = torch.tensor([True, False, True, True, False, False, True, False])
    expected = stats_of(features[:, keep], target)
    for selector in (keep, keep.nonzero().squeeze(1)):
        selected = stats.select(selector)
        torch.testing.assert_close(selected.gram, expected.gram)
        torch.testing.assert_close(selected.cross, expected.cross)
        assert selected.target_sq == stats.target_sq and selected.num_rows == stats.num_rows
    with pytest.raises(ValueError, match="bool keep mask"):
        stats.select(torch.tensor([True, False]))


def test_ridge_zero_equals_numpy_lstsq():
    features, target = random_problem(4)
    expected = np.linalg.lstsq(features.numpy(), target.numpy(), rcond=None)[0].T  # (d, k)
    weight, report = solve_output_projection(stats_of(features, target), ZERO_WEIGHT, 0.0)
    np.testing.assert_allclose(weight.numpy(), expected, rtol=0, atol=1e-8)
    assert report.solver == "cholesky" and report.ridge == 0.0 and not report.kept_current_weight
    assert report.error_after == pytest.approx(direct_error(features, weight, target), rel=1e-9)


def test_relative_ridge_equals_explicit_regularised_solution():
    features, target = random_problem(5)
    gram = features.T @ features
    lam = 0.1 * float(gram.diagonal().mean())
    expected = torch.linalg.solve(gram + lam * torch.eye(8, dtype=torch.float64), features.T @ target).T
    weight, report = solve_output_projection(stats_of(features, target), ZERO_WEIGHT, 0.1)
    torch.testing.assert_close(weight, expected, rtol=0, atol=1e-10)
    assert report.ridge == pytest.approx(lam)


def test_tuning_lowers_the_error_of_a_non_optimal_weight_and_keeps_dtype_and_device():
    features, target = random_problem(6)
    stats = stats_of(features, target)
    current = torch.randn(5, 8, generator=torch.Generator().manual_seed(7)).float()
    weight, report = solve_output_projection(stats, current)
    assert weight.dtype == torch.float32 and weight.device == current.device and weight.shape == (5, 8)
    assert report.error_before == pytest.approx(direct_error(features, current, target), rel=1e-9)
    assert report.error_after == pytest.approx(direct_error(features, weight, target), rel=1e-9)
    assert report.error_after < 0.5 * report.error_before
    assert report.target_norm == pytest.approx(float(target.square().sum()))
    assert report.relative_error_after == pytest.approx(report.error_after / report.target_norm)
    assert report.relative_error_before > report.relative_error_after > 0


def test_optimal_current_weight_is_kept_with_a_warning_when_the_ridge_would_worsen_it(caplog):
    features, target = random_problem(8)
    optimum = torch.from_numpy(np.linalg.lstsq(features.numpy(), target.numpy(), rcond=None)[0].T.copy())
    with caplog.at_level(logging.WARNING, logger="kprune.tune"):
        weight, report = solve_output_projection(stats_of(features, target), optimum, ridge=0.1)
    assert torch.equal(weight, optimum)
    assert report.kept_current_weight and report.error_after == report.error_before
    assert "keeping the current weight" in caplog.text


def test_ridged_adds_lam_to_the_diagonal_exactly_and_leaves_the_gram_alone():
    features, _ = random_problem(12)
    gram = features.T @ features
    before = gram.clone()
    system = ridged(gram, 0.37)
    assert torch.equal(system, gram + 0.37 * torch.eye(len(gram), dtype=gram.dtype))
    assert torch.equal(gram, before)


def test_rank_deficient_features_fall_back_to_lstsq_with_the_minimum_error(caplog):
    features, target = random_problem(9, k=6)
    features = torch.cat([features, features[:, :2]], dim=1)  # columns 6, 7 duplicate columns 0, 1
    minimum_error = lstsq_minimum_error(features, target)
    with caplog.at_level(logging.WARNING, logger="kprune.tune"):
        weight, report = solve_output_projection(stats_of(features, target), ZERO_WEIGHT, ridge=0.0)
    assert report.solver == "lstsq" and "falling back to lstsq" in caplog.text
    assert not report.kept_current_weight
    assert torch.isfinite(weight).all()
    assert direct_error(features, weight, target) == pytest.approx(minimum_error, rel=1e-8)
    assert report.error_after == pytest.approx(minimum_error, rel=1e-8)


def test_rank_deficient_features_with_ridge_use_cholesky():
    features, target = random_problem(10, k=6)
    features = torch.cat([features, features[:, :2]], dim=1)
    minimum_error = lstsq_minimum_error(features, target)
    weight, report = solve_output_projection(stats_of(features, target), ZERO_WEIGHT)
    assert report.solver == "cholesky" and torch.isfinite(weight).all()
    assert report.error_after == pytest.approx(minimum_error, rel=1e-3)


def test_all_zero_features_leave_the_target_as_error():
    target = torch.randn(20, 3, generator=torch.Generator().manual_seed(11))
    stats = stats_of(torch.zeros(20, 4), target)
    weight, report = solve_output_projection(stats, torch.zeros(3, 4))
    assert torch.isfinite(weight).all()
    assert report.ridge == 0.0 and report.error_after == pytest.approx(float(target.double().square().sum()))


def test_no_kept_features_returns_empty_weight():
    features, target = random_problem(12)
    stats = stats_of(features, target).select(torch.zeros(8, dtype=torch.bool))
    weight, report = solve_output_projection(stats, torch.zeros(5, 0))
    assert weight.shape == (5, 0)
    norm = float(target.square().sum())
    assert report.error_before == pytest.approx(norm) and report.error_after == pytest.approx(norm)
    assert report.target_norm == pytest.approx(norm) and report.relative_error_after == pytest.approx(1.0)


def test_relative_errors_are_zero_safe():
    report = TuneReport(error_before=0.0, error_after=0.0, target_norm=0.0, ridge=0.0, solver="cholesky")
    assert report.relative_error_before == 0.0 and report.relative_error_after == 0.0


def test_bad_arguments_raise():
    stats = stats_of(*random_problem(13))
    with pytest.raises(ValueError, match="weight must have shape"):
        solve_output_projection(stats, torch.zeros(8, 5))
    with pytest.raises(ValueError, match="ridge"):
        solve_output_projection(stats, torch.zeros(5, 8), ridge=-1.0)


def test_exact_reconstruction_is_not_resolved(caplog):
    features = torch.randn(50, 4, dtype=torch.float64)
    weight = torch.randn(3, 4, dtype=torch.float64)
    with caplog.at_level(logging.WARNING, logger="kprune.tune"):
        tuned, report = solve_output_projection(stats_of(features, features @ weight.T), weight, ridge=0.1)
    assert torch.equal(tuned, weight) and report.solver == "exact" and caplog.text == ""


STRENGTHS = (1e-3, 1e-2, 1e-1, 1.0, 10.0)


def explicit_ridge_towards(features, target, current, strength):
    """(G + lam I)^-1 (C + lam W0^T) by a dense solve, lam = strength * mean(diag(G))."""
    gram = features.T @ features
    lam = strength * float(gram.diagonal().mean())
    system = gram + lam * torch.eye(gram.shape[0], dtype=torch.float64)
    return torch.linalg.solve(system, features.T @ target + lam * current.T).T


def test_ridge_towards_the_current_weight_equals_dense_solves_and_tends_to_it():
    features, target = random_problem(20)
    current = torch.randn(5, 8, generator=torch.Generator().manual_seed(21), dtype=torch.float64)
    solutions = list(ridge_towards(stats_of(features, target), current, (*STRENGTHS, 1e9)))
    for strength, solution in zip(STRENGTHS, solutions, strict=False):
        expected = explicit_ridge_towards(features, target, current, strength)
        torch.testing.assert_close(solution, expected, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(solutions[-1], current, rtol=0, atol=1e-6)  # infinite strength: W0 itself


def split_problem():
    """A random least-squares problem, its current weight, and its rows split into fit and check parts."""
    features, target = random_problem(22, n=60, k=8)
    current = torch.randn(5, 8, generator=torch.Generator().manual_seed(23), dtype=torch.float64)
    check = check_sequences(60, 0.25, seed=0)
    fit_stats = stats_of(features[~check], target[~check])
    check_stats = stats_of(features[check], target[check])
    return features, target, current, check, fit_stats, check_stats


def test_the_check_part_chooses_the_strength_and_the_whole_sample_refits_at_it():
    features, target, current, check, fit_stats, check_stats = split_problem()
    weight, report = solve_towards_current(fit_stats, check_stats, current, STRENGTHS)
    # Brute force: each strength's fit-part solution, judged on the check rows directly.
    errors = [
        direct_error(
            features[check],
            explicit_ridge_towards(features[~check], target[~check], current, s),
            target[check],
        )
        for s in STRENGTHS
    ]
    best = int(np.argmin(errors))
    assert report.strength == STRENGTHS[best]
    assert report.check_error_after == pytest.approx(errors[best], rel=1e-9)
    assert report.check_error_before == pytest.approx(direct_error(features[check], current, target[check]))
    assert report.check_error_after < report.check_error_before
    torch.testing.assert_close(weight, explicit_ridge_towards(features, target, current, STRENGTHS[best]))
    assert report.error_after == pytest.approx(direct_error(features, weight, target), rel=1e-9)
    assert report.error_after <= report.error_before


def test_a_given_check_loss_replaces_the_check_error_as_the_criterion():
    features, target, current, _, fit_stats, check_stats = split_problem()
    candidates = list(ridge_towards(fit_stats, current, STRENGTHS))
    errors = [check_stats.error(w) for w in candidates]
    wanted = (int(np.argmin(errors)) + 1) % len(STRENGTHS)  # a strength the check error would not choose
    candidate = candidates[wanted]

    def distance_to(weight):
        return lambda w: float((w.double() - weight).norm())

    weight, report = solve_towards_current(fit_stats, check_stats, current, STRENGTHS, distance_to(candidate))
    assert report.strength == STRENGTHS[wanted]
    assert report.check_error_after == pytest.approx(0.0, abs=1e-9)
    assert report.check_error_before == pytest.approx(float((current - candidate).norm()))
    torch.testing.assert_close(weight, explicit_ridge_towards(features, target, current, STRENGTHS[wanted]))
    # A loss that the current weight minimises: no tuning, though every fit lowers the check error.
    assert min(errors) < check_stats.error(current)
    weight, report = solve_towards_current(fit_stats, check_stats, current, STRENGTHS, distance_to(current))
    assert torch.equal(weight, current) and report.strength is None and report.kept_current_weight


def test_no_tuning_wins_when_the_current_weight_is_better_on_the_check_part():
    # Few noisy rows and the current weight is the truth: any fit overfits the noise of its part.
    generator = torch.Generator().manual_seed(24)
    features = torch.randn(12, 8, generator=generator, dtype=torch.float64)
    truth = torch.randn(5, 8, generator=generator, dtype=torch.float64)
    target = features @ truth.T + 3.0 * torch.randn(12, 5, generator=generator, dtype=torch.float64)
    check = check_sequences(12, 0.5, seed=1)
    fit_stats, check_stats = (
        stats_of(features[~check], target[~check]),
        stats_of(features[check], target[check]),
    )
    weight, report = solve_towards_current(fit_stats, check_stats, truth, (1e-4, 1e-3))
    errors = [
        direct_error(
            features[check], explicit_ridge_towards(features[~check], target[~check], truth, s), target[check]
        )
        for s in (1e-4, 1e-3)
    ]
    assert min(errors) >= direct_error(features[check], truth, target[check])  # the case is what it claims
    assert torch.equal(weight, truth) and report.strength is None and report.kept_current_weight
    assert report.check_error_after == report.check_error_before
    assert report.error_after == report.error_before


def test_check_sequences_are_a_seeded_share_with_both_parts_non_empty():
    check = check_sequences(100, 0.2, seed=5)
    assert int(check.sum()) == 20 and torch.equal(check, check_sequences(100, 0.2, seed=5))
    assert not torch.equal(check, check_sequences(100, 0.2, seed=6))
    assert (
        int(check_sequences(2, 0.01, seed=0).sum()) == 1 and int(check_sequences(2, 0.99, seed=0).sum()) == 1
    )
    with pytest.raises(ValueError, match="check fraction"):
        check_sequences(10, 1.0, seed=0)


def test_stats_of_two_parts_add_up_to_the_whole():
    features, target = random_problem(25)
    total = stats_of(features[:100], target[:100]) + stats_of(features[100:], target[100:])
    whole = stats_of(features, target)
    torch.testing.assert_close(total.gram, whole.gram)
    torch.testing.assert_close(total.cross, whole.cross)
    assert total.target_sq == pytest.approx(whole.target_sq) and total.num_rows == whole.num_rows
