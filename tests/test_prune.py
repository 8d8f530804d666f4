"""The whole iteration through the one-call API: budgets, identity, determinism, cached inputs, bad input."""

import copy
import hashlib
import weakref

import pytest
import torch
from tiny import FAMILIES, model_inputs, tiny_model, tiny_sample

import kprune
from kprune.arch import ATTENTION, encoder_input, head_input_map
from kprune.config import KPruneConfig
from kprune.flops import head_flops, neuron_flops
from kprune.iterate import (
    StepStore,
    TeacherStream,
    check_part,
    head_logits_loss,
    iterate,
    knowledge_batches,
    reads_first_token_only,
    student_of,
    tune,
    tune_head,
)
from kprune.knowledge import measure_knowledge
from kprune.models import model_logits
from kprune.sample import average_length, make_batches
from kprune.sublayer import Sublayer, encoder_flops_of, sublayers, unit_counts
from kprune.tune import LeastSquaresStats, check_sequences, solve_towards_current, tuning_rows


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
    assert result.record.budget_flops - flops <= max(s.sublayer_flops for s in result.record.steps) + 1e-6
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


class MemoryStore(StepStore):
    """A step store that keeps every step in a dict, resumes from it, and checks each step's input."""

    def __init__(self, done=None, check_input=None):
        self.saved, self.done, self.check_input = {}, done or [], check_input

    def finished(self):
        return self.done

    def knowledge(self, t, measure):
        if self.check_input is not None:
            self.check_input(t, measure.args[2])  # the student's input to sublayer t, as carried
        return measure()

    def finish(self, t, record, keep, weight):
        self.saved[t] = (record, keep.clone(), None if weight is None else weight.clone())


def test_each_step_feeds_the_next_from_the_carried_student_input():
    """The carried hidden states equal a fresh forward of the partly pruned student from its embeddings."""
    teacher = tiny_model("distilbert")
    sample = model_inputs(teacher, tiny_sample())
    config = kprune.KPruneConfig(flops_keep=0.3, batch_size=10, rescore="sublayer")  # measured at every t
    batches = make_batches(sample, config.batch_size)
    reference, checked = copy.deepcopy(teacher), []

    def check_input(t, carried):
        if t > 0:  # the reference is pruned as the run went: sublayers 0..t-1
            record, keep, weight = store.saved[t - 1]
            Sublayer(reference, t - 1).keep_units(keep, weight)
        for batch, hidden in zip(batches, carried, strict=True):
            with torch.no_grad():
                fresh = encoder_input(reference, batch)
                for sub in sublayers(reference)[:t]:
                    fresh = sub.forward(fresh, batch["attention_mask"])
            torch.testing.assert_close(hidden, fresh, atol=1e-5, rtol=1e-5)
        checked.append(t)

    store = MemoryStore(check_input=check_input)
    iterate(teacher, batches, config, store=store, progress=False)
    assert checked == [0, 1, 2, 3]


@pytest.mark.parametrize("done", [1, 3])
def test_a_resumed_run_gives_the_model_of_a_straight_run(done):
    teacher = tiny_model("bert")
    sample = model_inputs(teacher, tiny_sample())
    # This store keeps no knowledge, which a resume at an FFN step with rescore "layer" reads back
    # (tests/test_iteration_files.py resumes that case with the pipeline's store).
    config = kprune.KPruneConfig(flops_keep=0.4, batch_size=8, rescore="sublayer")
    batches = make_batches(sample, config.batch_size)
    straight_store = MemoryStore()
    straight = iterate(teacher, batches, config, store=straight_store, progress=False)
    finished = [straight_store.saved[t] for t in range(done)]
    resumed = iterate(teacher, batches, config, store=MemoryStore(done=finished), progress=False)
    assert resumed.record.steps == straight.record.steps[:done] + resumed.record.steps[done:]
    assert [s.kept_units for s in resumed.record.steps] == [s.kept_units for s in straight.record.steps]
    for name, value in straight.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], value), name


@pytest.mark.parametrize("chunk_sequences", [None, 3])
def test_the_teacher_stream_gives_the_teacher_s_own_residual_sums(chunk_sequences, monkeypatch):
    """Also when the sums are computed a few sequences at a time (chunk_sequences: 16-sequence batches split
    in chunks of 3; None: the default, whole tiny batches)."""
    teacher = tiny_model("roberta")
    batches = make_batches(model_inputs(teacher, tiny_sample()), 16)
    length = batches[0]["attention_mask"].shape[1]
    if chunk_sequences:
        monkeypatch.setattr(kprune.iterate, "CHUNK_TOKENS", chunk_sequences * length)
    rows_at_once = []
    handle = teacher.roberta.encoder.layer[1].intermediate.dense.register_forward_hook(
        lambda module, args, output: rows_at_once.append(len(output))
    )
    stream = TeacherStream(teacher, batches)
    hidden = list(stream.encoder_input())
    streamed_rows = []  # the stream's calls, not the expected values' below
    for t in (0, 1, 3):  # sublayer 2 is skipped, as a resumed run skips it
        seen = len(rows_at_once)
        targets = list(stream.targets(t))
        streamed_rows += rows_at_once[seen:]
        for batch, target in zip(batches, targets, strict=True):
            with torch.no_grad():
                state = encoder_input(teacher, batch)
                for sub in sublayers(teacher)[:t]:
                    state = sub.forward(state, batch["attention_mask"])
                sub = Sublayer(teacher, t)
                expected = sub.residual_sum(state, sub.features(state, batch["attention_mask"]))
            torch.testing.assert_close(target, expected, atol=1e-5, rtol=1e-5)
    handle.remove()
    assert max(streamed_rows) == (chunk_sequences or 16)
    assert len(hidden) == len(batches)
    with pytest.raises(RuntimeError, match="cannot go back"):
        next(iter(stream.targets(1)))
    with pytest.raises(RuntimeError, match="moved past the encoder input"):
        stream.encoder_input()


@pytest.mark.parametrize("family", ["bert", "distilbert"])
def test_offloaded_hidden_states_give_the_same_model(family):
    teacher = tiny_model(family)
    sample = model_inputs(teacher, tiny_sample())
    in_memory = kprune.prune(teacher, sample, 0.4, progress=False, offload=False)
    offloaded = kprune.prune(teacher, sample, 0.4, progress=False, offload=True)
    assert in_memory.record.heads == offloaded.record.heads
    for name, value in in_memory.model.state_dict().items():
        assert torch.equal(offloaded.model.state_dict()[name], value), name


def test_offloaded_advance_reuses_the_tuning_s_features(monkeypatch):
    """Offloaded, the advance reuses the features the tuning computed (no Sublayer.features call inside
    it); in RAM it computes them, one call per batch and step. The same model either way."""
    teacher = tiny_model("bert")
    sample = model_inputs(teacher, tiny_sample())
    batches = make_batches(sample, 8)
    advance, features = kprune.iterate.advance, Sublayer.features
    calls, inside = [], []

    def counted_advance(*args, **kwargs):
        inside.append(True)
        try:
            return advance(*args, **kwargs)
        finally:
            inside.pop()

    def counted_features(self, *args, **kwargs):
        if inside:
            calls.append(self.index)
        return features(self, *args, **kwargs)

    monkeypatch.setattr(kprune.iterate, "advance", counted_advance)
    monkeypatch.setattr(Sublayer, "features", counted_features)
    results = {}
    for offload in (False, True):
        calls.clear()
        results[offload] = run(teacher, sample, 0.4, offload=offload, batch_size=8)
        # The last sublayer's output too: the head's tuning (on by default) reads it.
        recomputed = [] if offload else [t for t in range(len(sublayers(teacher))) for _ in batches]
        assert calls == recomputed
    for name, value in results[False].model.state_dict().items():
        assert torch.equal(results[True].model.state_dict()[name], value), name


@pytest.mark.parametrize("family", ["bert", "distilbert"])
def test_a_teacher_let_go_gives_the_same_model_and_holds_no_encoder_weight(family):
    sample = tiny_sample()
    kept = run(tiny_model(family), sample, 0.4)
    teacher = tiny_model(family)
    encoder = {name: weakref.ref(p) for name, p in teacher.named_parameters() if p.dim() and "layer" in name}
    let_go = run(teacher, sample, 0.4, keep_teacher=False)
    assert kept.model.state_dict().keys() == let_go.model.state_dict().keys()
    assert all(
        torch.equal(value, let_go.model.state_dict()[name]) for name, value in kept.model.state_dict().items()
    )
    assert kept.record.flops_original == let_go.record.flops_original
    for sub in sublayers(teacher):
        assert all(p.numel() == 0 for p in sub.module.parameters())  # every encoder layer
    assert all(reference() is None for reference in encoder.values())  # nothing holds the old tensors
    assert all(p.numel() for p in head_input_map(teacher).parameters())  # the head stays: the loop reads it
    # What the two still share is handed over, not copied (the embeddings: a third of MiniLM's weights).
    embeddings = teacher.get_input_embeddings().weight
    assert let_go.model.get_input_embeddings().weight.data_ptr() == embeddings.data_ptr()


def test_the_student_shares_no_memory_with_the_teacher():
    teacher = tiny_model("electra")
    result = run(teacher, tiny_sample(), 0.5)
    teacher_memory = {p.untyped_storage().data_ptr() for p in [*teacher.parameters(), *teacher.buffers()]}
    student = [*result.model.parameters(), *result.model.buffers()]
    assert not {p.untyped_storage().data_ptr() for p in student} & teacher_memory
    assert all(not p.requires_grad for p in result.model.parameters())
    assert all(p.requires_grad for p in teacher.parameters())  # the teacher's flags are untouched


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


def test_knowledge_batches_are_seeded_whole_batches_of_enough_tokens():
    sample = tiny_sample(num=40)
    batches = make_batches(sample, 4)
    tokens = [int(batch["attention_mask"].sum()) for batch in batches]
    assert knowledge_batches(batches, "all", 0) == list(range(len(batches)))
    chosen = knowledge_batches(batches, sum(tokens) // 3, seed=1)
    assert chosen == sorted(chosen) and chosen == knowledge_batches(batches, sum(tokens) // 3, seed=1)
    held = sum(tokens[index] for index in chosen)
    assert sum(tokens) // 3 <= held < sum(tokens) // 3 + max(tokens)  # stops once there are enough
    assert len(chosen) < len(batches)
    result = run(tiny_model("bert"), sample, 0.5, knowledge_tokens=sum(tokens) // 3)
    assert result.record.config["knowledge_tokens"] == sum(tokens) // 3


def test_the_teacher_s_soft_labels_are_computed_only_where_knowledge_is_measured():
    teacher = tiny_model("bert")
    config = KPruneConfig(flops_keep=0.4, batch_size=4, knowledge_tokens=60)
    batches = make_batches(model_inputs(teacher, tiny_sample(num=40)), config.batch_size)
    heads = []  # the student is a deep copy, hook included: count the teacher's own head only

    def count(module, args, output):
        if module is teacher.classifier:
            heads.append(len(output))

    handle = teacher.classifier.register_forward_hook(count)
    result = iterate(teacher, batches, config, progress=False)
    handle.remove()
    chosen = knowledge_batches(batches, config.knowledge_tokens, config.seed)
    assert 0 < len(chosen) < len(batches)
    # The teacher's only calls: the soft labels of the measured batches, and the logits of the check part's
    # first tokens that judge the head's tuning.
    checked = int(check_sequences(40, config.check_fraction, config.seed).sum())
    assert heads == [len(batches[index]["attention_mask"]) for index in chosen] + [checked]
    every = iterate(teacher, batches, config, teacher_side=TeacherStream(teacher, batches), progress=False)
    assert [s.kept_units for s in every.record.steps] == [s.kept_units for s in result.record.steps]
    for name, value in every.model.state_dict().items():
        assert torch.equal(result.model.state_dict()[name], value), name


# The published algorithm's settings, spelled out: what the default run did before the improvements (this
# test ran first against that code, the default then, and the paper preset was checked bit-identical to its
# models on five families and two budgets).
PAPER_SETTINGS = dict(
    lam_pred=1.0,
    lam_rep=2.5e-4,
    mu=1.0,
    temperature=2.0,
    tune_weights=True,
    ridge=1e-4,
    knowledge_scale="raw",
    head_positions=False,
    check_fraction=0.0,
    rescore="sublayer",
    knowledge_tokens="all",
)


@pytest.mark.parametrize(
    "family,task", [("bert", "classification"), ("roberta", "regression"), ("bert", "qa")]
)
def test_the_paper_preset_is_the_published_algorithm_bit_for_bit(family, task):
    model = tiny_model(family, task)
    sample = model_inputs(model, tiny_sample(num=40))
    preset, spelled = run(model, sample, 0.4, preset="paper"), run(model, sample, 0.4, **PAPER_SETTINGS)
    assert (preset.record.heads, preset.record.neurons) == (spelled.record.heads, spelled.record.neurons)
    expected, actual = spelled.model.state_dict(), preset.model.state_dict()
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[name], actual[name]) for name in expected)


@pytest.mark.parametrize("chunk_sequences", [None, 3])
def test_the_tuning_adds_its_rows_a_chunk_of_sequences_at_a_time(chunk_sequences, monkeypatch):
    """The statistics, and so the tuned weight, do not depend on the chunks (None: whole 16-sequence batches;
    3: chunks of 3 sequences), and no add holds more than a chunk's rows."""
    teacher = tiny_model("bert")
    batches = make_batches(model_inputs(teacher, tiny_sample(num=40)), 16)
    length = max(batch["attention_mask"].shape[1] for batch in batches)
    if chunk_sequences:
        monkeypatch.setattr(kprune.iterate, "CHUNK_TOKENS", chunk_sequences * length)
    keep = torch.arange(Sublayer(teacher, 0).num_units) % 2 == 0
    expected = unchunked_tuning(teacher, keep, batches)
    added = []
    add = LeastSquaresStats.add
    monkeypatch.setattr(LeastSquaresStats, "add", lambda self, f, r: (added.append(len(f)), add(self, f, r)))
    stream = TeacherStream(teacher, batches)
    hidden = list(stream.encoder_input())
    student = student_of(teacher)
    Sublayer(student, 0).keep_units(keep)
    weight, _ = tune(student, 0, hidden, batches, stream.targets(0), KPruneConfig(0.5))
    torch.testing.assert_close(weight, expected, rtol=1e-4, atol=1e-5)
    assert max(added) <= (chunk_sequences or 16) * length
    assert (max(added) > 3 * length) == (chunk_sequences is None)


def unchunked_tuning(teacher, keep, batches):
    """The tuned weight of sublayer 0 from its whole-sample statistics, gathered at once."""
    sub, config = Sublayer(teacher, 0), KPruneConfig(0.5)
    columns = keep.repeat_interleave(sub.width)
    stats = [LeastSquaresStats(int(columns.sum()), sub.output.out_features) for _ in range(2)]
    checked = check_part(batches, config)
    with torch.no_grad():
        for batch, held in zip(batches, checked, strict=True):
            state, mask = encoder_input(teacher, batch), batch["attention_mask"]
            target = sub.residual_sum(state, sub.features(state, mask))
            features = sub.features(state, mask)[:, :, keep].flatten(2)
            residual = target - state - sub.output.bias
            fit_rows, check_rows = mask.bool() & ~held[:, None], mask.bool() & held[:, None]
            for part, rows in zip(stats, (fit_rows, check_rows), strict=True):
                part.add(features[rows], residual[rows])
    return solve_towards_current(*stats, sub.output.weight[:, columns], config.tune_strengths)[0]


@pytest.mark.parametrize("trim_tokens, expected", [(10**9, 0), (1, 3)])
def test_the_tuning_hands_the_freed_heap_back_as_it_reads(trim_tokens, expected, monkeypatch):
    """Every TRIM_TOKENS tokens read on the CPU (here: never, or at each of the three batches)."""
    teacher = tiny_model("bert")
    batches = make_batches(model_inputs(teacher, tiny_sample(num=40)), 16)
    trims = []
    monkeypatch.setattr(kprune.iterate, "TRIM_TOKENS", trim_tokens)
    monkeypatch.setattr(kprune.iterate, "release_freed_memory", lambda: trims.append(1))
    stream = TeacherStream(teacher, batches)
    hidden = list(stream.encoder_input())
    tune(student_of(teacher), 0, hidden, batches, stream.targets(0), KPruneConfig(0.5))
    assert len(batches) == 3 and len(trims) == expected


def test_the_last_layer_of_a_classifier_is_read_at_the_first_token_only():
    classifier, qa = tiny_model("bert"), tiny_model("bert", "qa")
    config = KPruneConfig(0.5)
    assert [reads_first_token_only(classifier, t, config) for t in range(4)] == [False, False, True, True]
    assert not any(reads_first_token_only(qa, t, config) for t in range(4))
    assert not any(reads_first_token_only(classifier, t, KPruneConfig(0.5, preset="paper")) for t in range(4))
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert tuning_rows(mask, True).tolist() == [[True, False, False], [True, False, False]]
    assert torch.equal(tuning_rows(mask, False), mask.bool())


def test_the_last_ffn_is_tuned_on_first_token_rows():
    model = tiny_model("bert")
    sample = tiny_sample(num=40)
    result = run(model, sample, 0.4, head_positions=True, check_fraction=0.0)  # the paper's solver
    last = len(sublayers(model)) - 1
    with torch.no_grad():
        hidden_s, hidden_t = encoder_input(result.model, sample), encoder_input(model, sample)
        for t in range(last):
            hidden_s = Sublayer(result.model, t).forward(hidden_s, sample["attention_mask"])
            hidden_t = Sublayer(model, t).forward(hidden_t, sample["attention_mask"])
        teacher_ffn, student_ffn = Sublayer(model, last), Sublayer(result.model, last)
        target = teacher_ffn.residual_sum(hidden_t, teacher_ffn.features(hidden_t, sample["attention_mask"]))
        features = student_ffn.features(hidden_s, sample["attention_mask"]).flatten(2)[:, 0].double()
        residual = (target - hidden_s - student_ffn.output.bias)[:, 0].double()
    gram = features.T @ features
    lam = 1e-4 * float(gram.diagonal().mean())
    expected = torch.linalg.solve(
        gram + lam * torch.eye(len(gram), dtype=gram.dtype), features.T @ residual
    ).T
    torch.testing.assert_close(student_ffn.output.weight.double(), expected, rtol=1e-4, atol=1e-5)


def test_checked_tuning_is_recorded_and_never_worse_on_the_check_part():
    result = run(tiny_model("roberta"), tiny_sample(num=48), 0.4)
    steps = result.record.steps
    assert all(step.check_error_before is not None for step in steps)
    for step in steps:
        if step.tune_strength is None:
            assert step.check_error_after == step.check_error_before
        else:
            assert step.check_error_after < step.check_error_before
            assert step.tune_strength in KPruneConfig(0.4).tune_strengths
    assert any(step.tune_strength is not None for step in steps)
    paper = run(tiny_model("roberta"), tiny_sample(num=48), 0.4, preset="paper")
    assert all(step.tune_strength is None and step.check_error_before is None for step in paper.record.steps)


# ---------------------------------------------------------------- rescore: once per sublayer or per layer


@pytest.mark.parametrize("rescore", ["sublayer", "layer"])
def test_layer_rescore_measures_knowledge_once_per_layer(monkeypatch, rescore):
    measured_at = []

    def counted(student, subs, *args, **options):  # the real measurement, counted
        measured_at.append(subs[0].index)
        return measure_knowledge(student, subs, *args, **options)

    monkeypatch.setattr("kprune.iterate.measure_knowledge", counted)
    model = tiny_model("bert")
    steps = run(model, tiny_sample(), 0.4, rescore=rescore).record.steps
    layers = model.config.num_hidden_layers
    expected = list(range(0, 2 * layers, 2)) if rescore == "layer" else list(range(2 * layers))
    assert measured_at == expected  # L measurements (the attention steps) instead of 2L
    assert [step.sublayer for step in steps if step.knowledge_measured] == expected


class CapturingStore(StepStore):
    """An in-memory run that keeps each step's knowledge and keep-mask."""

    def __init__(self):
        self.knowledge_of, self.mask_of = {}, {}

    def knowledge(self, t, measure):
        self.knowledge_of[t] = measure()
        return self.knowledge_of[t]

    def mask(self, t, search):
        self.mask_of[t] = search()
        return self.mask_of[t]


def brute_force_mask(subs, knowledge, flops_left, seq_len, config):
    """subs[0]'s keep-mask by hand: each candidate unit's score per FLOP (each knowledge term over its mean
    over the candidates: knowledge_scale "mean"), ranked best first (ties: lower position), kept while the
    running FLOPs fit the budget."""
    predictive = torch.cat([known.predictive for known in knowledge]).double().mean().item()
    representational = torch.cat([known.representational for known in knowledge]).double().mean().item()
    units = []  # (score, cost, sublayer position, unit)
    for position, (sub, known) in enumerate(zip(subs, knowledge, strict=True)):
        hidden = sub.output.out_features
        is_head = sub.kind == ATTENTION
        cost = head_flops(hidden, sub.width, seq_len) if is_head else neuron_flops(hidden, seq_len)
        for unit in range(sub.num_units):
            score = (
                config.lam_pred * known.predictive[unit].item() / predictive
                + config.lam_rep * known.representational[unit].item() / representational
            ) / cost
            units.append((score * config.mu if is_head else score, cost, position, unit))
    keep, spent = torch.zeros(subs[0].num_units, dtype=torch.bool), 0.0
    for _, cost, position, unit in sorted(units, key=lambda item: -item[0]):  # stable: ties keep order
        if spent + cost > flops_left * (1 + 1e-9):
            break
        spent += cost
        if position == 0:
            keep[unit] = True
    return keep


def same_knowledge(first, second) -> bool:
    return len(first) == len(second) and all(
        torch.equal(a.predictive, b.predictive) and torch.equal(a.representational, b.representational)
        for a, b in zip(first, second, strict=True)
    )


def test_with_layer_rescore_an_ffn_step_searches_its_attention_step_s_knowledge():
    teacher = tiny_model("bert")
    batches = make_batches(model_inputs(teacher, tiny_sample()), 8)
    config = KPruneConfig(0.4, rescore="layer")
    assert config.knowledge_scale == "mean"  # what brute_force_mask computes
    layer, sublayer = CapturingStore(), CapturingStore()
    result = iterate(teacher, batches, config, store=layer, progress=False)
    iterate(teacher, batches, KPruneConfig(0.4, rescore="sublayer"), store=sublayer, progress=False)
    for t in (1, 3):  # the FFN steps
        reused = layer.knowledge_of[t - 1][1:]
        assert same_knowledge(layer.knowledge_of[t], reused)
        flops_left = result.record.steps[t - 1].flops_left
        expected = brute_force_mask(sublayers(teacher)[t:], reused, flops_left, result.record.seq_len, config)
        assert torch.equal(layer.mask_of[t], expected)
        assert 0 < int(expected.sum()) < len(expected)  # the budget binds: the ranking decides
    # Both runs agree up to the first FFN step, where "sublayer" measures afresh and "layer" does not.
    assert same_knowledge(layer.knowledge_of[0], sublayer.knowledge_of[0])
    assert not same_knowledge(layer.knowledge_of[1], sublayer.knowledge_of[1])


def weights_digest(result, folder) -> str:
    kprune.save_pruned(result.model, folder, record=result.record)
    return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()


@pytest.mark.parametrize(
    ("preset", "rescore", "knowledge_tokens"), [("default", "layer", 25_000), ("paper", "sublayer", "all")]
)
def test_each_preset_sets_its_measurement_bit_for_bit(tmp_path, preset, rescore, knowledge_tokens):
    model = tiny_model("bert")
    sample = tiny_sample()
    default = run(model, sample, 0.4, preset=preset)
    spelled = run(model, sample, 0.4, preset=preset, rescore=rescore, knowledge_tokens=knowledge_tokens)
    assert (default.record.config["rescore"], default.record.config["knowledge_tokens"]) == (
        rescore,
        knowledge_tokens,
    )
    measured = [step.knowledge_measured for step in default.record.steps]
    assert measured == [rescore == "sublayer" or step.kind == "attention" for step in default.record.steps]
    assert weights_digest(default, tmp_path / "default") == weights_digest(spelled, tmp_path / "spelled")


def test_knowledge_tokens_is_a_positive_integer_or_all():
    assert KPruneConfig(0.5, knowledge_tokens="all").knowledge_tokens == "all"
    for wrong in (0, -5, "half", 2.5, True):
        with pytest.raises(ValueError, match="knowledge_tokens must be an integer >= 1 or 'all'"):
            KPruneConfig(0.5, knowledge_tokens=wrong)


def test_an_unknown_rescore_is_one_clear_error():
    with pytest.raises(ValueError, match=r"rescore must be one of \('sublayer', 'layer'\)"):
        KPruneConfig(0.5, rescore="step")


HEAD_CASES = [("bert", "classification"), ("roberta", "classification"), ("distilbert", "classification")]


def tune_distorted_head(teacher, task):
    """tune_head on a student whose last hidden states are the teacher's through an invertible map A on the
    rows its head reads and noise elsewhere: (weight, report, A)."""
    width = teacher.config.hidden_size
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(15):  # 120 sequences: more first-token rows to fit than the map has weights
        mask = torch.ones(8, 6, dtype=torch.long)
        mask[:, 4:] = torch.rand(8, 2, generator=generator) < 0.5
        batches.append({"attention_mask": mask})
    distortion = torch.eye(width) + 0.3 * torch.randn(width, width, generator=generator)
    teacher_hidden = [torch.randn(8, 6, width, generator=generator) for _ in batches]
    read = [tuning_rows(batch["attention_mask"], task != "qa") for batch in batches]
    noise = [100 * torch.randn(hidden.shape, generator=generator) for hidden in teacher_hidden]
    student_hidden = [
        torch.where(rows[..., None], hidden @ distortion, garbage)
        for hidden, rows, garbage in zip(teacher_hidden, read, noise, strict=True)
    ]
    config = KPruneConfig(flops_keep=0.5, tune_strengths=(1e-9, 1.0))
    student = copy.deepcopy(teacher)
    weight, report = tune_head(
        student, teacher, student_hidden, lambda: iter(teacher_hidden), batches, config
    )
    return weight, report, distortion


@pytest.mark.parametrize("family,task", [*HEAD_CASES, ("bert", "qa")])
def test_the_head_refit_undoes_a_linear_distortion_of_the_rows_the_head_reads(family, task):
    """The student's last hidden states are the teacher's through an invertible map A on the rows its head
    reads (first tokens; every real token for QA) and noise elsewhere: the refitted first linear map of the
    head is the teacher's composed with A^-1 (rows: s = t A, so W' = W A^-T), the teacher's bias, and the
    check part's error vanishes."""
    teacher = tiny_model(family, task)
    weight, report, distortion = tune_distorted_head(teacher, task)
    head = head_input_map(teacher)
    expected = head.weight.detach() @ torch.linalg.inv(distortion).T
    torch.testing.assert_close(weight[:, :-1], expected, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(weight[:, -1], head.bias.detach(), atol=2e-3, rtol=2e-3)
    assert report.strength == 1e-9
    assert report.check_error_after < 1e-4 * report.check_error_before  # float32 round-off


def test_a_classifier_s_head_is_judged_by_its_logits_not_by_its_map_s_output():
    """A classifier that reads nothing of the map's output (zero weights): every candidate gives the
    teacher's logits, so the check loss never falls and the head stays as it is, although refitting the map
    would undo the distortion exactly (the test above)."""
    teacher = tiny_model("bert")
    with torch.no_grad():
        teacher.classifier.weight.zero_()
    weight, report, _ = tune_distorted_head(teacher, "classification")
    head = head_input_map(teacher)
    assert torch.equal(weight, torch.cat([head.weight, head.bias[:, None]], dim=1))
    assert report.strength is None and report.kept_current_weight
    assert report.check_error_before == report.check_error_after == 0.0


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_the_head_check_loss_is_the_distillation_loss_of_the_logits_a_candidate_gives(task):
    """BERT's head by hand: logits = classifier(tanh(rows W^T + b)); the loss is T^2 KL(teacher || student) of
    the soft labels (squared error for regression), summed over the rows; the student's head is untouched."""
    teacher = tiny_model("bert", task)
    student = copy.deepcopy(teacher)
    generator = torch.Generator().manual_seed(3)
    width, temperature = teacher.config.hidden_size, 2.0
    teacher_rows = torch.randn(10, width, generator=generator)
    student_rows = teacher_rows + 0.3 * torch.randn(10, width, generator=generator)
    head = head_input_map(student)
    own = torch.cat([head.weight, head.bias[:, None]], dim=1).detach().clone()
    candidate = own + 0.2 * torch.randn(own.shape, generator=generator)
    classifier = teacher.classifier

    def logits(rows, weight):
        return classifier(torch.tanh(rows @ weight[:, :-1].T + weight[:, -1]))

    with torch.no_grad():
        ours, theirs = logits(student_rows, candidate), logits(teacher_rows, own)
        if task == "regression":
            expected = (ours - theirs).square().sum()
        else:
            log_p, log_q = (torch.log_softmax(x / temperature, -1) for x in (theirs, ours))
            expected = temperature**2 * (log_p.exp() * (log_p - log_q)).sum()
        loss = head_logits_loss(student, teacher, student_rows, teacher_rows, temperature)
        assert loss(candidate) == pytest.approx(float(expected), rel=1e-5)
        assert head_logits_loss(student, teacher, teacher_rows, teacher_rows, temperature)(
            own
        ) == pytest.approx(0.0, abs=1e-6)
    assert torch.equal(torch.cat([head.weight, head.bias[:, None]], dim=1), own)


def test_the_head_tuning_is_in_the_record_and_the_paper_preset_leaves_the_head_alone():
    teacher = tiny_model("bert")
    sample = model_inputs(teacher, tiny_sample())
    tuned = run(teacher, sample, 0.3)
    paper = run(teacher, sample, 0.3, preset="paper")
    report = tuned.record.head_tuning
    assert report["check_error_after"] <= report["check_error_before"]
    head = head_input_map(tuned.model)
    assert (report["strength"] is None) == torch.equal(head.weight, head_input_map(teacher).weight)
    assert paper.record.head_tuning is None
    assert torch.equal(head_input_map(paper.model).weight, head_input_map(teacher).weight)
