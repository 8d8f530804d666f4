"""Inference speed: CPU latency and throughput of the teacher and of pruned models, warm, median of repeats,
and the speedup against the ideal 1 / FLOPs kept.

    python -m bench.speed                      # structures from bench/results/accuracy.json if it exists
    python -m bench.speed --batch-sizes 1 --seq-lens 64 --repeats 3 --budgets 0.5   # a smoke run

Speed depends only on the pruned model's shape (heads and neurons per layer), so by default the shapes
come from the K-prune runs of the accuracy sweep (--structures); budgets it does not hold are pruned here
with --sample-tokens. Models take turns within each repeat, so load from other processes hits all alike.
Inputs are full-length sequences (no padding). The ideal speedup is the FLOPs ratio at that sequence
length (kprune's FLOPs model: heads and neurons only; embeddings, LayerNorm and classifier are not pruned).
Writes <out>/speed.json, speed.png (speedup vs FLOPs kept, with the ideal) and speed.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import time
from pathlib import Path

import torch

from bench.common import (
    BUDGETS,
    METHODS,
    add_data_arguments,
    draw_sample,
    floats,
    ints,
    load_teacher,
    machine,
    markdown_table,
    method_names,
    pyplot,
    set_threads,
    write_json,
    write_markdown,
)
from kprune.sublayer import encoder_flops_of, set_unit_counts, unit_counts

NAME = "speed"
TEACHER = "teacher"
EFFICIENCY_TARGET = 0.8  # pruned models should reach 0.8 x the ideal speedup at batch 32


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.speed", description=__doc__.split("\n")[0])
    add_data_arguments(parser)
    parser.add_argument("--methods", type=method_names, default=["kprune"], help=f"of: {', '.join(METHODS)}")
    parser.add_argument("--budgets", type=floats, default=list(BUDGETS), help="FLOPs kept (%(default)s)")
    parser.add_argument("--batch-sizes", type=ints, default=[1, 32], help="(%(default)s)")
    parser.add_argument("--seq-lens", type=ints, default=[64, 128], help="tokens per sequence (%(default)s)")
    parser.add_argument(
        "--repeats", type=int, default=20, help="timed calls per model and shape (%(default)s)"
    )
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls first (%(default)s)")
    parser.add_argument(
        "--structures",
        type=Path,
        default=None,
        help="accuracy JSON to take pruned shapes from (default: <out>/accuracy.json if present)",
    )
    parser.add_argument(
        "--sample-tokens",
        type=int,
        default=100_000,
        help="sample of prunes not in --structures (%(default)s)",
    )
    return parser.parse_args(argv)


def known_structures(path: Path | None) -> dict[tuple[str, float], tuple[list[int], list[int]]]:
    """(method, budget) -> (heads per layer, neurons per layer) of the accuracy sweep's runs."""
    if path is None or not path.is_file():
        return {}
    runs = json.loads(path.read_text()).get("runs", [])
    return {
        (run["method"], run["flops_keep"]): (run["heads_per_layer"], run["neurons_per_layer"])
        for run in runs
        if "heads_per_layer" in run
    }


def pruned_models(args: argparse.Namespace, teacher: torch.nn.Module) -> list[dict]:
    structures = known_structures(args.structures or args.out / "accuracy.json")
    sample = labels = None
    models = []
    for method in args.methods:
        for budget in args.budgets:
            if (method, budget) in structures:
                model = copy.deepcopy(teacher)
                set_unit_counts(model, *structures[(method, budget)])  # same shape, same speed
                source = "structure from the accuracy sweep"
            else:
                if sample is None:
                    sample, labels = draw_sample(args.prepared, args.sample_tokens, args.seed)
                model = METHODS[method].run(teacher, sample, labels, budget).model
                source = f"pruned here on {args.sample_tokens} sample tokens"
            name = f"{METHODS[method].label} {budget:g}"
            models.append(
                {
                    "name": name,
                    "method": method,
                    "flops_keep": budget,
                    "model": model.eval(),
                    "source": source,
                }
            )
    return models


def inputs(batch: int, length: int, vocab: int, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(min(1000, vocab - 1), vocab, (batch, length), generator=generator),
        "attention_mask": torch.ones(batch, length, dtype=torch.long),
        "token_type_ids": torch.zeros(batch, length, dtype=torch.long),
    }


def time_models(models: list[dict], batch: dict, repeats: int, warmup: int) -> list[list[float]]:
    """Seconds of each call, models taking turns inside every repeat."""
    times: list[list[float]] = [[] for _ in models]
    with torch.inference_mode():
        for entry in models:
            for _ in range(warmup):
                entry["model"](**entry["inputs"](batch))
        for _ in range(repeats):
            for entry, spent in zip(models, times, strict=True):
                arguments = entry["inputs"](batch)
                started = time.perf_counter()
                entry["model"](**arguments)
                spent.append(time.perf_counter() - started)
    return times


def model_inputs_for(model: torch.nn.Module):
    import inspect

    accepted = inspect.signature(model.forward).parameters  # DistilBERT takes no token_type_ids
    return lambda batch: {name: value for name, value in batch.items() if name in accepted}


def plot(path: Path, rows: list[dict]) -> None:
    plt = pyplot()
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for shape in dict.fromkeys((r["batch_size"], r["seq_len"]) for r in rows):
        points = sorted(
            (r["flops_kept_at_length"], r["speedup"])
            for r in rows
            if (r["batch_size"], r["seq_len"]) == shape and r["model"] != TEACHER
        )
        if points:
            x, y = zip(*points, strict=True)
            axes.plot(x, y, marker="o", label=f"batch {shape[0]}, seq {shape[1]}")
    kept = sorted({r["flops_kept_at_length"] for r in rows if r["model"] != TEACHER})
    if kept:
        grid = [kept[0] + (1 - kept[0]) * i / 50 for i in range(51)]
        axes.plot(grid, [1 / x for x in grid], "k--", linewidth=1, label="ideal 1 / FLOPs kept")
    axes.set_xlabel("FLOPs kept (at the sequence length)")
    axes.set_ylabel("speedup over the teacher (median latency)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def table(rows: list[dict]) -> str:
    body = [
        [
            r["model"],
            r["batch_size"],
            r["seq_len"],
            f"{1000 * r['median_seconds']:.2f}",
            f"{r['sequences_per_second']:.1f}",
            f"{r['flops_kept_at_length']:.3f}",
            f"{r['speedup']:.2f}",
            f"{r['ideal_speedup']:.2f}",
            f"{r['fraction_of_ideal']:.2f}",
        ]
        for r in rows
    ]
    headers = ["model", "batch", "seq", "median ms", "seq/s", "FLOPs kept", "speedup", "ideal", "x ideal"]
    return markdown_table(headers, body)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    set_threads(args.threads)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    teacher = load_teacher(args.teacher)
    models = [
        {"name": TEACHER, "method": None, "flops_keep": 1.0, "model": teacher, "source": str(args.teacher)}
    ]
    models += pruned_models(args, teacher)
    for entry in models:
        entry["inputs"] = model_inputs_for(entry["model"])
    vocab = teacher.config.vocab_size
    info = machine()
    rows = []
    for batch_size in args.batch_sizes:
        for seq_len in args.seq_lens:
            batch = inputs(batch_size, seq_len, vocab, args.seed)
            times = time_models(models, batch, args.repeats, args.warmup)
            teacher_median = statistics.median(times[0])
            teacher_flops = encoder_flops_of(teacher, seq_len)
            for entry, spent in zip(models, times, strict=True):
                median = statistics.median(spent)
                kept = encoder_flops_of(entry["model"], seq_len) / teacher_flops
                speedup = teacher_median / median
                rows.append(
                    {
                        "model": entry["name"],
                        "method": entry["method"],
                        "flops_keep": entry["flops_keep"],
                        "batch_size": batch_size,
                        "seq_len": seq_len,
                        "median_seconds": median,
                        "min_seconds": min(spent),
                        "seconds": spent,
                        "sequences_per_second": batch_size / median,
                        "tokens_per_second": batch_size * seq_len / median,
                        "flops_kept_at_length": kept,
                        "speedup": speedup,
                        "ideal_speedup": 1 / kept,
                        "fraction_of_ideal": speedup * kept,
                    }
                )
            print(f"batch {batch_size}, seq {seq_len}: teacher {1000 * teacher_median:.2f} ms", flush=True)
    at_32 = [r["fraction_of_ideal"] for r in rows if r["batch_size"] == 32 and r["model"] != TEACHER] or None
    payload = {
        "benchmark": NAME,
        "machine": info,
        "settings": {
            "teacher": str(args.teacher),
            "methods": args.methods,
            "budgets": args.budgets,
            "batch_sizes": args.batch_sizes,
            "seq_lens": args.seq_lens,
            "repeats": args.repeats,
            "warmup": args.warmup,
        },
        "models": [
            {
                "name": entry["name"],
                "source": entry["source"],
                "heads_neurons": unit_counts(entry["model"]),
                "parameters": sum(p.numel() for p in entry["model"].parameters()),
            }
            for entry in models
        ],
        "rows": rows,
        "targets": {
            "min_fraction_of_ideal_at_batch_32": at_32 and min(at_32),
            "at_least_0.8_of_ideal_at_batch_32": at_32 and all(v >= EFFICIENCY_TARGET for v in at_32),
        },
    }
    write_json(args.out / f"{NAME}.json", payload)
    plot(args.out / f"{NAME}.png", rows)
    notes = [
        f"Median of {args.repeats} warm calls ({args.warmup} warm-up) per model and shape, models "
        f"taking turns; {torch.get_num_threads()} torch threads, float32, torch.inference_mode.",
        "speedup = teacher median / model median; ideal = 1 / FLOPs kept at that length; "
        "x ideal = speedup / ideal.",
    ]
    text = write_markdown(
        args.out / f"{NAME}.md", "Inference latency and speedup (CPU)", info, table(rows), notes
    )
    print(text)
    return payload


if __name__ == "__main__":
    main()
