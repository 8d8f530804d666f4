"""Prune cost: wall time and peak memory (RSS) of K-prune and Kwon et al. as the sample grows, and once on
a BERT-base-shaped model (12 layers, hidden 768, random weights: its accuracy means nothing, its cost does).

    python -m bench.cost                                       # 25k/50k/100k tokens + BERT-base at 100k
    python -m bench.cost --tokens 2000,4000 --bert-base-tokens 0   # a smoke run

Every measurement runs in a fresh child process (``python -m bench.cost --one ...``), so its peak RSS is
its own: the child reports ru_maxrss of itself and the parent reads the child's rusage from wait4. Time
is time.perf_counter around the prune call only (model and sample loading excluded). Writes
<out>/cost.json, cost.png (time and peak RSS vs sample tokens) and cost.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import (
    METHODS,
    ROOT,
    add_data_arguments,
    current_rss_mb,
    draw_sample,
    ints,
    load_teacher,
    machine,
    markdown_table,
    method_names,
    peak_rss_mb,
    pyplot,
    sample_size,
    set_threads,
    write_json,
    write_markdown,
)
from kprune.memory import limit_heap_fragmentation

NAME = "cost"
TEACHER_MODEL = "teacher"
BERT_BASE = "bert-base-random"
BERT_BASE_SHAPE = (12, 768, 12, 3072)  # layers, hidden, heads, FFN
TIME_LIMIT_SECONDS = 300  # target: the default prune (100k tokens) within 5 minutes on these cores
RSS_LIMIT_MB = 4096  # target: a BERT-base-shaped prune at 100k tokens under 4 GB
LINEAR_SLACK = 0.1  # "no worse than linear": a log-log slope of time vs tokens at most 1 + this


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.cost", description=__doc__.split("\n")[0])
    add_data_arguments(parser)
    parser.add_argument(
        "--methods", type=method_names, default=["kprune", "kwon"], help=f"of: {', '.join(METHODS)}"
    )
    parser.add_argument(
        "--tokens", type=ints, default=[25_000, 50_000, 100_000], help="sample sizes on the teacher"
    )
    parser.add_argument(
        "--bert-base-tokens", type=int, default=100_000, help="sample size on the BERT-base shape (0: skip)"
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
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # child mode
    parser.add_argument("--model", default=TEACHER_MODEL, help=argparse.SUPPRESS)
    parser.add_argument("--method", default="kprune", help=argparse.SUPPRESS)
    parser.add_argument("--num-tokens", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


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
    heap setting of the CLI and the pipeline (kprune.memory.limit_heap_fragmentation)."""
    limit_heap_fragmentation()
    rss_start = current_rss_mb()
    sample, labels = draw_sample(args.prepared, args.num_tokens, args.seed)
    if args.model == TEACHER_MODEL:
        model = load_teacher(args.teacher)
    elif args.model == BERT_BASE:  # token ids of the real sample (the MiniLM vocabulary is BERT's)
        model = bert_base_random(args.bert_shape, max(30522, int(sample["input_ids"].max()) + 1), args.seed)
    else:
        raise ValueError(f"unknown model {args.model!r}")
    rss_loaded = current_rss_mb()
    started = time.perf_counter()
    result = METHODS[args.method].run(model, sample, labels, args.flops_keep)
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
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def child_command(args: argparse.Namespace, model: str, method: str, tokens: int, result: Path) -> list[str]:
    command = [sys.executable, "-m", "bench.cost", "--one", "--model", model, "--method", method]
    command += ["--num-tokens", str(tokens), "--result", str(result), "--flops-keep", str(args.flops_keep)]
    command += ["--teacher", str(args.teacher), "--prepared", str(args.prepared), "--seed", str(args.seed)]
    command += ["--bert-shape", ",".join(map(str, args.bert_shape))]
    if args.threads:
        command += ["--threads", str(args.threads)]
    return command


def run_child(args: argparse.Namespace, model: str, method: str, tokens: int) -> dict:
    """One measurement in a fresh interpreter; the child's rusage comes from wait4, not RUSAGE_CHILDREN
    (which keeps the maximum over every child so far)."""
    environment = dict(os.environ)
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), environment.get("PYTHONPATH")]))
    with tempfile.TemporaryDirectory() as folder:
        result = Path(folder) / "result.json"
        process = subprocess.Popen(child_command(args, model, method, tokens, result), env=environment)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        if process.returncode != 0 or not result.is_file():
            return {"model": model, "method": method, "requested_tokens": tokens, "error": f"exit {status}"}
        measured = json.loads(result.read_text())
    measured["child_maxrss_mb"] = usage.ru_maxrss / 1024
    measured["child_cpu_seconds"] = usage.ru_utime + usage.ru_stime
    measured["isolation"] = "subprocess"
    return measured


def run_inline(args: argparse.Namespace, model: str, method: str, tokens: int) -> dict:
    one = argparse.Namespace(**{**vars(args), "model": model, "method": method, "num_tokens": tokens})
    return {**measure_one(one), "isolation": "inline"}


def scaling(runs: list[dict]) -> dict:
    """Per method on the teacher: the log-log slope of time (and of RSS growth) against sample tokens."""
    slopes = {}
    for method in dict.fromkeys(run["method"] for run in runs):
        points = [r for r in runs if r["method"] == method and r["model"] == TEACHER_MODEL and "seconds" in r]
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


def check_targets(runs: list[dict], slopes: dict) -> dict:
    targets: dict = {"time_exponent_criterion": f"<= {1 + LINEAR_SLACK}"}
    default = [
        r
        for r in runs
        if r["method"] == "kprune"
        and r["model"] == TEACHER_MODEL
        and "seconds" in r
        and r["requested_tokens"] == 100_000
    ]
    if default:
        targets["kprune_default_seconds"] = default[0]["seconds"]
        targets["kprune_default_within_5_minutes"] = default[0]["seconds"] <= TIME_LIMIT_SECONDS
    for run in runs:
        if run["model"] == BERT_BASE and "peak_rss_mb" in run:
            key = f"{run['method']}_bert_base_{run['requested_tokens']}_peak_rss_mb"
            targets[key] = run["peak_rss_mb"]
            targets[f"{key}_under_4GB"] = run["peak_rss_mb"] < RSS_LIMIT_MB
    if "kprune" in slopes:
        targets["kprune_no_worse_than_linear"] = slopes["kprune"]["no_worse_than_linear"]
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
            label = METHODS[method].label + ("" if model == TEACHER_MODEL else " (BERT-base shape)")
            left.plot(tokens, seconds, style, label=label)
            right.plot(tokens, rss, style, label=label)
    left.set_ylabel("prune time (s)")
    right.set_ylabel("peak RSS (MB)")
    right.axhline(RSS_LIMIT_MB, color="gray", linestyle=":", linewidth=1)
    for axes in (left, right):
        axes.set_xlabel("sample tokens")
        axes.set_xscale("log")
        axes.set_yscale("log")
        axes.grid(alpha=0.3, which="both")
    left.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def table(runs: list[dict]) -> str:
    rows = []
    for r in runs:
        model = "MiniLM teacher" if r["model"] == TEACHER_MODEL else "BERT-base shape (random)"
        if "seconds" not in r:
            rows.append([model, METHODS[r["method"]].label, r["requested_tokens"], "failed", "-", "-", "-"])
            continue
        rows.append(
            [
                model,
                METHODS[r["method"]].label,
                r["sample_tokens"],
                r["sample_rows"],
                f"{r['seconds']:.1f}",
                f"{r['peak_rss_mb']:.0f}",
                f"{r['rss_loaded_mb']:.0f}",
            ]
        )
    headers = ["model", "method", "sample tokens", "rows", "prune s", "peak RSS MB", "RSS before prune MB"]
    return markdown_table(headers, rows)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    set_threads(args.threads)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.one:
        write_json(args.result, measure_one(args))
        return {}
    plan = [(TEACHER_MODEL, method, tokens) for method in args.methods for tokens in args.tokens]
    if args.bert_base_tokens:
        plan += [(BERT_BASE, method, args.bert_base_tokens) for method in args.methods]
    info = machine()
    payload = {
        "benchmark": NAME,
        "machine": info,
        "settings": {
            "teacher": str(args.teacher),
            "prepared": str(args.prepared),
            "methods": args.methods,
            "tokens": args.tokens,
            "bert_base_tokens": args.bert_base_tokens,
            "bert_shape": args.bert_shape,
            "flops_keep": args.flops_keep,
            "seed": args.seed,
            "isolation": "inline" if args.inline else "subprocess",
        },
        "runs": [],
    }
    measure = run_inline if args.inline else run_child
    for model, method, tokens in plan:
        print(f"measuring {method} on {model} at {tokens} tokens ...", flush=True)
        run = measure(args, model, method, tokens)
        payload["runs"].append(run)
        payload["scaling"] = scaling(payload["runs"])
        payload["targets"] = check_targets(payload["runs"], payload["scaling"])
        write_json(args.out / f"{NAME}.json", payload)
        if "seconds" in run:
            print(
                f"  {run['seconds']:.1f}s, peak RSS {run['peak_rss_mb']:.0f} MB "
                f"({run['sample_tokens']} tokens, {run['sample_rows']} rows)",
                flush=True,
            )
    plot(args.out / f"{NAME}.png", payload["runs"])
    notes = [
        f"Budget {args.flops_keep:g} of FLOPs kept; "
        + (
            "every row measured in one process (--inline): peak RSS mixes the rows."
            if args.inline
            else "one fresh process per row; peak RSS is that process's whole peak (interpreter, torch, "
            "model, sample)."
        )
        + " prune s is the prune call alone (loading excluded).",
        "Kwon et al. use at most 2048 sample sequences (their default), so their cost stops growing there.",
    ]
    for method, entry in payload["scaling"].items():
        verdict = "met" if entry["no_worse_than_linear"] else "missed"
        notes.append(
            f"{METHODS[method].label}: time grows as tokens^{entry['time_exponent']:.2f} "
            f"(target: no worse than linear, slope <= {1 + LINEAR_SLACK:g}: {verdict})"
        )
    text = write_markdown(
        args.out / f"{NAME}.md", "Prune time and peak memory", info, table(payload["runs"]), notes
    )
    print(text)
    return payload


if __name__ == "__main__":
    main()
