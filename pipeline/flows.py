"""Prefect flows of the K-prune stages: calibrate the teacher, prune sublayer by sublayer, evaluate.

Each flow is a thin layer over ``kprune``: the math and the loop live there (``kprune.iterate``), the flows
decide what is read from and written to disk. The prune flow runs the library's loop with two plug-ins:
``CalibrationFiles`` (the teacher's side, read one batch at a time) and ``IterationFiles`` (a step store whose
steps are Prefect tasks writing the iteration files). Prefect's result cache is off on purpose: DVC
decides which stages run, and inside the prune stage every file an iteration writes carries the
fingerprint of the run that wrote it, so a resumed run reuses exactly the files of its own run.

    data/calibration/   hidden_in.arrow     the student's input to sublayer 0 (the teacher's embeddings)
                        teacher_logits.arrow
                        targets_TT.arrow    the teacher's pre-LayerNorm residual sum at sublayer TT
    data/prune/iterations/TT/  knowledge.safetensors, mask.json, weight.safetensors, step.json (done)

step.json is written last and lists the other three files with their size and checksum. A resumed run
trusts an iteration only if all three match; a missing, truncated or changed file is recomputed with
every file computed after it, in that iteration and all later ones (a warning names the file). With
prune.rescore "layer", an FFN iteration's knowledge.safetensors is its attention iteration's without that
sublayer's entry; a run resumed at an FFN iteration reads it from the finished iteration before.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import logging
import shutil
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from kprune.arch import QUESTION_ANSWERING, family_of, task_of
from kprune.config import KPruneConfig
from kprune.io import load_pruned
from kprune.iterate import StepStore, TeacherStream, iterate, set_head
from kprune.knowledge import Knowledge
from kprune.models import load_model, model_batch, resolve_device
from kprune.record import PruneRecord, StepRecord
from kprune.sample import MODEL_INPUTS, make_batches
from kprune.sublayer import Sublayer, sublayers
from kprune.tune import TuneReport, host_masks
from pipeline import store
from pipeline.faults import kill_point
from pipeline.project import PIPELINE_FOLDERS, Folders

if TYPE_CHECKING:
    from kprune.evaluate import EvalSet

logger = logging.getLogger("pipeline.flows")

# Part of every fingerprint: a new layout of the iteration files makes older ones another run's.
ITERATION_FORMAT = 5  # 4: the default's step records (tuning strength, check errors); 5: file checksums

# An iteration's files in the order they are computed (each from the ones before), and its record.
STEP_FILES = ("knowledge.safetensors", "mask.json", "weight.safetensors")
STEP_RECORD = "step.json"
HEAD = "head"  # the fingerprint's step name of the head's tuning, after the last iteration

step = functools.partial(task, cache_policy=NO_CACHE, persist_result=False)
Batches = list[dict[str, torch.Tensor]]


# ---------------------------------------------------------------- shared inputs


def load_teacher(device: torch.device, folders: Folders = PIPELINE_FOLDERS) -> nn.Module:
    model, _ = load_model(str(folders.teacher), device)
    return model.requires_grad_(False)


def sample_batches(
    model: nn.Module, batch_size: int, device: torch.device, folders: Folders = PIPELINE_FOLDERS
) -> Batches:
    sample = store.read_table(folders.prepared / "sample")
    sample.pop("label", None)
    return [model_batch(model, batch) for batch in make_batches(sample, batch_size, device)]


def token_masks(batches: Batches) -> list[torch.Tensor]:
    return [batch["attention_mask"] for batch in batches]


def logit_masks(task_kind: str, batches: Batches) -> list[torch.Tensor]:
    """Which entries of each batch's logits are real: every row, or every token for QA."""
    if task_kind == QUESTION_ANSWERING:
        return token_masks(batches)
    return [batch["attention_mask"].new_ones(len(batch["attention_mask"])) for batch in batches]


# ---------------------------------------------------------------- calibrate


@flow(name="calibrate")
def calibrate_flow(batch_size: int, device: str = "auto", folders: Folders = PIPELINE_FOLDERS) -> dict:
    """Run the teacher once over the sample; persist its soft labels and per-sublayer targets, each
    written batch by batch as the teacher streams them."""
    device = resolve_device(device)
    teacher = load_teacher(device, folders)
    batches = sample_batches(teacher, batch_size, device, folders)
    calibration = folders.calibration
    calibration.mkdir(parents=True, exist_ok=True)
    stream = TeacherStream(teacher, batches, release=True)  # loaded for this stage alone
    write_teacher_outputs(stream, batches, task_of(teacher), calibration)
    total = len(sublayers(teacher))
    for t in tqdm(range(total), desc="calibrate sublayers"):
        started = time.perf_counter()
        write_targets(stream, t, batches, calibration)
        logger.info(
            "calibrate sublayer %d/%d: targets written in %.1fs", t, total, time.perf_counter() - started
        )
    lengths = torch.cat([mask.sum(1) for mask in token_masks(batches)]).double()
    manifest = {
        "teacher": store.folder_digest(folders.teacher),
        "sample": store.folder_digest(folders.prepared / "sample"),
        "task": task_of(teacher),
        "sublayers": total,
        "sequences": len(lengths),
        "tokens": int(lengths.sum()),
        "seq_len": float(lengths.mean()),
    }
    store.write_json(calibration / "manifest.json", manifest)
    return manifest


@step(name="teacher outputs")
def write_teacher_outputs(stream: TeacherStream, batches: Batches, task_kind: str, calibration: Path) -> None:
    store.write_tokens(calibration / "teacher_logits.arrow", stream.logits, logit_masks(task_kind, batches))
    store.write_tokens(calibration / "hidden_in.arrow", stream.encoder_input(), token_masks(batches))


@step(name="teacher targets")
def write_targets(stream: TeacherStream, t: int, batches: Batches, calibration: Path) -> None:
    """The teacher's pre-LayerNorm residual sums at sublayer t, one batch in memory at a time."""
    store.write_tokens(calibration / f"targets_{t:02d}.arrow", stream.targets(t), token_masks(batches))


class CalibrationFiles:
    """The teacher's side of the K-prune loop read back from the calibrate stage, one batch at a time.

    The teacher's sublayers are never run here, so with release=True each one is let go once the loop
    has read its targets through (Sublayer.release_weights; the teacher is then unusable): the prune
    stage loads the teacher only to prune it."""

    def __init__(
        self,
        teacher: nn.Module,
        batches: Batches,
        device: torch.device,
        calibration: Path,
        release: bool = False,
    ):
        self.masks = host_masks(batches)
        self.teacher, self.device, self.calibration, self.release = teacher, device, calibration, release
        # The one part of a sublayer read here (final_hidden), kept apart from what release lets go.
        self.last_norm = copy.deepcopy(Sublayer(teacher, len(sublayers(teacher)) - 1).layer_norm)
        # On the host, as the loop's own teacher stream keeps them (kprune.iterate.TeacherStream).
        self.logits = store.read_tokens(
            calibration / "teacher_logits.arrow", logit_masks(task_of(teacher), batches)
        )

    def encoder_input(self) -> Iterator[torch.Tensor]:
        return store.iter_tokens(self.calibration / "hidden_in.arrow", self.masks, self.device)

    def targets(self, t: int) -> Iterator[torch.Tensor]:
        yield from self._read_targets(t)
        if self.release:
            Sublayer(self.teacher, t).release_weights()

    def _read_targets(self, t: int) -> Iterator[torch.Tensor]:
        return store.iter_tokens(self.calibration / f"targets_{t:02d}.arrow", self.masks, self.device)

    @torch.no_grad()
    def final_hidden(self) -> Iterator[torch.Tensor]:
        """The last sublayer's targets through its LayerNorm: the teacher's last hidden states."""
        last = len(sublayers(self.teacher)) - 1
        return (self.last_norm(target) for target in self._read_targets(last))


# ---------------------------------------------------------------- prune: persisted iteration files


def iteration_dir(t: int, iterations: Path) -> Path:
    return iterations / f"{t:02d}"


# A safetensors file keeps its metadata in a hash map, written in an order that changes from process to
# process: ours is one entry, a JSON text with sorted keys, so the same content gives the same bytes.
METADATA_KEY = "kprune"


def safetensors_metadata(path: Path) -> dict:
    with safe_open(str(path), "pt") as handle:
        return json.loads((handle.metadata() or {})[METADATA_KEY])


def stored_fingerprint(path: Path) -> str | None:
    """The fingerprint a persisted file was written with (None if unreadable: a crash leftover)."""
    try:
        if path.suffix == ".json":
            return store.read_json(path).get("fingerprint")
        if path.suffix == ".safetensors":
            return safetensors_metadata(path).get("fingerprint")
    except (OSError, ValueError, KeyError, SafetensorError):
        return None
    return None


def file_check(path: Path) -> dict:
    return {"bytes": path.stat().st_size, "sha256": store.file_digest(path)}


def damaged_file(folder: Path, files: dict) -> tuple[str, str] | None:
    """(name, what is wrong) of the first of STEP_FILES that does not match its check in step.json."""
    for name in STEP_FILES:
        path, check = folder / name, files.get(name)
        if check is None:
            return name, "is not listed in step.json"
        if not path.is_file():
            return name, "is missing"
        if path.stat().st_size != check["bytes"]:
            return name, f"is {path.stat().st_size} bytes, step.json says {check['bytes']} (truncated?)"
        if store.file_digest(path) != check["sha256"]:
            return name, "does not match its checksum in step.json"
    return None


def load_step(t: int, iterations: Path) -> StepRecord:
    fields = store.read_json(iteration_dir(t, iterations) / STEP_RECORD)
    fields.pop("fingerprint")
    fields.pop("files")
    return StepRecord(**fields)


def load_tuned(path: Path) -> tuple[torch.Tensor | None, TuneReport]:
    """A persisted tuning: its weight (None when tuning was off) and its report."""
    return load_file(str(path)).get("weight"), TuneReport(**safetensors_metadata(path)["report"])


def load_decision(t: int, iterations: Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Sublayer t's keep-mask and tuned output weight (None when tuning was off)."""
    folder = iteration_dir(t, iterations)
    keep = torch.tensor(store.read_json(folder / "mask.json")["keep"], dtype=torch.bool)
    weight, _ = load_tuned(folder / "weight.safetensors")
    return keep, weight


def head_path(iterations: Path) -> Path:
    return iterations / "head.safetensors"


def apply_iterations(model: nn.Module, count: int, iterations: Path) -> nn.Module:
    """Prune sublayers 0..count-1 of ``model`` in place, as the persisted iterations decided, and, after
    the last, give its head the weights of the run's head tuning (its own when the check kept them)."""
    for t in range(count):
        keep, weight = load_decision(t, iterations)
        Sublayer(model, t).keep_units(keep, weight)
    if count == len(sublayers(model)) and head_path(iterations).is_file():
        weight, _ = load_tuned(head_path(iterations))
        set_head(model, weight)
    return model


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor], key: str, **metadata) -> None:
    with store.atomic_path(path) as temporary:
        save_file(
            {name: value.contiguous().cpu() for name, value in tensors.items()},
            str(temporary),
            metadata={METADATA_KEY: json.dumps({"fingerprint": key, **metadata}, sort_keys=True)},
        )
        kill_point(f"write:{path}")


class IterationFiles(StepStore):
    """The K-prune loop's step store on disk: ITERATIONS/TT/ (data/prune/iterations/TT/ for dvc repro),
    each file stamped with the fingerprint of its run and iteration; step.json is written last and marks a
    finished iteration. Each step is a Prefect task."""

    def __init__(self, run_key: str, total: int, iterations: Path):
        self.run_key, self.total, self.iterations = run_key, total, iterations

    def key(self, t: int | str) -> str:
        return store.fingerprint(self.run_key, t)

    def finished(self) -> list[tuple[StepRecord, torch.Tensor, torch.Tensor | None]]:
        """The leading finished iterations of this run whose files all match step.json. Deletes the files
        of other runs, a damaged file and every file computed after it, and every iteration after the
        first unfinished one."""
        keys = {self.key(t) for t in [*range(self.total), HEAD]}
        folder = self.iterations
        for path in sorted(folder.glob("**/*")) if folder.exists() else []:
            if path.is_file() and (key := stored_fingerprint(path)) not in keys:
                if key is None and not path.name.startswith("."):  # not a killed write's temporary
                    logger.warning("%s is unreadable (truncated?): recomputing it", path)
                path.unlink()
        count = 0
        while count < self.total and self.verified(count):
            count += 1
        later = sorted(p for p in folder.glob("*/") if p.name.isdigit() and int(p.name) > count)
        if later:
            names = ", ".join(path.name for path in later)
            logger.warning("discarding iterations %s: they were computed after iteration %d", names, count)
        for path in later:
            shutil.rmtree(path)
        for path in folder.glob("*/"):
            if path.is_dir() and not any(path.iterdir()):
                path.rmdir()
        return [(load_step(t, folder), *load_decision(t, folder)) for t in range(count)]

    def verified(self, t: int) -> bool:
        """Whether iteration t is finished with every file intact; a damaged one loses that file and the
        files computed after it (the earlier ones are intact and reused)."""
        folder = iteration_dir(t, self.iterations)
        if stored_fingerprint(folder / STEP_RECORD) != self.key(t):
            return False
        damage = damaged_file(folder, store.read_json(folder / STEP_RECORD).get("files", {}))
        if damage is None:
            return True
        name, problem = damage
        logger.warning("%s %s: recomputing iteration %d from it, and every later iteration", folder / name,
                       problem, t)  # fmt: skip
        for later in [*STEP_FILES[STEP_FILES.index(name) :], STEP_RECORD]:
            (folder / later).unlink(missing_ok=True)
        return False

    def knowledge(self, t, measure):
        return knowledge_task(t, self.key(t), measure, self.iterations)

    def finished_knowledge(self, t: int) -> list[Knowledge]:
        """Iteration t's knowledge file, intact: ``finished`` verified it against step.json."""
        return read_knowledge(iteration_dir(t, self.iterations) / "knowledge.safetensors", t)

    def mask(self, t, search):
        return mask_task(t, self.key(t), search, self.iterations)

    def tuned(self, t, tune):
        return tune_task(t, self.key(t), tune, self.iterations)

    def finish(self, t, record, keep, weight) -> None:
        finish_task(t, self.key(t), record, self.iterations)

    def head(self, tune):
        return head_task(self.key(HEAD), tune, self.iterations)


def read_knowledge(path: Path, t: int) -> list[Knowledge]:
    """The knowledge of sublayers t, t+1, ... that iteration t wrote to ``path``."""
    tensors = load_file(str(path))
    count = len({name.split("_")[1] for name in tensors})
    return [
        Knowledge(tensors[f"predictive_{s}"], tensors[f"representational_{s}"]) for s in range(t, t + count)
    ]


@step(name="measure knowledge")
def knowledge_task(t: int, key: str, measure, iterations: Path) -> list[Knowledge]:
    """Iteration t's knowledge: read back if this run wrote it, else measured (or, at an FFN step with
    rescore "layer", taken from the attention step's) and written."""
    path = iteration_dir(t, iterations) / "knowledge.safetensors"
    if stored_fingerprint(path) == key:
        return read_knowledge(path, t)
    knowledge = measure()
    kill_point(f"prune:knowledge:{t}")
    tensors = {}
    for s, known in enumerate(knowledge, start=t):
        tensors[f"predictive_{s}"], tensors[f"representational_{s}"] = (
            known.predictive,
            known.representational,
        )
    _save_tensors(path, tensors, key)
    return knowledge


@step(name="search mask")
def mask_task(t: int, key: str, search, iterations: Path) -> torch.Tensor:
    path = iteration_dir(t, iterations) / "mask.json"
    if stored_fingerprint(path) == key:
        return torch.tensor(store.read_json(path)["keep"], dtype=torch.bool)
    keep = search()
    store.write_json(path, {"fingerprint": key, "keep": keep.tolist()})
    return keep


def tuned_file(path: Path, key: str, tune, kill: str) -> tuple[torch.Tensor | None, TuneReport]:
    """A tuned weight and its report: read back if this run wrote ``path``, else tuned and written."""
    if stored_fingerprint(path) == key:
        return load_tuned(path)
    weight, report = tune()
    kill_point(kill)
    _save_tensors(path, {} if weight is None else {"weight": weight}, key, report=dataclasses.asdict(report))
    return weight, report


@step(name="tune weights")
def tune_task(t: int, key: str, tune, iterations: Path) -> tuple[torch.Tensor | None, TuneReport]:
    return tuned_file(iteration_dir(t, iterations) / "weight.safetensors", key, tune, f"prune:tune:{t}")


@step(name="tune head")
def head_task(key: str, tune, iterations: Path) -> tuple[torch.Tensor, TuneReport]:
    return tuned_file(head_path(iterations), key, tune, f"prune:tune:{HEAD}")


@step(name="prune sublayer")
def finish_task(t: int, key: str, record: StepRecord, iterations: Path) -> None:
    """Writes step.json, the mark of a finished iteration (the loop has pruned the sublayer), with the size
    and checksum of each of the iteration's files."""
    folder = iteration_dir(t, iterations)
    files = {name: file_check(folder / name) for name in STEP_FILES}
    store.write_json(folder / STEP_RECORD, {"fingerprint": key, "files": files, **dataclasses.asdict(record)})
    kill_point(f"prune:finished:{t}")


def prune_run_key(config: KPruneConfig, calibration: Path) -> str:
    """The fingerprint of a prune run: its params and the calibration it reads (teacher and sample)."""
    manifest = store.read_json(calibration / "manifest.json")
    return store.fingerprint(config.to_dict(), manifest, ITERATION_FORMAT)


@flow(name="prune")
def prune_flow(
    config: KPruneConfig, device: str = "auto", folders: Folders = PIPELINE_FOLDERS
) -> PruneRecord:
    """K-prune over the calibrated sample: the library's loop (kprune.iterate) with the teacher's side
    read from the calibration files and every step persisted, resuming after the last finished
    iteration of the same run (same params, teacher and sample)."""
    device = resolve_device(device)
    teacher = load_teacher(device, folders)
    batches = sample_batches(teacher, config.batch_size, device, folders)
    result = iterate(
        teacher,
        batches,
        config,
        # The stage loaded the teacher to prune it and keeps the record alone: both may let it go.
        teacher_side=CalibrationFiles(teacher, batches, device, folders.calibration, release=True),
        store=IterationFiles(
            prune_run_key(config, folders.calibration), len(sublayers(teacher)), folders.iterations
        ),
        keep_teacher=False,
    )
    return result.record


# ---------------------------------------------------------------- evaluate


def pruned_student(teacher: nn.Module, iterations: Path) -> nn.Module:
    """The pruned model: the teacher with every persisted iteration applied."""
    return apply_iterations(copy.deepcopy(teacher), len(sublayers(teacher)), iterations)


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
    # Here, not at the top: scipy and sklearn add 140 MB to every stage's RSS, and only this one scores.
    from kprune.evaluate import evaluate_model

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
def evaluate_flow(
    params: dict,
    record: dict,
    device: str = "auto",
    folders: Folders = PIPELINE_FOLDERS,
    pruned_model: Path | None = None,
) -> dict:
    """Teacher and pruned model side by side on dev: task metrics and their drop, FLOPs and parameters
    kept, pruning time, CPU latency and speedup. The pruned model is the teacher with the persisted
    iterations applied, or the kprune folder ``pruned_model`` (a baseline's)."""
    from pipeline.task import dev_sets, load_task, window_options  # datasets: not in the other stages

    device = resolve_device(device)
    teacher = load_teacher(device, folders)
    info = store.read_json(folders.prepared / "info.json")
    tokenizer = AutoTokenizer.from_pretrained(folders.teacher)
    dev_splits = dev_sets(load_task(folders.prepared), tokenizer, window_options(info), folders.prepared)
    teacher_task, teacher_figures = evaluate_on_dev(teacher, dev_splits, params, device)
    if pruned_model is None:
        pruned = pruned_student(teacher, folders.iterations)
    else:
        pruned = load_pruned(pruned_model, device)
    pruned_task, pruned_figures = evaluate_on_dev(pruned, dev_splits, params, device)
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
