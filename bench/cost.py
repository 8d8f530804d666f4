"""Prune cost: wall time and peak memory (RSS) of K-prune and Kwon et al. as the sample grows, at every
budget, on a BERT-base-shaped model (12 layers, hidden 768, random weights: its accuracy means nothing,
its cost does), and of the pipeline's prune stage on the same inputs as the library.

    python -m bench.cost                                           # the whole plan (about 1.5 h on 2 cores)
    python -m bench.cost --tokens 2000,4000 --budgets "" --bert-base-plan "" --no-pipeline   # a smoke run
    python -m bench.cost --tokens "" --budgets "" --no-pipeline    # the BERT-base rows alone

Every measurement runs in a fresh child process (``python -m bench.cost --one ...``, or the prune stage
itself), so its peak RSS is its own: the parent reads the child's rusage from wait4. Time is
time.perf_counter around the prune call only (model and sample loading excluded); for the stage, the
loop's own time from its record.json. Writes <out>/cost.json, cost.png (time and peak RSS vs sample
tokens) and cost.md. With --trace-peak each library row also records where its peak RSS was (the
stacks of its last new maximums, bench.common.PeakTracer), e.g.

    python -m bench.cost --tokens "" --budgets "" --no-pipeline --bert-base-plan kprune:25000 --trace-peak
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import yaml

from bench.common import (
    METHODS,
    ROOT,
    PeakTracer,
    add_data_arguments,
    draw_sample,
    floats,
    ints,
    load_teacher,
    machine,
    markdown_table,
    method_names,
    pyplot,
    sample_size,
    set_threads,
    write_json,
    write_markdown,
)
from kprune.memory import configure_cpu_memory, current_rss_mb, peak_rss_mb

NAME = "cost"
TEACHER_MODEL = "teacher"
BERT_BASE = "bert-base-random"
BERT_BASE_SHAPE = (12, 768, 12, 3072)  # layers, hidden, heads, FFN
PIPELINE = "pipeline"  # the method name of the prune stage's rows
TRACE_RECORDS = 5  # --trace-peak: the last new maximums kept per row
# The cost targets, checked in cost.json's "targets".
BERT_BASE_SECONDS, BERT_BASE_RSS_MB = 12 * 60, 2048  # BERT-base shape, 100k tokens, budget 0.5
DOUBLE_SAMPLE_RSS_RATIO = 1.2  # peak RSS at 200k tokens at most this times that at 100k
TEACHER_SECONDS, TEACHER_RSS_MB = 90, 1.2 * 1024  # the MiniLM teacher at 100k tokens, every budget
KWON_TIME_RATIO = 2.0  # K-prune's time at most this times Kwon et al.'s on the same sample and model
PIPELINE_SLACK = 0.10  # the prune stage within 10% of the library's time and memory
LINEAR_SLACK = 0.05  # "linear in tokens": a log-log slope of time vs tokens at most 1 + this


def allowing_empty(convert: Callable[[str], list]) -> Callable[[str], list]:
    """An option's list parser that also takes '' for an empty list (no rows of that kind)."""
    return lambda text: convert(text) if text.strip() else []


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.cost", description=__doc__.split("\n\n")[0])
    add_data_arguments(parser)
    parser.add_argument(
        "--methods", type=method_names, default=["kprune", "kwon"], help=f"of: {', '.join(METHODS)}"
    )
    parser.add_argument(
        "--tokens",
        type=allowing_empty(ints),
        default=[25_000, 50_000, 100_000],
        help="sample sizes on the teacher ('' for no teacher rows: with --budgets '' --no-pipeline, the "
        "BERT-base rows alone)",
    )
    parser.add_argument(
        "--budgets",
        type=allowing_empty(floats),
        default=[0.6, 0.4, 0.3, 0.2],
        help="further budgets on the teacher at the largest --tokens (%(default)s; '' for none)",
    )
    parser.add_argument(
        "--budget-methods",
        type=method_names,
        default=["kprune"],
        help="the methods of --methods run at the further --budgets (%(default)s)",
    )
    parser.add_argument(
        "--bert-base-plan",
        type=method_tokens,
        default=method_tokens("kprune:100000,kwon:100000,kprune:200000"),
        help="METHOD:TOKENS rows on the BERT-base shape (default: %(default)s; '' for none)",
    )
    parser.add_argument(
        "--no-pipeline",
        dest="pipeline",
        action="store_false",
        help="skip the row of the pipeline's prune stage (it needs data/calibration: dvc repro calibrate)",
    )
    parser.add_argument(
        "--bert-shape",
        type=ints,
        default=list(BERT_BASE_SHAPE),
        help="layers,hidden,heads,ffn of the random model (%(default)s)",
    )
    parser.add_argument("--flops-keep", type=float, default=0.5, help="budget of every prune (%(default)s)")
    parser.add_argument(
        "--inline",
        action="store_true",
        help="measure in this process instead of one child per prune (peak RSS then mixes; for tests)",
    )
    parser.add_argument(
        "--trace-peak",
        action="store_true",
        help="record where each library row's peak RSS is: the stack at its last new maximums "
        "(a 10 ms sampling thread; in cost.json as peak_trace, the last stack printed)",
    )
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # child mode
    parser.add_argument("--model", default=TEACHER_MODEL, help=argparse.SUPPRESS)
    parser.add_argument("--method", default="kprune", help=argparse.SUPPRESS)
    parser.add_argument("--num-tokens", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not args.tokens and (args.budgets or args.pipeline):
        parser.error("--tokens '': the --budgets and pipeline rows run at the largest --tokens; add "
                     "--budgets '' --no-pipeline")  # fmt: skip
    return args


def method_tokens(text: str) -> list[tuple[str, int]]:
    """'kprune:100000,kwon:100000' -> [('kprune', 100000), ('kwon', 100000)]."""
    rows = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        method, _, tokens = item.partition(":")
        method_names(method)  # an unknown method fails here
        rows.append((method, int(tokens)))
    return rows


def bert_base_random(shape, vocab_size: int, seed: int) -> torch.nn.Module:
    """A BERT-base-shaped classifier with random weights (2 labels)."""
    from transformers import BertConfig, BertForSequenceClassification

    layers, hidden, heads, ffn = shape
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=ffn,
        num_labels=2,
    )
    return BertForSequenceClassification(config).eval()


def measure_one(args: argparse.Namespace) -> dict:
    """Load the model and the sample, then time one prune; RSS figures are of this process, with the
    memory settings of the CLI and the pipeline (kprune.memory.configure_cpu_memory)."""
    with PeakTracer() if args.trace_peak else contextlib.nullcontext() as tracer:
        row = _measure_one(args)
    if tracer is not None:
        row["peak_trace"] = tracer.records[-TRACE_RECORDS:]
    return row


def _measure_one(args: argparse.Namespace) -> dict:
    configure_cpu_memory()
    rss_start = current_rss_mb()
    sample, labels = draw_sample(args.prepared, args.num_tokens, args.seed)
    if args.model == TEACHER_MODEL:
        model = load_teacher(args.teacher)
    elif args.model == BERT_BASE:  # token ids of the real sample (the MiniLM vocabulary is BERT's)
        model = bert_base_random(args.bert_shape, max(30522, int(sample["input_ids"].max()) + 1), args.seed)
    else:
        raise ValueError(f"unknown model {args.model!r}")
    rss_loaded = current_rss_mb()
    parameters = sum(p.numel() for p in model.parameters())
    run = METHODS[args.method].run
    # This process loaded the model for this run alone: K-prune lets it go as it passes its sublayers,
    # as the command line does (kprune.prune's keep_teacher); Kwon et al. and magnitude have no such option.
    alone = {"keep_teacher": False} if METHODS[args.method].lets_teacher_go else {}
    started = time.perf_counter()
    result = run(model, sample, labels, args.flops_keep, **alone)
    seconds = time.perf_counter() - started
    return {
        "model": args.model,
        "method": args.method,
        "label": METHODS[args.method].label,
        "requested_tokens": args.num_tokens,
        **{f"sample_{key}": value for key, value in sample_size(sample).items()},
        "flops_keep": args.flops_keep,
        "flops_kept": result.record.flops_kept,
        "seconds": seconds,
        "rss_start_mb": rss_start,
        "rss_loaded_mb": rss_loaded,
        "peak_rss_mb": peak_rss_mb(),
        "torch_threads": torch.get_num_threads(),
        "parameters": parameters,
    }


def child_command(args: argparse.Namespace, row: Row, result: Path) -> list[str]:
    model, method, tokens, flops_keep = row
    command = [sys.executable, "-m", "bench.cost", "--one", "--model", model, "--method", method]
    command += ["--num-tokens", str(tokens), "--result", str(result), "--flops-keep", str(flops_keep)]
    command += ["--teacher", str(args.teacher), "--prepared", str(args.prepared), "--seed", str(args.seed)]
    command += ["--bert-shape", ",".join(map(str, args.bert_shape))]
    if args.threads:
        command += ["--threads", str(args.threads)]
    if args.trace_peak:
        command.append("--trace-peak")
    return command


Row = tuple[str, str, int, float]  # model, method, sample tokens, flops_keep


def child_environment() -> dict[str, str]:
    environment = dict(os.environ)
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), environment.get("PYTHONPATH")]))
    return environment


def wait_for(process: subprocess.Popen) -> tuple[int, object]:
    """The child's exit code and rusage from wait4 (not RUSAGE_CHILDREN, which keeps the maximum over
    every child so far)."""
    _, status, usage = os.wait4(process.pid, 0)
    return os.waitstatus_to_exitcode(status), usage


def failed(row: Row, code: int) -> dict:
    model, method, tokens, flops_keep = row
    return {
        "model": model,
        "method": method,
        "requested_tokens": tokens,
        "flops_keep": flops_keep,
        "error": f"exit {code}",
    }


def run_child(args: argparse.Namespace, row: Row) -> dict:
    """One measurement in a fresh interpreter."""
    with tempfile.TemporaryDirectory() as folder:
        result = Path(folder) / "result.json"
        code, usage = wait_for(subprocess.Popen(child_command(args, row, result), env=child_environment()))
        if code != 0 or not result.is_file():
            return failed(row, code)
        measured = json.loads(result.read_text())
    measured["child_maxrss_mb"] = usage.ru_maxrss / 1024
    measured["child_cpu_seconds"] = usage.ru_utime + usage.ru_stime
    measured["isolation"] = "subprocess"
    return measured


def run_inline(args: argparse.Namespace, row: Row) -> dict:
    model, method, tokens, flops_keep = row
    values = {"model": model, "method": method, "num_tokens": tokens, "flops_keep": flops_keep}
    return {**measure_one(argparse.Namespace(**{**vars(args), **values})), "isolation": "inline"}


def run_pipeline_stage(args: argparse.Namespace, row: Row) -> dict:
    """The pipeline's prune stage (``python -m pipeline.stages.prune``, its Prefect flow and MLflow run
    included) on the embedded default's teacher, 100k-token sample and calibration, in a scratch project
    that links this checkout's data/prepared, data/teacher and data/calibration. Its peak RSS is the
    stage process's; its time is the loop's, from the record it writes (record.json)."""
    _, _, tokens, flops_keep = row
    data = ROOT / "data"
    with tempfile.TemporaryDirectory() as folder:
        project = Path(folder)
        (project / "data").mkdir()
        for name in ("prepared", "teacher", "calibration"):
            (project / "data" / name).symlink_to(data / name)
        params = yaml.safe_load((ROOT / "params.yaml").read_text())
        params["prune"]["flops_keep"] = flops_keep
        (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        command = [sys.executable, "-m", "pipeline.stages.prune"]
        started = time.perf_counter()
        code, usage = wait_for(subprocess.Popen(command, cwd=project, env=child_environment()))
        wall = time.perf_counter() - started
        if code != 0:
            return failed(row, code)
        record = json.loads((project / "data/prune/record.json").read_text())
    return {
        "model": TEACHER_MODEL,
        "method": PIPELINE,
        "label": "pipeline prune stage (K-prune)",
        "requested_tokens": tokens,
        "sample_tokens": record["num_tokens"],
        "sample_rows": record["num_sequences"],
        "flops_keep": flops_keep,
        "flops_kept": record["flops_kept"],
        "seconds": record["seconds"],
        "stage_wall_seconds": wall,
        "peak_rss_mb": usage.ru_maxrss / 1024,
        "isolation": "subprocess",
    }


def scaling(runs: list[dict], flops_keep: float) -> dict:
    """Per method on the teacher at the main budget: the log-log slope of time (and of RSS growth)
    against sample tokens."""
    slopes = {}
    for method in dict.fromkeys(run["method"] for run in runs):
        points = [
            r
            for r in runs
            if r["method"] == method
            and r["model"] == TEACHER_MODEL
            and "seconds" in r
            and math.isclose(r["flops_keep"], flops_keep)
        ]
        if len({r["sample_tokens"] for r in points}) < 2:
            continue
        tokens = np.log([r["sample_tokens"] for r in points])
        entry = {"time_exponent": float(np.polyfit(tokens, np.log([r["seconds"] for r in points]), 1)[0])}
        growth = [r["peak_rss_mb"] - r["rss_loaded_mb"] for r in points]
        if all(value > 0 for value in growth):
            entry["rss_growth_exponent"] = float(np.polyfit(tokens, np.log(growth), 1)[0])
        entry["no_worse_than_linear"] = entry["time_exponent"] <= 1 + LINEAR_SLACK
        slopes[method] = entry
    return slopes


def find(runs: list[dict], model: str, method: str, tokens: int, flops_keep: float) -> dict | None:
    for run in runs:
        if (run["model"], run["method"], run["requested_tokens"]) == (model, method, tokens) and math.isclose(
            run["flops_keep"], flops_keep
        ):
            return run if "seconds" in run else None
    return None


def kprune_methods(runs: list[dict]) -> list[str]:
    """The K-prune variants measured (the default first): each is judged against the targets."""
    names = {run["method"] for run in runs if run["method"].startswith("kprune")}
    return sorted(names, key=lambda name: (name != "kprune", name))


def check_targets(runs: list[dict], slopes: dict, flops_keep: float) -> dict:
    """Each cost target with the figures it is judged on and whether it is met, for every K-prune
    variant measured (keys of variants other than the default start with their name)."""
    targets: dict = {}
    largest = max((r["requested_tokens"] for r in runs if r["model"] == TEACHER_MODEL), default=None)
    for method in kprune_methods(runs):
        prefix = "" if method == "kprune" else f"{method}_"
        bert = find(runs, BERT_BASE, method, 100_000, flops_keep)
        if bert:
            targets[f"{prefix}bert_base_100k"] = {
                "seconds": bert["seconds"],
                "peak_rss_mb": bert["peak_rss_mb"],
                "met": bert["seconds"] < BERT_BASE_SECONDS and bert["peak_rss_mb"] < BERT_BASE_RSS_MB,
                "criterion": f"< {BERT_BASE_SECONDS} s and < {BERT_BASE_RSS_MB} MB",
            }
        small, large = (find(runs, BERT_BASE, method, n, flops_keep) for n in (100_000, 200_000))
        if small and large:
            ratio = large["peak_rss_mb"] / small["peak_rss_mb"]
            targets[f"{method}_bert_base_200k_over_100k_rss"] = {
                "ratio": ratio,
                "met": ratio <= DOUBLE_SAMPLE_RSS_RATIO,
                "criterion": f"<= {DOUBLE_SAMPLE_RSS_RATIO}",
            }
        at_largest = [
            r
            for r in runs
            if (r["model"], r["method"], r["requested_tokens"]) == (TEACHER_MODEL, method, largest)
            and "seconds" in r
        ]
        if at_largest:
            targets[f"{prefix}teacher_every_budget"] = {
                "budgets": {r["flops_keep"]: [r["seconds"], r["peak_rss_mb"]] for r in at_largest},
                "met": all(
                    r["seconds"] < TEACHER_SECONDS and r["peak_rss_mb"] < TEACHER_RSS_MB for r in at_largest
                ),
                "criterion": f"< {TEACHER_SECONDS} s and < {TEACHER_RSS_MB:.0f} MB at {largest} tokens",
            }
        for model, tokens in ((TEACHER_MODEL, largest), (BERT_BASE, 100_000)):
            ours, kwon = (
                find(runs, model, method, tokens, flops_keep),
                find(runs, model, "kwon", tokens, flops_keep),
            )
            if ours and kwon:
                targets[f"{prefix}versus_kwon_{model}_{tokens}"] = {
                    "time_ratio": ours["seconds"] / kwon["seconds"],
                    "rss_mb": [ours["peak_rss_mb"], kwon["peak_rss_mb"]],
                    "met": ours["seconds"] <= KWON_TIME_RATIO * kwon["seconds"]
                    and ours["peak_rss_mb"] < kwon["peak_rss_mb"],
                    "criterion": f"time <= {KWON_TIME_RATIO}x Kwon et al.'s and lower peak RSS",
                }
    library, stage = (find(runs, TEACHER_MODEL, m, largest or 0, flops_keep) for m in ("kprune", PIPELINE))
    if library and stage:
        time_ratio, rss_ratio = (
            stage["seconds"] / library["seconds"],
            stage["peak_rss_mb"] / library["peak_rss_mb"],
        )
        targets["pipeline_versus_library"] = {
            "time_ratio": time_ratio,
            "rss_ratio": rss_ratio,
            "met": time_ratio <= 1 + PIPELINE_SLACK and rss_ratio <= 1 + PIPELINE_SLACK,
            "criterion": f"both ratios <= {1 + PIPELINE_SLACK}",
        }
    if "kprune" in slopes:
        targets["kprune_linear_in_tokens"] = {
            "time_exponent": slopes["kprune"]["time_exponent"],
            "met": slopes["kprune"]["no_worse_than_linear"],
            "criterion": f"log-log slope <= {1 + LINEAR_SLACK}",
        }
    return targets


def plot(path: Path, runs: list[dict]) -> None:
    plt = pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    done = [r for r in runs if "seconds" in r]
    for method in dict.fromkeys(r["method"] for r in done):
        for model, style in ((TEACHER_MODEL, "-o"), (BERT_BASE, "s")):
            points = sorted(
                (r["sample_tokens"], r["seconds"], r["peak_rss_mb"])
                for r in done
                if r["method"] == method and r["model"] == model
            )
            if not points:
                continue
            tokens, seconds, rss = zip(*points, strict=True)
            name = label(method) + ("" if model == TEACHER_MODEL else " (BERT-base shape)")
            left.plot(tokens, seconds, style, label=name)
            right.plot(tokens, rss, style, label=name)
    left.set_ylabel("prune time (s)")
    right.set_ylabel("peak RSS (MB)")
    right.axhline(BERT_BASE_RSS_MB, color="gray", linestyle=":", linewidth=1)
    for axes in (left, right):
        axes.set_xlabel("sample tokens")
        axes.set_xscale("log")
        axes.set_yscale("log")
        axes.grid(alpha=0.3, which="both")
    left.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def label(method: str) -> str:
    return "pipeline prune stage (K-prune)" if method == PIPELINE else METHODS[method].label


def table(runs: list[dict]) -> str:
    rows = []
    for r in runs:
        model = "MiniLM teacher" if r["model"] == TEACHER_MODEL else "BERT-base shape (random)"
        head = [model, label(r["method"]), f"{r['flops_keep']:g}"]
        if "seconds" not in r:
            rows.append([*head, r["requested_tokens"], "failed", "-", "-", "-"])
            continue
        loaded = f"{r['rss_loaded_mb']:.0f}" if "rss_loaded_mb" in r else "-"
        rows.append(
            [
                *head,
                r["sample_tokens"],
                r["sample_rows"],
                f"{r['seconds']:.1f}",
                f"{r['peak_rss_mb']:.0f}",
                loaded,
            ]
        )
    headers = [
        "model",
        "method",
        "budget",
        "sample tokens",
        "rows",
        "prune s",
        "peak RSS MB",
        "RSS loaded MB",
    ]
    return markdown_table(headers, rows)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    set_threads(args.threads)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.one:
        write_json(args.result, measure_one(args))
        return {}
    plan: list[Row] = [
        (TEACHER_MODEL, m, tokens, args.flops_keep) for m in args.methods for tokens in args.tokens
    ]
    plan += [
        (TEACHER_MODEL, method, max(args.tokens), keep)
        for method in args.budget_methods
        if method in args.methods
        for keep in args.budgets
    ]
    if args.pipeline:
        plan.append((TEACHER_MODEL, PIPELINE, max(args.tokens), args.flops_keep))
    plan += [(BERT_BASE, method, tokens, args.flops_keep) for method, tokens in args.bert_base_plan]
    info = machine()
    payload = {
        "benchmark": NAME,
        "machine": info,
        "settings": {
            "teacher": str(args.teacher),
            "prepared": str(args.prepared),
            "methods": args.methods,
            "tokens": args.tokens,
            "budgets": args.budgets,
            "budget_methods": args.budget_methods,
            "bert_base_plan": args.bert_base_plan,
            "bert_shape": args.bert_shape,
            "flops_keep": args.flops_keep,
            "seed": args.seed,
            "isolation": "inline" if args.inline else "subprocess",
        },
        "runs": [],
    }
    for row in plan:
        model, method, tokens, flops_keep = row
        print(f"measuring {method} on {model} at {tokens} tokens, budget {flops_keep} ...", flush=True)
        if method == PIPELINE:
            run = run_pipeline_stage(args, row)
        else:
            run = (run_inline if args.inline else run_child)(args, row)
        payload["runs"].append(run)
        payload["scaling"] = scaling(payload["runs"], args.flops_keep)
        payload["targets"] = check_targets(payload["runs"], payload["scaling"], args.flops_keep)
        write_json(args.out / f"{NAME}.json", payload)
        if "seconds" in run:
            print(
                f"  {run['seconds']:.1f}s, peak RSS {run['peak_rss_mb']:.0f} MB "
                f"({run['sample_tokens']} tokens, {run['sample_rows']} rows)",
                flush=True,
            )
        if run.get("peak_trace"):
            peak = run["peak_trace"][-1]
            print(f"  peak {peak['rss_mb']:.0f} MB at {peak['seconds']:.1f} s in:", flush=True)
            print("\n".join(f"    {frame}" for frame in peak["stack"]), flush=True)
    main_budget = [r for r in payload["runs"] if math.isclose(r["flops_keep"], args.flops_keep)]
    plot(args.out / f"{NAME}.png", main_budget)
    notes = [
        (
            "Every row measured in one process (--inline): peak RSS mixes the rows."
            if args.inline
            else "One fresh process per row; peak RSS is that process's whole peak (interpreter, torch, "
            "model, sample)."
        )
        + " prune s is the prune call alone (loading excluded); for the pipeline stage, the loop's time "
        "from its record (the stage's wall time, Prefect and MLflow included, is in cost.json).",
        "Kwon et al. use at most 2048 sample sequences (their default), so their cost stops growing there.",
    ]
    for name, target in payload["targets"].items():
        figures = {key: value for key, value in target.items() if key not in ("met", "criterion")}
        notes.append(f"{name}: {'met' if target['met'] else 'missed'} ({target['criterion']}): {figures}")
    for method, entry in payload["scaling"].items():
        verdict = "met" if entry["no_worse_than_linear"] else "missed"
        notes.append(
            f"{label(method)}: time grows as tokens^{entry['time_exponent']:.2f} "
            f"(target: no worse than linear, slope <= {1 + LINEAR_SLACK:g}: {verdict})"
        )
    text = write_markdown(
        args.out / f"{NAME}.md", "Prune time and peak memory", info, table(payload["runs"]), notes
    )
    print(text)
    return payload


if __name__ == "__main__":
    main()
