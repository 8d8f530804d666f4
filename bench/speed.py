"""Inference speed: CPU latency and throughput of the teacher and of pruned models in torch and in
onnxruntime, warm, median of repeats, and the speedup against the ideal 1 / FLOPs kept.

    python -m bench.speed                      # structures from bench/results/accuracy.json if it exists
    python -m bench.speed --batch-sizes 1 --seq-lens 64 --repeats 3 --budgets 0.5   # a smoke run

Speed depends only on the pruned model's shape (heads and neurons per layer), so by default the shapes
come from the K-prune runs of the accuracy sweep (--structures); budgets it does not hold are pruned here
with --sample-tokens. Each model is timed alone, its calls back to back: models taking turns slowed each
other, because every onnxruntime session keeps its own threads spinning for a while after a call (measured
at batch 1: the teacher's session took 10.1 ms alone, 37.6 ms taking turns with three pruned ones), so the
bench needs a quiet machine.
Inputs are full-length sequences (no padding). The ideal speedup is the FLOPs ratio at that sequence
length (kprune's FLOPs model: heads and neurons only; embeddings, LayerNorm and classifier are not pruned).
Each model also runs as the float ONNX graph of ``kprune export-onnx`` in onnxruntime (--runtimes), with
as many intra-op threads as torch; speedups compare models within one runtime, and
``vs torch`` compares a model's onnxruntime latency with its torch latency.
Writes <out>/speed.json, speed.png (speedup vs FLOPs kept, with the ideal) and speed.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import tempfile
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
TORCH, ONNXRUNTIME = "torch", "onnxruntime"
RUNTIMES = (TORCH, ONNXRUNTIME)
EFFICIENCY_TARGET = 0.8  # pruned models should reach 0.8 x the ideal speedup at batch 32


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.speed", description=__doc__.split("\n\n")[0])
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
        "--runtimes", type=runtime_names, default=list(RUNTIMES), help=f"of: {', '.join(RUNTIMES)}"
    )
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


def runtime_names(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = sorted(set(names) - set(RUNTIMES))
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown runtime(s) {unknown}; choose from {', '.join(RUNTIMES)}")
    return names


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


def time_models(runs: list[dict], batch: dict, repeats: int, warmup: int) -> list[list[float]]:
    """Seconds of each call: one run (a model in a runtime) after the other, each warmed up and then
    called ``repeats`` times back to back, as a server runs one model (see the module's docstring)."""
    times: list[list[float]] = []
    with torch.inference_mode():
        for run in runs:
            given = run["inputs"](batch)  # converted once, outside the timing
            for _ in range(warmup):
                run["call"](given)
            spent = []
            for _ in range(repeats):
                started = time.perf_counter()
                run["call"](given)
                spent.append(time.perf_counter() - started)
            times.append(spent)
    return times


def torch_run(model: torch.nn.Module) -> dict:
    import inspect

    accepted = inspect.signature(model.forward).parameters  # DistilBERT takes no token_type_ids
    return {
        "inputs": lambda batch: {name: value for name, value in batch.items() if name in accepted},
        "call": lambda given: model(**given),
    }


def onnxruntime_run(model: torch.nn.Module, folder: Path, name: str) -> dict:
    """The model's float ONNX export (kprune export-onnx) in an onnxruntime session."""
    from kprune.onnx_export import export_onnx, onnx_session

    path = export_onnx(model, folder / f"{name.replace(' ', '_')}.onnx")
    session = onnx_session(path, threads=torch.get_num_threads())
    names = [graph_input.name for graph_input in session.get_inputs()]
    return {
        "inputs": lambda batch: {name: batch[name].numpy() for name in names},
        "call": lambda given: session.run(None, given),
    }


def runtime_call(runtime: str, entry: dict, onnx_folder: Path) -> dict:
    if runtime == TORCH:
        return torch_run(entry["model"])
    return onnxruntime_run(entry["model"], onnx_folder, entry["name"])


def shape_rows(
    runs: list[dict], times: list[list[float]], teacher: torch.nn.Module, batch_size: int, seq_len: int
) -> list[dict]:
    """One row per run at one input shape; speedups against the teacher in the same runtime."""
    medians = {
        (run["name"], run["runtime"]): statistics.median(spent)
        for run, spent in zip(runs, times, strict=True)
    }
    teacher_flops = encoder_flops_of(teacher, seq_len)
    rows = []
    for run, spent in zip(runs, times, strict=True):
        median = medians[(run["name"], run["runtime"])]
        kept = encoder_flops_of(run["model"], seq_len) / teacher_flops
        speedup = medians[(TEACHER, run["runtime"])] / median
        torch_median = medians.get((run["name"], TORCH))
        rows.append(
            {
                "model": run["name"],
                "runtime": run["runtime"],
                "method": run["method"],
                "flops_keep": run["flops_keep"],
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
                "speedup_over_torch": None if torch_median is None else torch_median / median,
            }
        )
    return rows


def plot(path: Path, rows: list[dict]) -> None:
    plt = pyplot()
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for shape in dict.fromkeys((r["runtime"], r["batch_size"], r["seq_len"]) for r in rows):
        points = sorted(
            (r["flops_kept_at_length"], r["speedup"])
            for r in rows
            if (r["runtime"], r["batch_size"], r["seq_len"]) == shape and r["model"] != TEACHER
        )
        if points:
            x, y = zip(*points, strict=True)
            style = "-" if shape[0] == TORCH else ":"
            axes.plot(x, y, style, marker="o", label=f"{shape[0]}, batch {shape[1]}, seq {shape[2]}")
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
            r["runtime"],
            r["batch_size"],
            r["seq_len"],
            f"{1000 * r['median_seconds']:.2f}",
            f"{r['sequences_per_second']:.1f}",
            f"{r['flops_kept_at_length']:.3f}",
            f"{r['speedup']:.2f}",
            f"{r['ideal_speedup']:.2f}",
            f"{r['fraction_of_ideal']:.2f}",
            "" if r["speedup_over_torch"] is None else f"{r['speedup_over_torch']:.2f}",
        ]
        for r in rows
    ]
    headers = [
        "model",
        "runtime",
        "batch",
        "seq",
        "median ms",
        "seq/s",
        "FLOPs kept",
        "speedup",
        "ideal",
        "x ideal",
        "vs torch",
    ]
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
    vocab = teacher.config.vocab_size
    info = machine()
    rows = []
    with tempfile.TemporaryDirectory() as onnx_folder:
        runs = [
            {**entry, "runtime": runtime, **runtime_call(runtime, entry, Path(onnx_folder))}
            for runtime in args.runtimes
            for entry in models
        ]
        for batch_size in args.batch_sizes:
            for seq_len in args.seq_lens:
                times = time_models(
                    runs, inputs(batch_size, seq_len, vocab, args.seed), args.repeats, args.warmup
                )
                rows += shape_rows(runs, times, teacher, batch_size, seq_len)
                teachers = ", ".join(
                    f"{row['runtime']} {1000 * row['median_seconds']:.2f} ms"
                    for row in rows[-len(runs) :]
                    if row["model"] == TEACHER
                )
                print(f"batch {batch_size}, seq {seq_len}: teacher {teachers}", flush=True)
    at_32 = [
        r["fraction_of_ideal"]
        for r in rows
        if r["batch_size"] == 32 and r["model"] != TEACHER and r["runtime"] == TORCH
    ] or None
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
            "runtimes": args.runtimes,
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
        f"Median of {args.repeats} warm calls ({args.warmup} warm-up) per model and shape, each "
        f"model alone; {torch.get_num_threads()} torch threads, float32, torch.inference_mode.",
        "speedup = teacher median / model median in the same runtime; ideal = 1 / FLOPs kept at that "
        "length; x ideal = speedup / ideal; vs torch = the model's torch median / its median here.",
        "onnxruntime: the float graph of kprune export-onnx, CPU provider, intra-op threads = torch threads.",
    ]
    text = write_markdown(
        args.out / f"{NAME}.md", "Inference latency and speedup (CPU)", info, table(rows), notes
    )
    print(text)
    return payload


if __name__ == "__main__":
    main()
