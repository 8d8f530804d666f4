"""Dev accuracy of the teacher and a K-prune model in torch, as a float ONNX graph and as its int8
dynamic quantisation (kprune export-onnx --quantize int8), on the pipeline's embedded default data.

    python -m bench.onnx_accuracy                                   # needs data/teacher, data/prepared
    python -m bench.onnx_accuracy --budgets 0.5 --sample-tokens 2000 --out /tmp/onnx   # a smoke run

No timing: accuracies and the agreement of each runtime's predictions with torch's. Writes
<out>/onnx_accuracy.json and onnx_accuracy.md.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from bench.common import (
    METHODS,
    add_data_arguments,
    draw_sample,
    floats,
    load_teacher,
    machine,
    markdown_table,
    read_dev,
    set_threads,
    write_json,
    write_markdown,
)
from kprune.onnx_export import export_onnx, input_names, onnx_logits, onnx_session

NAME = "onnx_accuracy"
BATCH = 64


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.onnx_accuracy", description=__doc__.split("\n\n")[0]
    )
    add_data_arguments(parser)
    parser.add_argument("--budgets", type=floats, default=[0.5], help="K-prune FLOPs kept (%(default)s)")
    parser.add_argument("--sample-tokens", type=int, default=100_000, help="K-prune sample (%(default)s)")
    return parser.parse_args(argv)


def predictions(forward, inputs: dict[str, torch.Tensor]) -> np.ndarray:
    """Argmax class of every dev row, in batches of BATCH."""
    rows = len(inputs["input_ids"])
    chunks = []
    for start in range(0, rows, BATCH):
        batch = {name: value[start : start + BATCH] for name, value in inputs.items()}
        width = int(batch["attention_mask"].sum(1).max())  # trim the common padding
        chunks.append(forward({name: value[:, :width] for name, value in batch.items()}).argmax(-1))
    return np.concatenate(chunks)


def measure(name: str, model: torch.nn.Module, inputs: dict, labels: np.ndarray, folder: Path) -> list[dict]:
    inputs = {key: inputs[key] for key in input_names(model)}
    with torch.inference_mode():
        reference = predictions(lambda batch: model(**batch).logits.numpy(), inputs)
    rows = [
        {"model": name, "runtime": "torch", "accuracy": float((reference == labels).mean()), "agreement": 1.0}
    ]
    for quantize in (None, "int8"):
        path = export_onnx(model, folder / f"{name}-{quantize or 'float'}.onnx", quantize=quantize)
        session = onnx_session(path, threads=torch.get_num_threads())
        predicted = predictions(lambda batch, session=session: onnx_logits(session, batch)[0], inputs)
        rows.append(
            {
                "model": name,
                "runtime": f"onnxruntime {quantize or 'float32'}",
                "accuracy": float((predicted == labels).mean()),
                "agreement": float((predicted == reference).mean()),
                "megabytes": path.stat().st_size / 2**20,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    set_threads(args.threads)
    teacher = load_teacher(args.teacher)
    inputs, labels = read_dev(args.prepared)
    labels = labels.numpy()
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        rows += measure("teacher", teacher, inputs, labels, Path(scratch))
        if args.budgets:
            sample, sample_labels = draw_sample(args.prepared, args.sample_tokens, args.seed)
        for budget in args.budgets:
            pruned = METHODS["kprune"].run(teacher, sample, sample_labels, budget).model.eval()
            rows += measure(f"K-prune {budget:g}", pruned, inputs, labels, Path(scratch))
    info = machine()
    payload = {
        "benchmark": NAME,
        "machine": info,
        "settings": {
            "teacher": str(args.teacher),
            "budgets": args.budgets,
            "sample_tokens": args.sample_tokens,
        },
        "dev_rows": len(labels),
        "rows": rows,
    }
    write_json(args.out / f"{NAME}.json", payload)
    body = [
        [row["model"], row["runtime"], f"{100 * row['accuracy']:.2f}", f"{100 * row['agreement']:.2f}"]
        for row in rows
    ]
    table = markdown_table(["model", "runtime", "dev accuracy %", "agrees with torch %"], body)
    notes = [f"{len(labels)} dev rows of the pipeline's first dev split; int8: onnxruntime quantize_dynamic."]
    print(
        write_markdown(
            args.out / f"{NAME}.md", "ONNX export: accuracy of float32 and int8", info, table, notes
        )
    )
    return payload


if __name__ == "__main__":
    main()
