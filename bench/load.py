"""Load time of a pruned folder against from_pretrained of the unpruned model (the target: at most
1.5x).

    python -m bench.load                                   # BERT-base shape, pruned to half its units
    python -m bench.load --bert-shape 2,16,4,24 --repeats 2 --warmup 0 --out /tmp/load   # a smoke run

A random BERT-base-shaped classifier is saved with save_pretrained (the unpruned folder) and, cut to
--keep of every layer's heads and neurons, with kprune.save_pruned (the pruned folder). Each repeat loads
them in turn in this process, warm (imports done, files in the page cache): transformers'
from_pretrained of the unpruned folder, kprune.load_pruned of the pruned one, and from_pretrained with
trust_remote_code of the pruned one. Writes <out>/load.json and load.md.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import transformers

import kprune
from bench.common import RESULTS, ints, machine, markdown_table, set_threads, write_json, write_markdown
from bench.cost import BERT_BASE_SHAPE, bert_base_random
from kprune.sublayer import set_unit_counts, unit_counts

NAME = "load"
TARGET_RATIO = 1.5  # pruned load time / unpruned from_pretrained time
BASELINE = "from_pretrained, unpruned"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--bert-shape",
        type=ints,
        default=list(BERT_BASE_SHAPE),
        help="layers,hidden,heads,ffn of the random model (%(default)s)",
    )
    parser.add_argument(
        "--keep", type=float, default=0.5, help="fraction of units kept per layer (%(default)s)"
    )
    parser.add_argument("--repeats", type=int, default=10, help="timed loads of each (%(default)s)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed loads of each first (%(default)s)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder (%(default)s)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    return parser.parse_args(argv)


def loaders(unpruned: Path, pruned: Path) -> dict:
    auto = transformers.AutoModelForSequenceClassification
    return {
        BASELINE: lambda: auto.from_pretrained(unpruned),
        "kprune.load_pruned, pruned": lambda: kprune.load_pruned(pruned),
        "from_pretrained (remote code), pruned": lambda: auto.from_pretrained(pruned, trust_remote_code=True),
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    set_threads(args.threads)
    transformers.utils.logging.disable_progress_bar()
    model = bert_base_random(args.bert_shape, vocab_size=30522, seed=0)
    with tempfile.TemporaryDirectory() as scratch:
        unpruned, pruned = Path(scratch) / "unpruned", Path(scratch) / "pruned"
        model.save_pretrained(unpruned)
        layers, _, heads, ffn = args.bert_shape
        set_unit_counts(model, [round(args.keep * heads)] * layers, [round(args.keep * ffn)] * layers)
        kprune.save_pruned(model, pruned)
        runs = loaders(unpruned, pruned)
        for load in runs.values():
            for _ in range(args.warmup):
                load()
        times = {name: [] for name in runs}
        for _ in range(args.repeats):
            for name, load in runs.items():  # taking turns: load from other processes hits all alike
                started = time.perf_counter()
                load()
                times[name].append(time.perf_counter() - started)
    medians = {name: statistics.median(spent) for name, spent in times.items()}
    baseline = medians[BASELINE]
    rows = [
        {"loader": name, "median_seconds": medians[name], "seconds": spent, "ratio": medians[name] / baseline}
        for name, spent in times.items()
    ]
    info = machine()
    payload = {
        "benchmark": NAME,
        "machine": info,
        "settings": vars(args) | {"out": str(args.out), "structure": unit_counts(model)},
        "rows": rows,
        "targets": {
            f"pruned_at_most_{TARGET_RATIO}x_unpruned": all(
                row["ratio"] <= TARGET_RATIO for row in rows if row["loader"] != BASELINE
            )
        },
    }
    write_json(args.out / f"{NAME}.json", payload)
    body = [[row["loader"], f"{1000 * row['median_seconds']:.1f}", f"{row['ratio']:.2f}"] for row in rows]
    notes = [
        f"Median of {args.repeats} warm loads ({args.warmup} warm-up) each, taking turns; random weights "
        f"of shape {args.bert_shape} (layers, hidden, heads, FFN); pruned: {args.keep:g} of every layer's "
        "units.",
        f"ratio = median / from_pretrained of the unpruned folder; target <= {TARGET_RATIO}.",
    ]
    table = markdown_table(["loader", "median ms", "ratio"], body)
    print(write_markdown(args.out / f"{NAME}.md", "Load time of a pruned folder", info, table, notes))
    return payload


if __name__ == "__main__":
    main()
