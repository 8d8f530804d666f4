"""kprune export-onnx: one ONNX graph with dynamic batch and sequence axes whose onnxruntime logits
match torch's, for every family and task head, pruned (with an empty attention layer) or not."""

import onnx
import pytest
import torch
from test_io import CASES, pruned

import kprune
from kprune.cli import main
from kprune.onnx_export import TOLERANCE, example_batch, export_onnx, max_logit_difference, output_names
from kprune.sublayer import Sublayer, unit_counts


def dynamic_axes(path) -> dict[str, list]:
    graph = onnx.load(str(path)).graph
    return {
        value.name: [dim.dim_param or dim.dim_value for dim in value.type.tensor_type.shape.dim]
        for value in [*graph.input, *graph.output]
    }


@pytest.mark.parametrize("family,task", CASES)
def test_onnxruntime_matches_torch_on_another_shape(tmp_path, family, task):
    _, _, result = pruned(family, task)
    kprune.save_pruned(result.model, tmp_path / "pruned")
    model = kprune.load_pruned(tmp_path / "pruned")
    path = export_onnx(model, tmp_path / "model.onnx")
    # Traced on a 2x8 batch; checked on 3x11 and 1x5.
    for batch, length in ((3, 11), (1, 5)):
        assert max_logit_difference(model, path, example_batch(model, batch, length, seed=1)) <= TOLERANCE
    axes = dynamic_axes(path)
    assert all(isinstance(size, str) for size in axes["input_ids"])  # batch and sequence are symbolic
    assert set(output_names(model)) < set(axes)


def test_a_layer_without_heads_exports(tmp_path):
    model = pruned("bert", "classification")[2].model
    Sublayer(model, 2).keep_units(torch.zeros(unit_counts(model)[0][1], dtype=torch.bool))
    assert unit_counts(model)[0][1] == 0
    path = export_onnx(model, tmp_path / "model.onnx")
    assert max_logit_difference(model, path, example_batch(model, 3, 11, seed=1)) <= TOLERANCE


def test_int8_quantization_quantizes_the_matrix_products(tmp_path):
    model = pruned("bert", "classification")[2].model
    path = export_onnx(model, tmp_path / "int8.onnx", quantize="int8")
    operators = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= operators
    # Rounding changes the logits (how much is measured on a real model, README); random tiny weights
    # say nothing of accuracy, so this checks only that the graph runs on a new shape.
    difference = max_logit_difference(model, path, example_batch(model, 3, 11, seed=1))
    assert 0 < difference < float("inf")


def test_cli_exports_and_reports_the_check(tmp_path, capsys):
    _, _, result = pruned("distilbert", "qa")
    kprune.save_pruned(result.model, tmp_path / "pruned")
    out = tmp_path / "onnx" / "model.onnx"
    assert main(["export-onnx", str(tmp_path / "pruned"), "--out", str(out), "--quiet"]) == 0
    stdout = capsys.readouterr().out
    assert "max |logit difference|" in stdout and f"saved to {out.resolve()}" in stdout
    assert set(dynamic_axes(out)) >= {"input_ids", "attention_mask", "start_logits", "end_logits"}


@pytest.mark.parametrize(
    "options,message",
    [(["--quantize", "int4"], "invalid choice"), (["--out", "."], "is a folder")],
)
def test_cli_rejects_bad_options_before_work(tmp_path, capsys, options, message):
    _, _, result = pruned("bert", "classification")
    kprune.save_pruned(result.model, tmp_path / "pruned")
    with pytest.raises(SystemExit) as exit_info:
        main(["export-onnx", str(tmp_path / "pruned"), "--out", str(tmp_path / "m.onnx"), *options])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
