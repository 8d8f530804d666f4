"""Knowledge measurement against brute force: full Jacobians, autograd Hessians of the real loss, hooks."""

import pytest
import torch
import torch.nn.functional as F
from tiny import model_inputs, tiny_model, tiny_sample
from torch.overrides import TorchFunctionMode

from kprune.arch import encoder_input, task_logits, task_of
from kprune.knowledge import (
    Knowledge,
    knowledge_scales,
    loss_hessian_factor,
    measure_knowledge,
    micro_batches,
    unit_scores,
)
from kprune.knowledge import distillation_loss as distillation_loss_lib
from kprune.models import model_logits
from kprune.sublayer import sublayers

T = 2.0


def distillation_loss(task, logits, teacher_logits, valid):
    """Per-example loss of one example, written directly from its definition."""
    if task == "regression":
        return (logits - teacher_logits).pow(2).mean()
    if task == "classification":
        return T**2 * F.kl_div(
            F.log_softmax(logits / T, -1), F.softmax(teacher_logits / T, -1), reduction="sum"
        )
    start, end = (
        T**2
        * F.kl_div(
            F.log_softmax(logits[valid, i] / T, -1),
            F.softmax(teacher_logits[valid, i] / T, -1),
            reduction="sum",
        )
        for i in (0, 1)
    )
    return 0.5 * (start + end)


def masked_logits(model, hidden, attention_mask, masks):
    for sub, mask in zip(sublayers(model), masks, strict=True):
        features = sub.features(hidden, attention_mask) * mask[None, None, :, None]
        hidden = sub.layer_norm(sub.residual_sum(hidden, features))
    return task_logits(model, hidden)


def brute_force_predictive(model, sample, task):
    """0.5 * mean over examples of diag(J^T H J): J a full Jacobian, H autograd's Hessian of the loss."""
    subs = sublayers(model)
    sizes = [sub.num_units for sub in subs]
    with torch.no_grad():
        teacher = model_logits(model, sample)
        hidden = encoder_input(model, sample)
    total = torch.zeros(sum(sizes), dtype=torch.float64)
    for b in range(hidden.shape[0]):
        mask_b = sample["attention_mask"][b : b + 1]
        valid = mask_b[0].bool()

        def logits_of(flat_masks, hidden_b=hidden[b : b + 1], mask_b=mask_b):
            return masked_logits(model, hidden_b, mask_b, torch.split(flat_masks, sizes))[0]

        ones = torch.ones(sum(sizes))
        jacobian = torch.autograd.functional.jacobian(logits_of, ones).reshape(-1, sum(sizes)).double()
        teacher_b = teacher[b].double()
        hessian = torch.autograd.functional.hessian(
            lambda z, t=teacher_b, v=valid: distillation_loss(task, z.view_as(t), t, v), teacher_b.flatten()
        )
        total += ((jacobian.T @ hessian) * jacobian.T).sum(1)
    return torch.split(0.5 * total / hidden.shape[0], sizes)


def measure_all(model, sample, projections=8, seed=0):
    with torch.no_grad():
        teacher = model_logits(model, sample)
        hidden = encoder_input(model, sample)
    return measure_knowledge(
        model,
        sublayers(model),
        [hidden],
        [sample["attention_mask"]],
        [teacher],
        task_of(model),
        temperature=T,
        projections=projections,
        generator=torch.Generator().manual_seed(seed),
    )


@pytest.mark.parametrize(
    "family,task,labels",
    [
        ("bert", "classification", 2),
        ("bert", "classification", 4),
        ("distilbert", "classification", 3),
        ("roberta", "regression", 1),
    ],
)
def test_predictive_knowledge_equals_brute_force(family, task, labels):
    model = tiny_model(family, task, num_labels=labels)
    sample = model_inputs(model, tiny_sample(num=6))
    expected = brute_force_predictive(model, sample, task)
    for known, exact in zip(measure_all(model, sample), expected, strict=True):
        torch.testing.assert_close(known.predictive, exact, rtol=1e-4, atol=1e-9)


def test_qa_predictive_knowledge_is_unbiased():
    model = tiny_model("bert", "qa")
    sample = tiny_sample(num=4, max_len=8)
    expected = torch.cat(brute_force_predictive(model, sample, "qa"))
    estimate = torch.cat([k.predictive for k in measure_all(model, sample, projections=3000)])
    torch.testing.assert_close(estimate, expected, rtol=0.15, atol=1e-6 * float(expected.max()))


def test_predictive_knowledge_is_nonzero_when_student_equals_teacher():
    """At iteration 0 the KL gradient is exactly zero (the reference code's predictive knowledge vanishes),
    but the Fisher is not, and 0.5 F_ii predicts the KL growth of shrinking a mask:
    KL(1 - eps) ~ 0.5 eps^2 F_ii."""
    model = tiny_model("bert", "classification", num_labels=3).double()
    sample = tiny_sample(num=8)
    knowledge = measure_all(model, sample)
    with torch.no_grad():
        teacher = model_logits(model, sample)
        hidden = encoder_input(model, sample)
    sizes = [sub.num_units for sub in sublayers(model)]

    def mean_kl(flat_masks):
        logits = masked_logits(model, hidden, sample["attention_mask"], torch.split(flat_masks, sizes))
        loss = T**2 * F.kl_div(F.log_softmax(logits / T, -1), F.softmax(teacher / T, -1), reduction="sum")
        return loss / hidden.shape[0]

    ones = torch.ones(sum(sizes), dtype=torch.float64, requires_grad=True)
    (gradient,) = torch.autograd.grad(mean_kl(ones), ones)
    assert gradient.abs().max() < 1e-10
    predictive = torch.cat([k.predictive for k in knowledge])
    assert (predictive > 0).all()
    eps = 1e-3
    for unit in [0, sizes[0] + 5, sum(sizes) - 1]:
        shrunk = torch.ones(sum(sizes), dtype=torch.float64)
        shrunk[unit] = 1 - eps
        with torch.no_grad():
            growth = mean_kl(shrunk)
        torch.testing.assert_close(growth / eps**2, predictive[unit], rtol=1e-2, atol=0)


def hooked_output_inputs(model, sample):
    """The HF model's own input of every sublayer's output projection, (B, S, units * width)."""
    captured = {}
    handles = [
        sub.output.register_forward_pre_hook(lambda m, args, i=sub.index: captured.__setitem__(i, args[0]))
        for sub in sublayers(model)
    ]
    with torch.no_grad():
        model(**sample)
    for handle in handles:
        handle.remove()
    return captured


def expected_representational(sub, inputs, rows):
    x = inputs[rows]  # (rows, units * width)
    per_feature = x.pow(2).sum(0) * sub.output.weight.pow(2).sum(0) / sub.output.out_features
    return (per_feature.view(sub.num_units, sub.width).sum(1) / rows.sum()).double()


def test_representational_knowledge_equals_hooked_computation():
    model = tiny_model("electra")
    sample = tiny_sample(num=10)
    captured = hooked_output_inputs(model, sample)
    valid = sample["attention_mask"].bool()
    for known, sub in zip(measure_all(model, sample), sublayers(model), strict=True):
        expected = expected_representational(sub, captured[sub.index], valid)
        torch.testing.assert_close(known.representational, expected, rtol=1e-4, atol=1e-10)


@pytest.mark.parametrize(
    "family,task,start",
    [("bert", "classification", 0), ("distilbert", "classification", 2), ("roberta", "regression", 3)],
)
def test_first_token_knowledge_is_the_mean_over_first_tokens_only(family, task, start):
    """From sublayer ``start`` up (the last layer's attention, its FFN alone, or the whole model): the
    forward above the last layer's input carries the first token alone, and gives the predictive
    knowledge of the full forward."""
    model = tiny_model(family, task)
    sample = model_inputs(model, tiny_sample(num=10))
    captured = hooked_output_inputs(model, sample)
    subs = sublayers(model)
    first_token_only = [False, False, True, True][start:]  # the last layer's two sublayers
    with torch.no_grad():
        teacher, hidden = model_logits(model, sample), encoder_input(model, sample)
        for sub in subs[:start]:
            hidden = sub.forward(hidden, sample["attention_mask"])

    def measure(first):
        return measure_knowledge(
            model, subs[start:], [hidden], [sample["attention_mask"]], [teacher], task,
            temperature=T, first_token_only=first,
        )  # fmt: skip

    first = torch.zeros_like(sample["attention_mask"], dtype=torch.bool)
    first[:, 0] = True
    everywhere = measure([False] * len(first_token_only))
    last_ffn_inputs = []
    hook = subs[-1].part("ffn_up").register_forward_pre_hook(lambda m, args: last_ffn_inputs.append(args[0]))
    measured = measure(first_token_only)
    hook.remove()
    assert [tuple(inputs.shape[:2]) for inputs in last_ffn_inputs] == [(len(hidden), 1)]
    for known, full, sub, only_first in zip(
        measured, everywhere, subs[start:], first_token_only, strict=True
    ):
        rows = first if only_first else sample["attention_mask"].bool()
        expected = expected_representational(sub, captured[sub.index], rows)
        torch.testing.assert_close(known.representational, expected, rtol=1e-4, atol=1e-10)
        # The predictive term is the same: the head already reads the first token only.
        torch.testing.assert_close(known.predictive, full.predictive)


def test_first_token_only_must_be_the_top_sublayers():
    model = tiny_model("bert")
    sample = tiny_sample(num=4)
    with torch.no_grad():
        teacher, hidden = model_logits(model, sample), encoder_input(model, sample)
    with pytest.raises(ValueError, match="top sublayers"):
        measure_knowledge(
            model, sublayers(model), [hidden], [sample["attention_mask"]], [teacher], "classification",
            first_token_only=[False, True, False, True],
        )  # fmt: skip


def test_hessian_factor_reproduces_the_loss_hessian():
    logits = torch.randn(5, 4, dtype=torch.float64)
    factor = loss_hessian_factor("classification", logits, torch.ones(5, 1), T, projections=8)
    assert factor.shape == (5, 3, 4)
    for b in range(5):
        hessian = torch.autograd.functional.hessian(
            lambda z, teacher=logits[b]: distillation_loss("classification", z, teacher, None), logits[b]
        )
        torch.testing.assert_close(factor[b].T @ factor[b], hessian)


def test_scores_are_knowledge_per_flop_with_head_weight():
    known = Knowledge(predictive=torch.tensor([2.0, 0.0]), representational=torch.tensor([0.0, 4.0]))
    torch.testing.assert_close(
        unit_scores(known, 10.0, is_head=False, lam_pred=1.0, lam_rep=0.5), torch.tensor([0.2, 0.2])
    )
    torch.testing.assert_close(
        unit_scores(known, 10.0, is_head=True, lam_pred=1.0, lam_rep=0.5, mu=3.0), torch.tensor([0.6, 0.6])
    )


def test_mean_scales_make_each_term_average_one_over_the_candidates():
    known = [
        Knowledge(predictive=torch.tensor([2.0, 4.0]), representational=torch.tensor([100.0, 300.0])),
        Knowledge(predictive=torch.tensor([0.0, 6.0, 8.0]), representational=torch.tensor([0.0, 0.0, 100.0])),
    ]
    assert knowledge_scales(known, "raw") == (1.0, 1.0)
    assert knowledge_scales(known, "mean") == pytest.approx((4.0, 100.0))  # 20 / 5 and 500 / 5
    zero = [Knowledge(predictive=torch.zeros(3), representational=torch.tensor([1.0, 2.0, 3.0]))]
    assert knowledge_scales(zero, "mean") == pytest.approx((1.0, 2.0))  # a zero mean leaves its term
    # Scaled scores: lam_rep weighs the two terms on equal footing (here 1 * 4/4 + 0.5 * 300/100 = 2.5).
    scores = unit_scores(known[0], 10.0, is_head=False, lam_rep=0.5, scales=(4.0, 100.0))
    torch.testing.assert_close(scores, torch.tensor([0.1, 0.25]))
    with pytest.raises(ValueError, match="scale"):
        knowledge_scales(known, "median")


@pytest.mark.parametrize("task", ["classification", "regression", "qa"])
def test_library_loss_matches_its_definition(task):
    model = tiny_model("bert", task)
    sample = tiny_sample(num=5)
    with torch.no_grad():
        teacher = model_logits(model, sample)
    student = teacher + 0.3 * torch.randn_like(teacher)
    losses = distillation_loss_lib(task_of(model), student, teacher, sample["attention_mask"], T)
    for b in range(5):
        valid = sample["attention_mask"][b].bool()
        expected = distillation_loss(task, student[b], teacher[b], valid)
        torch.testing.assert_close(losses[b], expected)


def test_reference_batch_gradient_knowledge_vanishes_at_the_teacher_and_matches_its_definition():
    model = tiny_model("bert", "classification", num_labels=3).double()
    sample = tiny_sample(num=8)
    with torch.no_grad():
        teacher = model_logits(model, sample)
        hidden = encoder_input(model, sample)
    subs, mask = sublayers(model), [sample["attention_mask"]]

    def reference(teacher_logits):
        known = measure_knowledge(
            model, subs, [hidden], mask, [teacher_logits], "classification", T, predictive="batch-gradient"
        )
        return torch.cat([k.predictive for k in known])

    assert reference(teacher).abs().max() < 1e-20
    shifted = teacher + torch.randn_like(teacher)  # a student that differs from its teacher
    sizes = [sub.num_units for sub in subs]
    ones = torch.ones(sum(sizes), dtype=torch.float64, requires_grad=True)
    logits = masked_logits(model, hidden, sample["attention_mask"], torch.split(ones, sizes))
    loss = sum(distillation_loss("classification", logits[b], shifted[b], None) for b in range(8)) / 8
    (gradient,) = torch.autograd.grad(loss, ones)
    torch.testing.assert_close(reference(shifted), 0.5 * gradient.pow(2) / 8)


@pytest.mark.parametrize("predictive", ["fisher", "batch-gradient"])
def test_micro_batches_do_not_change_the_knowledge(predictive):
    """One row per backward pass (max_tokens=1) gives what one pass over the whole batch gives."""
    model = tiny_model("bert", "classification", num_labels=3).double()
    sample = tiny_sample(num=8)
    with torch.no_grad():
        teacher = model_logits(model, sample) + 0.3 * torch.randn(8, 3, dtype=torch.float64)
        hidden = encoder_input(model, sample)
    subs, mask = sublayers(model), [sample["attention_mask"]]

    def knowledge(max_tokens):
        known = measure_knowledge(
            model,
            subs,
            [hidden],
            mask,
            [teacher],
            "classification",
            T,
            predictive=predictive,
            max_tokens=max_tokens,
        )
        return torch.cat([torch.cat([k.predictive, k.representational]) for k in known])

    whole, split = knowledge(10_000), knowledge(1)
    assert whole.abs().max() > 0
    torch.testing.assert_close(split, whole, rtol=1e-10, atol=0)


class HostReads(TorchFunctionMode):
    """Counts reads of tensor values by the host (each one waits for a GPU): copies to the CPU and scalar
    reads."""

    READS = {"cpu", "item", "tolist", "numpy", "__bool__", "__int__", "__float__"}

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.count += getattr(func, "__name__", "") in self.READS
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("task,labels", [("classification", 3), ("classification", 12), ("regression", 1)])
def test_the_measurement_reads_its_sums_once_however_many_micro_batches(task, labels):
    model = tiny_model("bert", task, num_labels=labels)
    sample = tiny_sample(num=8)
    with torch.no_grad():
        teacher = model_logits(model, sample)
        hidden = encoder_input(model, sample)

    def host_reads(max_tokens: int) -> int:
        with HostReads() as reads:
            measure_knowledge(
                model, sublayers(model), [hidden], [sample["attention_mask"]], [teacher], task,
                max_tokens=max_tokens, generator=torch.Generator().manual_seed(0),
            )  # fmt: skip
        return reads.count

    assert len(micro_batches(8, sample["attention_mask"].shape[1], 1)) == 8
    assert host_reads(1) == host_reads(10_000)


def test_micro_batches_cover_every_row_once_within_the_token_bound():
    for rows, length, max_tokens in [(10, 7, 20), (3, 50, 10), (32, 16, 512), (5, 1, 2), (1, 9, 9)]:
        slices = micro_batches(rows, length, max_tokens)
        assert [i for part in slices for i in range(rows)[part]] == list(range(rows))
        assert all(
            (part.stop - part.start) * length <= max_tokens or part.stop - part.start == 1 for part in slices
        )
    assert len(micro_batches(10, 7, 20)) == 5 and len(micro_batches(32, 16, 512)) == 1


def test_bfloat16_products_approximate_the_float32_knowledge():
    """precision="bfloat16" runs the products in bfloat16 (the figures differ) and keeps every figure within
    bfloat16 round-off of float32's; the sums stay float64."""
    model = tiny_model("bert", "classification", num_labels=3)
    sample = tiny_sample(num=8)
    with torch.no_grad():
        noise = torch.randn(8, 3, generator=torch.Generator().manual_seed(0))
        teacher = model_logits(model, sample) + 0.3 * noise
        hidden = encoder_input(model, sample)

    def knowledge(precision):
        return measure_knowledge(
            model, sublayers(model), [hidden], [sample["attention_mask"]], [teacher], "classification", T,
            precision=precision,
        )  # fmt: skip

    exact, approximate = knowledge("float32"), knowledge("bfloat16")
    for full, low in zip(exact, approximate, strict=True):
        for term in ("predictive", "representational"):
            value, reference = getattr(low, term), getattr(full, term)
            assert value.dtype == torch.float64 and reference.abs().max() > 0
            assert not torch.equal(value, reference)
            assert (value - reference).norm() <= 0.05 * reference.norm()
    with pytest.raises(ValueError, match="precision"):
        knowledge("float16")
