"""Smoke test of bench.onnx_accuracy on the tiny workspace of test_bench: torch, float32 and int8 rows
for the teacher and a K-prune model, with accuracies and agreements that the predictions give."""

import json

from test_bench import common_args, workspace  # noqa: F401  (workspace is a fixture)

from bench import onnx_accuracy


def test_onnx_accuracy_writes_every_runtime(workspace):  # noqa: F811
    payload = onnx_accuracy.main(common_args(workspace) + ["--budgets", "0.5", "--sample-tokens", "100"])
    saved = json.loads((workspace / "out" / "onnx_accuracy.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(payload["rows"]))
    runtimes = ["torch", "onnxruntime float32", "onnxruntime int8"]
    assert [(row["model"], row["runtime"]) for row in saved["rows"]] == [
        (model, runtime) for model in ("teacher", "K-prune 0.5") for runtime in runtimes
    ]
    for row in saved["rows"]:
        assert 0 <= row["accuracy"] <= 1 and 0 <= row["agreement"] <= 1
    float_rows = [row for row in saved["rows"] if row["runtime"] == "onnxruntime float32"]
    assert all(row["agreement"] == 1.0 for row in float_rows)  # float32 differs by ~1e-6 only
    assert saved["dev_rows"] == 20
