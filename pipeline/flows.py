"""Prefect flows of the K-prune stages: calibrate the teacher, prune sublayer by sublayer, evaluate.

Each flow is a thin layer over ``kprune``: the math lives there, the flows decide what is read from and
written to disk. Prefect's result cache is off on purpose: DVC decides which stages run, and inside the
prune stage every file an iteration writes carries the fingerprint of the run that wrote it, so a
resumed run reuses exactly the files of its own run and never a path DVC has deleted.

    data/calibration/   hidden_in.arrow     the student's input to sublayer 0 (the teacher's embeddings)
                        teacher_logits.arrow
                        targets_TT.arrow    the teacher's pre-LayerNorm residual sum at sublayer TT
    data/prune/iterations/TT/  knowledge.safetensors, mask.json, weight.safetensors, step.json (done)
    data/prune/scratch/input_TT.arrow       the student's input to sublayer TT (latest only)
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import logging
import os
import signal
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from kprune.api import PruneRecord, build_record, model_batch, model_logits, resolve_device
from kprune.arch import QUESTION_ANSWERING, encoder_input, family_of, task_of
from kprune.config import KPruneConfig
from kprune.evaluate import EvalSet, evaluate_model
from kprune.iterate import StepRecord, advance, measure, prune_sublayer, search, teacher_step, tune
from kprune.knowledge import Knowledge
from kprune.sample import MODEL_INPUTS, make_batches
from kprune.sublayer import Sublayer, encoder_flops_of, sublayers
from kprune.tune import TuneReport
from pipeline import store
from pipeline.project import CALIBRATION, ITERATIONS, PREPARED, SCRATCH, TEACHER
from pipeline.task import dev_sets, load_task, window_options

logger = logging.getLogger("pipeline.flows")

# A crash-test hook: the prune stage kills itself (SIGKILL, no cleanup) once this iteration is on disk.
KILL_AFTER_ITERATION_ENV = "KPRUNE_KILL_AFTER_ITERATION"

# Part of every fingerprint: a new layout of the iteration files makes older ones another run's.
ITERATION_FORMAT = 2

step = functools.partial(task, cache_policy=NO_CACHE, persist_result=False)
Batches = list[dict[str, torch.Tensor]]


# ---------------------------------------------------------------- shared inputs


def load_teacher(device: torch.device) -> nn.Module:
    from kprune.cli import load_model

    model, _ = load_model(str(TEACHER), device)
    return model.requires_grad_(False)


def sample_batches(model: nn.Module, batch_size: int, device: torch.device) -> Batches:
    sample = store.read_table(PREPARED / "sample")
    sample.pop("label", None)
    return [model_batch(model, batch) for batch in make_batches(sample, batch_size, device)]


def token_masks(batches: Batches) -> list[torch.Tensor]:
    return [batch["attention_mask"] for batch in batches]


def logit_masks(task_kind: str, batches: Batches) -> list[torch.Tensor]:
    """Which entries of each batch's logits are real: every row, or every token for QA."""
    if task_kind == QUESTION_ANSWERING:
        return token_masks(batches)
    return [batch["attention_mask"].new_ones(len(batch["attention_mask"])) for batch in batches]


def without_padding(hidden: Sequence[torch.Tensor], batches: Batches) -> list[torch.Tensor]:
    """Zeros at padding positions, exactly as a round trip through the token store leaves them, so a
    resumed run and a straight one feed identical tensors to the next sublayer."""
    return [
        state.masked_fill(~batch["attention_mask"].bool()[..., None], 0.0)
        for state, batch in zip(hidden, batches, strict=True)
    ]


# ---------------------------------------------------------------- calibrate


@step(name="teacher outputs")
def teacher_outputs(teacher: nn.Module, batches: Batches) -> list[torch.Tensor]:
    """Writes the teacher's logits and its encoder input; returns the latter."""
    with torch.no_grad():
        logits = [model_logits(teacher, batch) for batch in batches]
        hidden = [encoder_input(teacher, batch) for batch in batches]
    store.write_tokens(CALIBRATION / "teacher_logits.arrow", logits, logit_masks(task_of(teacher), batches))
    store.write_tokens(CALIBRATION / "hidden_in.arrow", hidden, token_masks(batches))
    return hidden


@step(name="teacher targets")
def teacher_targets(teacher: nn.Module, t: int, hidden: list[torch.Tensor], batches: Batches):
    """Writes the teacher's pre-LayerNorm residual sums at sublayer t; returns its input to t+1."""
    targets, next_hidden = teacher_step(teacher, t, hidden, batches)
    store.write_tokens(CALIBRATION / f"targets_{t:02d}.arrow", targets, token_masks(batches))
    return next_hidden


@flow(name="calibrate")
def calibrate_flow(batch_size: int, device: str = "auto") -> dict:
    """Run the teacher once over the sample; persist its soft labels and per-sublayer targets."""
    device = resolve_device(device)
    teacher = load_teacher(device)
    batches = sample_batches(teacher, batch_size, device)
    CALIBRATION.mkdir(parents=True, exist_ok=True)
    hidden = teacher_outputs(teacher, batches)
    total = len(sublayers(teacher))
    for t in tqdm(range(total), desc="calibrate sublayers"):
        started = time.perf_counter()
        hidden = teacher_targets(teacher, t, hidden, batches)
        logger.info(
            "calibrate sublayer %d/%d: targets written in %.1fs", t, total, time.perf_counter() - started
        )
    lengths = torch.cat([mask.sum(1) for mask in token_masks(batches)]).double()
    manifest = {
        "teacher": store.folder_digest(TEACHER),
        "sample": store.folder_digest(PREPARED / "sample"),
        "task": task_of(teacher),
        "sublayers": total,
        "sequences": len(lengths),
        "tokens": int(lengths.sum()),
        "seq_len": float(lengths.mean()),
    }
    store.write_json(CALIBRATION / "manifest.json", manifest)
    return manifest


# ---------------------------------------------------------------- prune: persisted iteration files


def iteration_dir(t: int) -> Path:
    return ITERATIONS / f"{t:02d}"


def _safetensors_key(path: Path) -> str | None:
    with safe_open(str(path), "pt") as handle:
        return (handle.metadata() or {}).get("fingerprint")


def stored_fingerprint(path: Path) -> str | None:
    """The fingerprint a persisted file was written with (None if unreadable: a crash leftover)."""
    try:
        if path.suffix == ".json":
            return store.read_json(path).get("fingerprint")
        if path.suffix == ".safetensors":
            return _safetensors_key(path)
        if path.suffix == ".arrow":
            return store.token_metadata(path).get("fingerprint")
    except (OSError, ValueError, KeyError):
        return None
    return None


def discard_other_runs(run_key: str, total: int) -> int:
    """Delete persisted files of other runs; return how many leading iterations are finished."""
    keys = {t: store.fingerprint(run_key, t) for t in range(total)}
    for folder in (ITERATIONS, SCRATCH):
        for path in sorted(folder.glob("**/*")) if folder.exists() else []:
            if path.is_file() and stored_fingerprint(path) not in keys.values():
                path.unlink()
        for path in sorted(folder.glob("*/"), reverse=True) if folder.exists() else []:
            if path.is_dir() and not any(path.iterdir()):
                path.rmdir()
    finished = 0
    while finished < total and stored_fingerprint(iteration_dir(finished) / "step.json") == keys[finished]:
        finished += 1
    return finished


def load_step(t: int) -> StepRecord:
    fields = store.read_json(iteration_dir(t) / "step.json")
    fields.pop("fingerprint")
    return StepRecord(**fields)


def load_decision(t: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Sublayer t's keep-mask and tuned output weight (None when tuning was off)."""
    keep = torch.tensor(store.read_json(iteration_dir(t) / "mask.json")["keep"], dtype=torch.bool)
    weights = load_file(str(iteration_dir(t) / "weight.safetensors"))
    return keep, weights.get("weight")


def apply_iterations(model: nn.Module, count: int) -> nn.Module:
    """Prune sublayers 0..count-1 of ``model`` in place, as the persisted iterations decided."""
    for t in range(count):
        keep, weight = load_decision(t)
        Sublayer(model, t).keep_units(keep, weight)
    return model


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor], key: str, **metadata: str) -> None:
    with store.atomic_path(path) as temporary:
        save_file(
            {name: value.contiguous().cpu() for name, value in tensors.items()},
            str(temporary),
            metadata={"fingerprint": key, **metadata},
        )


# ---------------------------------------------------------------- prune: the steps of one iteration


def student_input(
    student: nn.Module, t: int, previous: list[torch.Tensor] | None, batches: Batches, run_key: str
) -> list[torch.Tensor]:
    """The student's input to sublayer t: this run's scratch file if there is one, else the pruned
    sublayer t-1 applied to its own input (``previous``, or found the same way)."""
    path = SCRATCH / f"input_{t:02d}.arrow"
    device = batches[0]["input_ids"].device
    if t == 0:
        return store.read_tokens(CALIBRATION / "hidden_in.arrow", token_masks(batches), device)
    key = store.fingerprint(run_key, t)
    if stored_fingerprint(path) == key:
        return store.read_tokens(path, token_masks(batches), device)
    if previous is None:
        previous = student_input(student, t - 1, None, batches, run_key)
    hidden = without_padding(advance(student, t - 1, previous, batches), batches)
    store.write_tokens(path, hidden, token_masks(batches), {"fingerprint": key})
    for stale in SCRATCH.glob("input_*.arrow"):  # only the latest input is needed to resume
        if stale != path:
            stale.unlink()
    return hidden


@step(name="collect student inputs")
def collect_student_inputs(student, t, previous, batches, run_key) -> list[torch.Tensor]:
    """Persisted, so an interrupted run resumes without recomputing the sublayers below t."""
    return student_input(student, t, previous, batches, run_key)


@step(name="measure knowledge")
def measure_step(student, t, hidden, batches, teacher_logits, task_kind, config, key) -> list[Knowledge]:
    path = iteration_dir(t) / "knowledge.safetensors"
    if stored_fingerprint(path) == key:
        tensors = load_file(str(path))
        return [
            Knowledge(tensors[f"predictive_{s}"], tensors[f"representational_{s}"])
            for s in range(t, len(sublayers(student)))
        ]
    knowledge = measure(student, t, hidden, batches, teacher_logits, task_kind, config)
    tensors = {}
    for s, known in enumerate(knowledge, start=t):
        tensors[f"predictive_{s}"], tensors[f"representational_{s}"] = (
            known.predictive,
            known.representational,
        )
    _save_tensors(path, tensors, key)
    return knowledge


@step(name="search mask")
def search_step(student, t, knowledge, budget_left, seq_len, config, key) -> torch.Tensor:
    path = iteration_dir(t) / "mask.json"
    if stored_fingerprint(path) == key:
        return torch.tensor(store.read_json(path)["keep"], dtype=torch.bool)
    keep = search(student, t, knowledge, budget_left, seq_len, config)
    store.write_json(path, {"fingerprint": key, "keep": keep.tolist(), "budget_left": budget_left})
    return keep


@step(name="tune weights")
def tune_step(student, t, keep, hidden, batches, config, key):
    path = iteration_dir(t) / "weight.safetensors"
    if stored_fingerprint(path) == key:
        with safe_open(str(path), "pt") as handle:
            report = handle.metadata()["report"]
        return load_file(str(path)).get("weight"), TuneReport(**json.loads(report))
    targets = store.read_tokens(
        CALIBRATION / f"targets_{t:02d}.arrow", token_masks(batches), batches[0]["input_ids"].device
    )
    weight, report = tune(student, t, keep, hidden, batches, targets, config)
    report_json = json.dumps(dataclasses.asdict(report))
    _save_tensors(path, {} if weight is None else {"weight": weight}, key, report=report_json)
    return weight, report


@step(name="prune sublayer")
def prune_step(student, t, keep, weight, knowledge, report, budget_left, seq_len, seconds, key) -> StepRecord:
    """Physically remove sublayer t's pruned units and write step.json, the mark of a finished iteration."""
    record = prune_sublayer(student, t, keep, weight, knowledge, report, budget_left, seq_len, seconds)
    store.write_json(iteration_dir(t) / "step.json", {"fingerprint": key, **record.__dict__})
    return record


@flow(name="prune")
def prune_flow(config: KPruneConfig, device: str = "auto", on_step=None) -> PruneRecord:
    """K-prune over the calibrated sample, one iteration per sublayer, resuming after the last
    finished iteration of the same run (same params, teacher and sample)."""
    started = time.perf_counter()
    device = resolve_device(device)
    teacher = load_teacher(device)
    student = copy.deepcopy(teacher)
    task_kind = task_of(teacher)
    batches = sample_batches(teacher, config.batch_size, device)
    manifest = store.read_json(CALIBRATION / "manifest.json")
    seq_len = config.seq_len or manifest["seq_len"]
    teacher_logits = store.read_tokens(
        CALIBRATION / "teacher_logits.arrow", logit_masks(task_kind, batches), device
    )
    run_key = store.fingerprint(config.to_dict(), manifest, ITERATION_FORMAT)
    total = len(sublayers(student))
    budget = config.flops_keep * encoder_flops_of(teacher, seq_len)

    finished = discard_other_runs(run_key, total)
    steps = [load_step(t) for t in range(finished)]
    apply_iterations(student, finished)
    if finished:
        logger.info(
            "resuming at iteration %d of %d (iterations 0-%d are on disk)", finished, total, finished - 1
        )
    kill_after = os.environ.get(KILL_AFTER_ITERATION_ENV)
    hidden = None
    for t in tqdm(range(finished, total), desc="K-prune sublayers", initial=finished, total=total):
        step_started = time.perf_counter()
        key = store.fingerprint(run_key, t)
        budget_left = budget - sum(record.flops_kept for record in steps)
        hidden = collect_student_inputs(student, t, hidden, batches, run_key)
        knowledge = measure_step(student, t, hidden, batches, teacher_logits, task_kind, config, key)
        keep = search_step(student, t, knowledge, budget_left, seq_len, config, key)
        weight, report = tune_step(student, t, keep, hidden, batches, config, key)
        seconds = time.perf_counter() - step_started
        record = prune_step(student, t, keep, weight, knowledge, report, budget_left, seq_len, seconds, key)
        steps.append(record)
        logger.info(
            "iteration %d (layer %d %s): kept %d/%d units, %.3g of FLOPs left, relative reconstruction "
            "error %.4g -> %.4g, %.1fs",
            t,
            record.layer,
            record.kind,
            record.units_kept,
            record.units_before,
            record.budget_left / budget if budget else 0.0,
            record.relative_error_before,
            record.relative_error_after,
            record.seconds,
        )
        if on_step is not None:
            on_step(record)
        if kill_after is not None and int(kill_after) == t:
            os.kill(os.getpid(), signal.SIGKILL)
    return build_record(
        teacher, student, config.to_dict(), batches, seq_len, budget, steps, time.perf_counter() - started
    )


# ---------------------------------------------------------------- evaluate


def pruned_student(teacher: nn.Module) -> nn.Module:
    """The pruned model: the teacher with every persisted iteration applied."""
    return apply_iterations(copy.deepcopy(teacher), len(sublayers(teacher)))


@torch.inference_mode()
def latency(model: nn.Module, inputs: dict[str, torch.Tensor], repeats: int) -> float:
    """Median seconds of one forward pass, after warm-up."""
    for _ in range(2):
        model(**inputs)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        model(**inputs)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def count_parameters(model: nn.Module) -> dict[str, int]:
    encoder = model.base_model
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "encoder_layer_parameters": sum(
            p.numel() for p in encoder.get_submodule(family_of(model).layers).parameters()
        ),
    }


@step(name="evaluate model")
def evaluate_on_dev(model: nn.Module, dev_splits: dict[str, EvalSet], params: dict, device):
    """(task metrics on each dev split, other figures: CPU latency at each batch size, parameter counts).

    With several dev splits (MNLI matched and mismatched) the metric names end in the split's name."""
    task = {}
    for split, dev in dev_splits.items():
        metrics = evaluate_model(model, dev, params["batch_size"], device)
        suffix = f"_{split}" if len(dev_splits) > 1 else ""
        task.update({f"{name}{suffix}": value for name, value in metrics.items()})
    cpu_model = copy.deepcopy(model).to("cpu").eval()
    figures = count_parameters(model)
    inputs = next(iter(dev_splits.values())).inputs
    for batch_size in params["latency_batch_sizes"]:
        rows = {key: value[:batch_size] for key, value in inputs.items() if key in MODEL_INPUTS}
        width = int(rows["attention_mask"].sum(1).max())
        batch = model_batch(cpu_model, {key: value[:, :width] for key, value in rows.items()})
        figures[f"latency_ms_batch{batch_size}"] = 1000 * latency(cpu_model, batch, params["latency_repeats"])
    return task, figures


@flow(name="evaluate")
def evaluate_flow(params: dict, record: dict, device: str = "auto") -> dict:
    """Teacher and pruned model side by side on dev: task metrics and their drop, FLOPs and parameters
    kept, pruning time, CPU latency and speedup."""
    device = resolve_device(device)
    teacher = load_teacher(device)
    info = store.read_json(PREPARED / "info.json")
    tokenizer = AutoTokenizer.from_pretrained(TEACHER)
    dev_splits = dev_sets(load_task(), tokenizer, window_options(info))
    teacher_task, teacher_figures = evaluate_on_dev(teacher, dev_splits, params, device)
    pruned_task, pruned_figures = evaluate_on_dev(pruned_student(teacher), dev_splits, params, device)
    metrics = {}
    for prefix, figures in (
        ("teacher", {**teacher_task, **teacher_figures}),
        ("pruned", {**pruned_task, **pruned_figures}),
    ):
        metrics.update({f"{prefix}_{name}": value for name, value in figures.items()})
    for name, value in teacher_task.items():
        if isinstance(value, float) and isinstance(pruned_task.get(name), float):
            metrics[f"drop_{name}"] = value - pruned_task[name]
    for batch_size in params["latency_batch_sizes"]:
        key = f"latency_ms_batch{batch_size}"
        metrics[f"speedup_batch{batch_size}"] = teacher_figures[key] / pruned_figures[key]
    metrics.update(
        flops_keep=record["config"]["flops_keep"],
        flops_kept=record["flops_kept"],
        seq_len=record["seq_len"],
        prune_seconds=record["seconds"],
        parameters_kept=pruned_figures["parameters"] / teacher_figures["parameters"],
    )
    return metrics
