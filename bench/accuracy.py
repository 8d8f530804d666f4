"""Accuracy sweep: dev accuracy of every method at every FLOPs budget, and its drop from the teacher.

    python -m bench.accuracy                                  # the full sweep (hours on 2 cores)
    python -m bench.accuracy --sample-tokens 5000 --budgets 0.5,0.3 --methods kprune,kwon   # a smoke run

Writes <out>/accuracy.json (every run: accuracy, drop, FLOPs kept, prune seconds, heads and neurons kept
per layer), accuracy.png (dev accuracy vs FLOPs kept, one line per method) and accuracy.md.
"""

from __future__ import annotations

import argparse
import logging
import time
import traceback

from bench.common import (
    BUDGETS,
    DEVICE,
    METHODS,
    SAMPLE_TOKENS,
    add_data_arguments,
    draw_sample,
    floats,
    load_teacher,
    machine,
    markdown_table,
    method_names,
    pyplot,
    read_dev,
    sample_size,
    set_threads,
    write_json,
    write_markdown,
)
from kprune.arch import task_of
from kprune.evaluate import predict, task_metrics
from kprune.sublayer import unit_counts

NAME = "accuracy"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.accuracy", description=__doc__.split("\n")[0])
    add_data_arguments(parser)
    parser.add_argument(
        "--methods",
        type=method_names,
        default=list(METHODS),
        help=f"comma-separated, of: {', '.join(METHODS)}",
    )
    parser.add_argument(
        "--budgets", type=floats, default=list(BUDGETS), help="fractions of FLOPs KEPT (%(default)s)"
    )
    parser.add_argument(
        "--sample-tokens", type=int, default=SAMPLE_TOKENS, help="tokens of the pruning sample (%(default)s)"
    )
    parser.add_argument("--dev-rows", type=int, default=None, help="score only the first N dev rows")
    parser.add_argument("--eval-batch-size", type=int, default=64)
    return parser.parse_args(argv)


def dev_metrics(model, dev, labels, batch_size: int) -> dict:
    return task_metrics(task_of(model), predict(model, dev, batch_size, DEVICE), labels)


def check_targets(runs: list[dict], teacher_accuracy: float) -> dict:
    """The issue's accuracy targets, as far as this sweep measured them."""
    by = {(run["method"], run["flops_keep"]): run.get("accuracy") for run in runs}
    budgets = sorted({run["flops_keep"] for run in runs}, reverse=True)
    lead = {
        str(budget): 100 * (by[("kprune", budget)] - by[("kwon", budget)])
        for budget in budgets
        if by.get(("kprune", budget)) is not None and by.get(("kwon", budget)) is not None
    }
    targets = {"kprune_lead_over_kwon_points": lead}
    if lead:
        targets["kprune_at_least_kwon_everywhere"] = all(value >= 0 for value in lead.values())
    if by.get(("kprune", 0.5)) is not None:
        drop = 100 * (teacher_accuracy - by[("kprune", 0.5)])
        targets["kprune_drop_at_0.5_points"] = drop
        targets["kprune_drop_at_0.5_within_1_point"] = drop <= 1.0
    return targets


def plot(path, runs: list[dict], teacher_accuracy: float, title: str) -> None:
    plt = pyplot()
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for method in dict.fromkeys(run["method"] for run in runs):
        points = sorted(
            (run["flops_kept"], run["accuracy"])
            for run in runs
            if run["method"] == method and run.get("accuracy") is not None
        )
        if points:
            x, y = zip(*points, strict=True)
            axes.plot(x, [100 * value for value in y], marker="o", label=METHODS[method].label)
    axes.axhline(100 * teacher_accuracy, color="black", linestyle="--", linewidth=1, label="teacher")
    axes.set_xlabel("FLOPs kept (fraction of the encoder's)")
    axes.set_ylabel("dev accuracy (%)")
    axes.set_title(title, fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def table(runs: list[dict], methods: list[str], budgets: list[float]) -> str:
    by = {(run["method"], run["flops_keep"]): run for run in runs}

    def cell(method: str, budget: float) -> str:
        run = by.get((method, budget))
        if run is None:
            return "-"
        if run.get("accuracy") is None:
            return "failed"
        return f"{100 * run['accuracy']:.2f} ({-run['drop_points']:+.2f})"

    headers = ["method"] + [f"{budget:g} kept" for budget in budgets]
    return markdown_table(headers, [[METHODS[m].label] + [cell(m, b) for b in budgets] for m in methods])


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    set_threads(args.threads)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    teacher = load_teacher(args.teacher)
    sample, labels = draw_sample(args.prepared, args.sample_tokens, args.seed)
    dev, dev_labels = read_dev(args.prepared)
    if args.dev_rows:
        dev, dev_labels = {k: v[: args.dev_rows] for k, v in dev.items()}, dev_labels[: args.dev_rows]
    teacher_metrics = dev_metrics(teacher, dev, dev_labels, args.eval_batch_size)
    teacher_accuracy = teacher_metrics["accuracy"]
    info = machine()
    payload = {
        "benchmark": NAME,
        "machine": info,
        "settings": {
            "teacher": str(args.teacher),
            "prepared": str(args.prepared),
            "methods": args.methods,
            "budgets": args.budgets,
            "sample_tokens": args.sample_tokens,
            "seed": args.seed,
            "dev_rows": len(dev_labels),
            "device": DEVICE,
        },
        "sample": sample_size(sample),
        "teacher": {"dev": teacher_metrics, "heads_neurons": unit_counts(teacher)},
        "runs": [],
    }
    out = args.out
    print(f"teacher dev accuracy {100 * teacher_accuracy:.2f}%, sample {payload['sample']}", flush=True)
    for method in args.methods:
        for budget in args.budgets:
            run = {"method": method, "label": METHODS[method].label, "flops_keep": budget}
            started = time.perf_counter()
            try:
                result = METHODS[method].run(teacher, sample, labels, budget)
                run["seconds"] = time.perf_counter() - started
                metrics = dev_metrics(result.model, dev, dev_labels, args.eval_batch_size)
                heads, neurons = unit_counts(result.model)
                run.update(
                    flops_kept=result.record.flops_kept,
                    accuracy=metrics["accuracy"],
                    drop_points=100 * (teacher_accuracy - metrics["accuracy"]),
                    dev=metrics,
                    heads_per_layer=heads,
                    neurons_per_layer=neurons,
                    seq_len=result.record.seq_len,
                )
                del result
            except Exception as error:  # one failed run must not lose a sweep of hours
                traceback.print_exc()
                run.update(seconds=time.perf_counter() - started, error=f"{type(error).__name__}: {error}")
            payload["runs"].append(run)
            payload["targets"] = check_targets(payload["runs"], teacher_accuracy)
            write_json(out / f"{NAME}.json", payload)
            if "accuracy" in run:
                print(
                    f"{method:>22} keep {budget:.2f}: acc {100 * run['accuracy']:.2f}% "
                    f"(drop {run['drop_points']:+.2f} pts), FLOPs kept {run['flops_kept']:.3f}, "
                    f"{run['seconds']:.1f}s",
                    flush=True,
                )
    title = (
        f"dev accuracy vs FLOPs kept ({payload['sample']['tokens']} sample tokens, "
        f"teacher {100 * teacher_accuracy:.2f}%)"
    )
    plot(out / f"{NAME}.png", payload["runs"], teacher_accuracy, title)
    notes = [
        f"Teacher dev accuracy {100 * teacher_accuracy:.2f}% on {len(dev_labels)} dev rows; "
        f"cells: accuracy % (change from the teacher, points).",
        f"Sample: {payload['sample']['rows']} train rows, {payload['sample']['tokens']} tokens "
        f"(seed {args.seed}).",
    ]
    text = write_markdown(
        out / f"{NAME}.md",
        "Dev accuracy vs FLOPs kept",
        info,
        table(payload["runs"], args.methods, args.budgets),
        notes,
    )
    print(text)
    return payload


if __name__ == "__main__":
    main()
