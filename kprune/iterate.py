"""The K-prune iteration (Algorithm 1 of the paper): the one loop that ``kprune.prune`` and the pipeline run.

For sublayer t = 0 .. 2L-1, bottom-up:

    knowledge = measure(t)            every unit of sublayers >= t, on the current (partly pruned) student
                                      (with rescore "layer", an FFN step reuses its attention step's)
    keep      = search(t, knowledge)  global ranking under the FLOPs left; applied to sublayer t only
    prune(t, keep)                    physical removal; the FLOPs kept leave the budget
    weight    = tune(t)               the pruned sublayer's output projection, least squares against the
                                      teacher's residual sum
    advance(t)                        the student's hidden states move on to sublayer t+1, in place
                                      (after the last sublayer only for the head's tuning)

and then, with tune_head, the head's first linear map is refitted to the teacher's output of it.

Two objects plug into the loop. A ``TeacherSide`` gives the teacher's soft labels, the encoder input and,
sublayer by sublayer, the tuning targets one batch at a time: ``TeacherStream`` computes them as the loop
goes (the teacher's hidden states advance in place), the pipeline reads them memory-mapped from its
calibration files. A ``StepStore`` holds each iteration's results: the default keeps nothing; the
pipeline's persists every step so an interrupted run resumes after its last finished iteration.

Memory: the student's and the teacher's hidden states are each one whole-sample copy, advanced in place;
targets, features and float64 statistics exist one batch at a time. Offloaded (the CPU default), the
tuning's features of sublayer t wait in a temporary file until the advance reuses them. The student
shares the teacher's parameters until a sublayer is pruned (pruning builds new, smaller weights), so the
teacher is never copied whole.
"""

from __future__ import annotations

import copy
import functools
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Protocol

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from kprune.arch import ATTENTION, QUESTION_ANSWERING, encoder_input, head_input_map, task_logits, task_of
from kprune.config import ALL_TOKENS, SUBLAYER_RESCORE, KPruneConfig
from kprune.flops import head_flops, neuron_flops
from kprune.knowledge import (
    Knowledge,
    distillation_loss,
    knowledge_scales,
    measure_knowledge,
    micro_batches,
    unit_scores,
)
from kprune.memory import OffloadedStates, hidden_states, offload_default, release_freed_memory
from kprune.models import model_logits
from kprune.record import PruneResult, StepRecord, build_record
from kprune.sample import resolve_seq_len
from kprune.search import search_mask
from kprune.sublayer import Sublayer, encoder_flops_of, sublayers
from kprune.tune import (
    LeastSquaresStats,
    TuneReport,
    check_sequences,
    gather_rows,
    host_masks,
    solve_output_projection,
    solve_towards_current,
    tuning_rows,
)

logger = logging.getLogger(__name__)

Batches = Sequence[dict[str, torch.Tensor]]
HiddenStates = list[torch.Tensor] | OffloadedStates  # one (B, S, d) tensor per batch


# ---------------------------------------------------------------- the teacher's side


class TeacherSide(Protocol):
    """What the loop needs of the teacher: its soft labels (per batch, best on the host; only those of
    ``knowledge_batches`` are read), the hidden states entering layer 0 (per batch), at sublayer t its
    pre-LayerNorm residual sums (the tuning targets) batch by batch, and, for the head's tuning, its last
    hidden states."""

    logits: Sequence[torch.Tensor | None]

    def encoder_input(self) -> Iterable[torch.Tensor]: ...

    def targets(self, t: int) -> Iterable[torch.Tensor]: ...

    def final_hidden(self) -> Iterable[torch.Tensor]: ...


# Padded tokens of a batch handled at once where whole-batch temporaries would be the peak: a whole BERT-base
# batch's FFN activations (two (B, S, 3,072) float32 tensors, 100 MB at 32 sequences of 128 tokens) were
# the peak of its prune, in the teacher's residual sums; the tuning's rows gathered for its statistics too.
CHUNK_TOKENS = 1024
# Tokens a CPU tuning reads between two hand-backs of the heap's freed pages (release_freed_memory). Its
# batches grow in length, so each one's temporaries of under 2 MB (kprune.memory) land in other holes of
# glibc's heap than the last one's, and every hole touched stays resident until the step ends. (On an
# accelerator the temporaries are not in the heap.)
TRIM_TOKENS = 4096


def sequence_chunks(batch: torch.Tensor) -> list[slice]:
    """Slices of a (B, S, ...) batch's sequences holding at most CHUNK_TOKENS padded tokens (at least one
    sequence each)."""
    return micro_batches(batch.shape[0], batch.shape[1], CHUNK_TOKENS)


def residual_sums(sub: Sublayer, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Sublayer sub's pre-LayerNorm residual sums of one batch (B, S, d), a few sequences at a time."""
    chunks = sequence_chunks(hidden)
    sums = [
        sub.residual_sum(hidden[rows], sub.features(hidden[rows], attention_mask[rows])) for rows in chunks
    ]
    return sums[0] if len(sums) == 1 else torch.cat(sums)  # one chunk: no copy


class TeacherStream:
    """The teacher's side computed as the loop goes: one whole-sample copy of its hidden states, advanced
    in place while sublayer t's targets are read, so no sublayer's targets are ever all in memory.

    logit_batches: the batches whose soft labels are computed (default: every one; the others' are None).
    The loop passes those knowledge is measured on: with knowledge_tokens, a teacher forward pass over
    the rest of the sample would be thrown away. release: let each of the teacher's sublayers go once the
    stream has passed it (Sublayer.release_weights; the teacher is then unusable)."""

    def __init__(
        self,
        teacher: nn.Module,
        batches: Batches,
        offload: bool = False,
        logit_batches: Sequence[int] | None = None,
        release: bool = False,
    ):
        self.teacher, self.batches, self.sublayer, self.release = teacher, batches, 0, release
        wanted = set(range(len(batches)) if logit_batches is None else logit_batches)
        with torch.no_grad():
            # On the host: the measurement's Hessian factors are computed there (kprune.knowledge), so a
            # GPU waits once per batch here instead of once per micro-batch and step there.
            self.logits = [
                model_logits(teacher, batch).cpu() if index in wanted else None
                for index, batch in enumerate(batches)
            ]
            self.hidden = hidden_states((encoder_input(teacher, batch) for batch in batches), offload)

    def encoder_input(self) -> Iterator[torch.Tensor]:
        """The student's input to sublayer 0, batch by batch; read it before the first targets."""
        if self.sublayer:
            raise RuntimeError("the teacher stream has moved past the encoder input")
        return iter(self.hidden)  # the loop replaces a list's tensors, never writes into them

    @torch.no_grad()
    def targets(self, t: int) -> Iterator[torch.Tensor]:
        """Sublayer t's targets, batch by batch; the teacher's hidden states move to t+1 as they are read.

        Sublayers a resumed run skipped are passed through first."""
        if t < self.sublayer:
            raise RuntimeError(f"the teacher stream is at sublayer {self.sublayer}, cannot go back to {t}")
        while self.sublayer <= t:
            sub = Sublayer(self.teacher, self.sublayer)
            for index, batch in enumerate(self.batches):
                target = residual_sums(sub, self.hidden[index], batch["attention_mask"])
                self.hidden[index] = sub.layer_norm(target)
                if self.sublayer == t:
                    yield target
            if self.release:
                sub.release_weights()
            self.sublayer += 1

    def final_hidden(self) -> Iterator[torch.Tensor]:
        """The teacher's last hidden states, batch by batch (sublayers not yet read are passed through)."""
        total = len(sublayers(self.teacher))
        if self.sublayer < total:
            for _ in self.targets(total - 1):
                pass
        return iter(self.hidden)


# ---------------------------------------------------------------- where the steps' results live


class StepStore:
    """Where the loop keeps each iteration's results. This one keeps nothing: every step is computed
    (``kprune.prune``). A persisted store overrides the methods to return what an earlier run of the
    same inputs already computed and to write what is new, so an interrupted run resumes."""

    def finished(self) -> list[tuple[StepRecord, torch.Tensor, torch.Tensor | None]]:
        """(record, keep-mask, tuned weight) of the leading iterations already finished."""
        return []

    def knowledge(self, t: int, measure: Callable[[], list[Knowledge]]) -> list[Knowledge]:
        return measure()

    def finished_knowledge(self, t: int) -> list[Knowledge]:
        """The knowledge of finished iteration t, which a run resumed at t+1 reuses (rescore "layer").
        A store that resumes (returns iterations from ``finished``) keeps it; this one finishes none."""
        raise LookupError(f"this step store keeps no knowledge, not iteration {t}'s")

    def mask(self, t: int, search: Callable[[], torch.Tensor]) -> torch.Tensor:
        return search()

    def tuned(
        self, t: int, tune: Callable[[], tuple[torch.Tensor | None, TuneReport]]
    ) -> tuple[torch.Tensor | None, TuneReport]:
        return tune()

    def finish(self, t: int, record: StepRecord, keep: torch.Tensor, weight: torch.Tensor | None) -> None:
        """Sublayer t is pruned: the mark of a finished iteration."""

    def head(self, tune: Callable[[], tuple[torch.Tensor, TuneReport]]) -> tuple[torch.Tensor, TuneReport]:
        """The head's tuned first linear map as [weight | bias], after the last iteration."""
        return tune()


# ---------------------------------------------------------------- the steps


def unit_flops(sub: Sublayer, seq_len: float) -> float:
    hidden = sub.output.out_features
    if sub.kind == ATTENTION:
        return head_flops(hidden, sub.width, seq_len)
    return neuron_flops(hidden, seq_len)


def step_generator(seed: int, t: int) -> torch.Generator:
    """The random generator of step t: a function of the seed and the step only."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, t]).generate_state(1)[0]))


def knowledge_batches(batches: Batches, knowledge_tokens: int | str, seed: int) -> list[int]:
    """The batches knowledge is measured on: every one ("all"), or whole batches in a seeded order until
    they hold ``knowledge_tokens`` real tokens (in sample order; the same at every step)."""
    if knowledge_tokens == ALL_TOKENS:
        return list(range(len(batches)))
    chosen, tokens = [], 0
    for index in torch.randperm(len(batches), generator=torch.Generator().manual_seed(seed)).tolist():
        if tokens >= knowledge_tokens:
            break
        chosen.append(index)
        tokens += int(batches[index]["attention_mask"].sum())
    return sorted(chosen)


def reads_first_token_only(model: nn.Module, t: int, config: KPruneConfig) -> bool:
    """Whether sublayer t's output reaches the head through the first token only (and is scored and tuned
    there, with config.head_positions): the last layer of a sequence classifier or regressor, whose head
    reads [CLS] / <s> and whose FFN acts per token. QA reads every position."""
    last_layer = t >= len(sublayers(model)) - 2
    return config.head_positions and last_layer and task_of(model) != QUESTION_ANSWERING


def measures_knowledge(student: nn.Module, t: int, config: KPruneConfig) -> bool:
    """Whether step t measures knowledge: every step with rescore "sublayer"; with "layer" each layer's
    attention step, whose measurement the layer's FFN step then reuses (``reused_knowledge``)."""
    return config.rescore == SUBLAYER_RESCORE or Sublayer(student, t).kind == ATTENTION


def reused_knowledge(previous: Sequence[Knowledge] | None, store: StepStore, t: int) -> list[Knowledge]:
    """Step t's knowledge taken from step t-1 (its layer's attention step) without that sublayer's entry;
    after a resume at t, step t-1's is read back from the store's finished iteration."""
    if previous is None:
        previous = store.finished_knowledge(t - 1)
    return list(previous[1:])


def measure(
    student: nn.Module,
    t: int,
    student_hidden: HiddenStates,
    batches: Batches,
    teacher_logits: Sequence[torch.Tensor | None],
    config: KPruneConfig,
) -> list[Knowledge]:
    """Knowledge of every unit of sublayers t, t+1, ..., 2L-1, on the batches of ``knowledge_batches``.

    The random projections (QA, many classes) are seeded by (config.seed, t) alone, so a step gives the
    same result whether the run went straight through or resumed at t.
    """
    chosen = knowledge_batches(batches, config.knowledge_tokens, config.seed)
    return measure_knowledge(
        student,
        sublayers(student)[t:],
        (student_hidden[index] for index in chosen),
        [batches[index]["attention_mask"] for index in chosen],
        [teacher_logits[index] for index in chosen],
        task_of(student),
        temperature=config.temperature,
        projections=config.projections,
        generator=step_generator(config.seed, t),
        predictive=config.predictive_knowledge,
        max_tokens=config.micro_batch_tokens,
        precision=config.knowledge_precision,
        first_token_only=[
            reads_first_token_only(student, s, config) for s in range(t, len(sublayers(student)))
        ],
    )


def search(
    student: nn.Module,
    t: int,
    knowledge: Sequence[Knowledge],
    flops_left: float,
    seq_len: float,
    config: KPruneConfig,
) -> torch.Tensor:
    """Keep-mask of sublayer t from the global ranking of all units of sublayers >= t."""
    subs = sublayers(student)[t:]
    scales = knowledge_scales(knowledge, config.knowledge_scale)
    scores, costs = [], []
    for sub, known in zip(subs, knowledge, strict=True):
        cost = unit_flops(sub, seq_len)
        is_head = sub.kind == ATTENTION
        scores.append(unit_scores(known, cost, is_head, config.lam_pred, config.lam_rep, config.mu, scales))
        costs.append(torch.full((sub.num_units,), cost, dtype=torch.float64))
    keep = search_mask(torch.cat(scores), torch.cat(costs), max(flops_left, 0.0))
    return keep[: subs[0].num_units]


def check_part(batches: Batches, config: KPruneConfig) -> list[torch.Tensor]:
    """Per batch, bool (B,) on the host: which of its sequences are held out to check the tuning (none
    without a check part)."""
    sizes = [len(batch["attention_mask"]) for batch in batches]
    if config.check_fraction > 0 and sum(sizes) > 1:
        held = check_sequences(sum(sizes), config.check_fraction, config.seed)
    else:
        held = torch.zeros(sum(sizes), dtype=torch.bool)
    return list(held.split(sizes))


@torch.no_grad()
def tune(
    student: nn.Module,
    t: int,
    student_hidden: HiddenStates,
    batches: Batches,
    targets: Iterable[torch.Tensor],
    config: KPruneConfig,
    kept_features: OffloadedStates | None = None,
    masks: Sequence[torch.Tensor] | None = None,
) -> tuple[torch.Tensor | None, TuneReport]:
    """Least-squares output projection of sublayer t, already pruned (None when tuning is off).

    The features are the pruned sublayer's: those of its kept units, from its own (sliced) input maps. With
    config.check_fraction, the statistics of the seeded check sequences are kept apart (the same features,
    no extra pass) to choose the tuning strength (kprune.tune.solve_towards_current). kept_features, when
    given, receives each batch's features, which ``advance`` then reuses instead of computing them again.
    masks: the batches' attention masks on the host (host_masks; read from the batches when not given)."""
    sub = Sublayer(student, t)
    device = sub.output.weight.device
    bias = sub.output.bias if sub.output.bias is not None else 0.0
    first_token_only = reads_first_token_only(student, t, config)
    width = sub.output.in_features
    fit = LeastSquaresStats(width, sub.output.out_features, device=device)
    check = LeastSquaresStats(width, sub.output.out_features, device=device)
    in_check = check_part(batches, config)
    masks = masks if masks is not None else host_masks(batches)
    batches_in = zip(student_hidden, batches, targets, in_check, masks, strict=True)
    in_heap, tokens_read = device.type == "cpu", 0  # where the batches' temporaries live
    for hidden, batch, target, checked, mask in batches_in:
        tokens_read += mask.numel()
        if in_heap and tokens_read >= TRIM_TOKENS:
            release_freed_memory()
            tokens_read = 0
        rows = tuning_rows(mask, first_token_only)
        features = sub.features(hidden, batch["attention_mask"]).flatten(2)
        if kept_features is not None:
            kept_features.append(features)
        for part in sequence_chunks(features):  # the gathered rows and residuals of a chunk at a time
            residual = target[part] - hidden[part] - bias
            for stats, taken in (
                (check, rows[part] & checked[part, None]),
                (fit, rows[part] & ~checked[part, None]),
            ):
                stats.add(gather_rows(features[part], taken), gather_rows(residual, taken))
    current = sub.output.weight
    if not config.tune_weights:
        error = (fit + check).error(current)
        return None, TuneReport(error, error, fit.target_sq + check.target_sq, 0.0, "none")
    if config.check_fraction > 0:
        return solve_towards_current(fit, check, current, config.tune_strengths)
    return solve_output_projection(fit, current, ridge=config.ridge)


@torch.no_grad()
def tune_head(
    student: nn.Module,
    teacher: nn.Module,
    student_hidden: HiddenStates,
    teacher_hidden: Callable[[], Iterable[torch.Tensor]],
    batches: Batches,
    config: KPruneConfig,
    masks: Sequence[torch.Tensor] | None = None,
) -> tuple[torch.Tensor, TuneReport]:
    """The head's first linear map refitted, as [weight | bias] (out, d + 1): its inputs are the pruned
    student's last hidden states, its targets the teacher's output of the same map on the teacher's last
    hidden states, on the rows the head reads (each sequence's first token; every token for QA); the
    strength is chosen on the check sequences (kprune.tune.solve_towards_current). teacher_hidden gives
    the teacher's last hidden states, called only here (a persisted head never reads them). masks: as
    ``tune``'s."""
    student_map, teacher_map = head_input_map(student), head_input_map(teacher)
    device = student_map.weight.device
    width = student_map.in_features + 1  # the bias is the weight of a constant feature
    fit = LeastSquaresStats(width, student_map.out_features, device=device)
    check = LeastSquaresStats(width, student_map.out_features, device=device)
    in_check = check_part(batches, config)
    masks = masks if masks is not None else host_masks(batches)
    first_token_only = task_of(student) != QUESTION_ANSWERING
    check_rows: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])  # student's, teacher's
    batches_in = zip(student_hidden, teacher_hidden(), in_check, masks, strict=True)
    for hidden, teacher_last, checked, mask in batches_in:
        rows = tuning_rows(mask, first_token_only)
        held = rows & checked[:, None]
        for stats, part in ((fit, rows & ~checked[:, None]), (check, held)):
            inputs = gather_rows(hidden, part)
            features = torch.cat([inputs, inputs.new_ones(len(inputs), 1)], dim=1)
            stats.add(features, teacher_map(gather_rows(teacher_last, part)))
        if first_token_only:
            check_rows[0].append(gather_rows(hidden, held))
            check_rows[1].append(gather_rows(teacher_last, held))
    current = torch.cat([student_map.weight, student_map.bias[:, None]], dim=1)  # every family's has a bias
    # A classifier's map feeds a nonlinearity and a classifier that read few directions of its output: its
    # candidates are judged by the logits they give (QA's map gives the logits: its own error is theirs).
    check_loss = (
        head_logits_loss(student, teacher, *map(torch.cat, check_rows), config.temperature)
        if first_token_only
        else None
    )
    return solve_towards_current(fit, check, current, config.tune_strengths, check_loss)


def head_logits_loss(
    student: nn.Module,
    teacher: nn.Module,
    student_rows: torch.Tensor,
    teacher_rows: torch.Tensor,
    temperature: float,
) -> Callable[[torch.Tensor], float]:
    """For a classifier or regressor: loss(weight) of a candidate [weight | bias] of the student head's first
    linear map, the distillation loss (T^2 soft-label KL; MSE for regression) of the logits it gives on
    student_rows (n, d), the last hidden states of the first tokens, against the teacher's on teacher_rows,
    summed over the rows."""
    task, head = task_of(student), head_input_map(student)
    teacher_logits = task_logits(teacher, teacher_rows[:, None])

    def loss(weight: torch.Tensor) -> float:
        own = head.weight, head.bias
        try:
            set_head(student, weight.to(own[0]))
            logits = task_logits(student, student_rows[:, None])
        finally:
            head.weight, head.bias = own
        return float(distillation_loss(task, logits, teacher_logits, None, temperature).sum())

    return loss


def set_head(model: nn.Module, weight: torch.Tensor) -> None:
    """Give the head's first linear map a tuned [weight | bias]: new parameters, the teacher's stay."""
    head = head_input_map(model)
    # clone, not contiguous: a one-column slice is already contiguous and would share the joint storage,
    # which safetensors refuses to save
    head.weight = nn.Parameter(weight[:, :-1].clone(), requires_grad=False)
    head.bias = nn.Parameter(weight[:, -1].clone(), requires_grad=False)


@torch.no_grad()
def advance(
    student: nn.Module,
    t: int,
    student_hidden: HiddenStates,
    batches: Batches,
    kept_features: Sequence[torch.Tensor] | None = None,
) -> None:
    """Replace each batch of the student's input to sublayer t by its output, the input to t+1.

    kept_features: the pruned sublayer's features of every batch, as ``tune`` computed them; without
    them they are computed."""
    sub = Sublayer(student, t)
    reuse = kept_features is not None and len(kept_features) == len(batches)
    for index, batch in enumerate(batches):
        hidden = student_hidden[index]
        features = kept_features[index] if reuse else sub.features(hidden, batch["attention_mask"])
        student_hidden[index] = sub.layer_norm(sub.residual_sum(hidden, features))


def step_record(
    student: nn.Module,
    t: int,
    keep: torch.Tensor,
    knowledge: Sequence[Knowledge],
    report: TuneReport,
    flops_left: float,
    seq_len: float,
    seconds: float,
    knowledge_measured: bool,
) -> StepRecord:
    """What iteration t decided: sublayer t keeps the units of ``keep`` (its units before: keep's length)."""
    sub = Sublayer(student, t)
    units_before, cost = len(keep), unit_flops(sub, seq_len)
    kept, pruned = int(keep.sum()), ~keep.cpu()
    return StepRecord(
        sublayer=t,
        layer=sub.layer,
        kind=sub.kind,
        units_before=units_before,
        units_kept=kept,
        kept_units=keep.nonzero().flatten().tolist(),
        sublayer_flops=kept * cost,
        flops_left=flops_left - kept * cost,
        predictive_lost=float(knowledge[0].predictive[pruned].sum()),
        representational_lost=float(knowledge[0].representational[pruned].sum()),
        error_before=report.error_before,
        error_after=report.error_after,
        relative_error_before=report.relative_error_before,
        relative_error_after=report.relative_error_after,
        seconds=seconds,
        tune_strength=report.strength,
        check_error_before=report.check_error_before,
        check_error_after=report.check_error_after,
        knowledge_measured=knowledge_measured,
    )


# ---------------------------------------------------------------- the loop


def student_of(teacher: nn.Module) -> nn.Module:
    """A copy of the teacher whose parameters share the teacher's memory: pruning a sublayer gives it new,
    smaller weights and leaves the teacher's as they are, so the teacher is never copied whole."""
    memo = {id(p): nn.Parameter(p.detach(), requires_grad=False) for p in teacher.parameters()}
    memo.update({id(buffer): buffer for buffer in teacher.buffers()})
    return copy.deepcopy(teacher, memo)


def own_parameters(student: nn.Module, teacher: nn.Module) -> None:
    """Give the student its own copy of every parameter and buffer whose memory is still the teacher's."""
    shared = {t.untyped_storage().data_ptr() for t in [*teacher.parameters(), *teacher.buffers()]}
    for module in student.modules():
        for name, parameter in module._parameters.items():
            if parameter is not None and parameter.untyped_storage().data_ptr() in shared:
                module._parameters[name] = nn.Parameter(parameter.detach().clone(), requires_grad=False)
        for name, buffer in module._buffers.items():
            if buffer is not None and buffer.untyped_storage().data_ptr() in shared:
                module._buffers[name] = buffer.clone()


def iterate(
    teacher: nn.Module,
    batches: Batches,
    config: KPruneConfig,
    *,
    teacher_side: TeacherSide | None = None,
    store: StepStore | None = None,
    offload: bool | None = None,
    progress: bool = True,
    on_step: Callable[[StepRecord], None] | None = None,
    keep_teacher: bool = True,
) -> PruneResult:
    """Run K-prune on ``teacher`` over the sample ``batches``, one iteration per sublayer.

    keep_teacher: False says the caller needs the teacher no more: the loop's own teacher stream lets each
        of its sublayers go once passed (the student's pruned sublayers are new tensors, so the prune then
        holds about one model instead of two), and the student keeps what it still shares with the teacher
        (embeddings, head) instead of copying it; the teacher is unusable afterwards. A teacher side given
        by the caller lets go as it was built to (the pipeline's CalibrationFiles(release=True)).
        True (default): the teacher is not modified and shares no memory with the pruned model.
    teacher_side: where the teacher's soft labels and targets come from (default: computed, streamed).
    store: where each iteration's results live (default: nowhere; a persisted store resumes).
    offload: keep the student's and the teacher's whole-sample hidden states in temporary files, read
        one batch at a time (default: on the CPU; see kprune.memory).
    on_step: called with each new iteration's record.
    """
    started = time.perf_counter()
    teacher.eval()
    student = student_of(teacher)
    seq_len = resolve_seq_len(config.seq_len, [batch["attention_mask"] for batch in batches])
    if offload is None:
        offload = offload_default(batches[0]["input_ids"].device)
    if teacher_side is None:
        measured = knowledge_batches(batches, config.knowledge_tokens, config.seed)
        teacher_side = TeacherStream(teacher, batches, offload, measured, release=not keep_teacher)
    store = store if store is not None else StepStore()
    total = len(sublayers(student))
    budget_flops = config.flops_keep * encoder_flops_of(teacher, seq_len)
    hidden = hidden_states(teacher_side.encoder_input(), offload)
    masks = host_masks(batches)

    tunes_head = config.tune_head and config.tune_weights
    steps = []
    for record, keep, weight in store.finished():
        Sublayer(student, record.sublayer).keep_units(keep, weight)
        if record.sublayer < total - 1 or tunes_head:  # the last one's output is read by the head's tuning
            advance(student, record.sublayer, hidden, batches)
        steps.append(record)
    if steps:
        logger.info(
            "resuming at iteration %d of %d (iterations 0-%d are done)", len(steps), total, len(steps) - 1
        )
    flops_left = steps[-1].flops_left if steps else budget_flops

    bar = tqdm(desc="K-prune sublayers", total=total, initial=len(steps), disable=not progress)
    knowledge = None  # the last step's, which the next one may reuse (rescore "layer")
    for t in range(len(steps), total):
        step_started = time.perf_counter()
        measured = measures_knowledge(student, t, config)
        if measured:
            obtain = functools.partial(measure, student, t, hidden, batches, teacher_side.logits, config)
        else:
            obtain = functools.partial(reused_knowledge, knowledge, store, t)
        knowledge = store.knowledge(t, obtain)
        keep = store.mask(t, functools.partial(search, student, t, knowledge, flops_left, seq_len, config))
        # Pruned before its tuning, which then computes the kept units' features from the sublayer's own
        # input maps (sliced once, not once per batch).
        Sublayer(student, t).keep_units(keep)
        targets = teacher_side.targets(t)  # lazy: read only if the tuning runs
        last = t == total - 1 and not tunes_head  # nothing reads its output: no advance
        # Offloaded (on the CPU), the tuning's features wait in a file for the advance, which then skips
        # recomputing them; in an accelerator's memory they would be one more whole-sample copy.
        kept_features = OffloadedStates() if offload and not last else None
        weight, report = store.tuned(
            t,
            functools.partial(tune, student, t, hidden, batches, targets, config, kept_features, masks),
        )
        if weight is not None:
            Sublayer(student, t).set_output_weight(weight)
        seconds = time.perf_counter() - step_started
        record = step_record(student, t, keep, knowledge, report, flops_left, seq_len, seconds, measured)
        store.finish(t, record, keep, weight)
        if not last:
            advance(student, t, hidden, batches, kept_features)
        if kept_features is not None:
            kept_features.close()
        release_freed_memory()
        steps.append(record)
        flops_left = record.flops_left
        logger.info(
            "iteration %d (layer %d %s): kept %d/%d units, %.3g of the budget left, relative reconstruction "
            "error %.4g -> %.4g, %.1fs",
            t,
            record.layer,
            record.kind,
            record.units_kept,
            record.units_before,
            flops_left / budget_flops if budget_flops else 0.0,
            record.relative_error_before,
            record.relative_error_after,
            record.seconds,
        )
        bar.update()
        if on_step is not None:
            on_step(record)
    bar.close()
    head_report = None
    if tunes_head:
        tune_the_head = functools.partial(
            tune_head, student, teacher, hidden, teacher_side.final_hidden, batches, config, masks
        )
        head_weight, head_report = store.head(tune_the_head)
        set_head(student, head_weight)  # the head's own weights when they were better on the check part
        logger.info(
            "head's first linear map: relative error %.4g -> %.4g (strength %s)",
            head_report.relative_error_before,
            head_report.relative_error_after,
            head_report.strength,
        )
    release_freed_memory()  # before the copies below, which would otherwise sit on top of the leftovers
    if keep_teacher:
        own_parameters(student, teacher)
    record = build_record(
        teacher,
        student,
        config.to_dict(),
        batches,
        seq_len,
        budget_flops,
        steps,
        time.perf_counter() - started,
        head_report,
    )
    logger.info(
        "K-prune kept %.1f%% of FLOPs (budget %.1f%%) in %.1fs",
        100 * record.flops_kept,
        100 * config.flops_keep,
        record.seconds,
    )
    return PruneResult(student, record)
