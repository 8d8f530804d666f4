"""ONNX export of a (pruned) model, with dynamic batch and sequence axes, checked with onnxruntime.

``torch.onnx.export`` (the torch.export-based exporter) traces the transformers forward of the model as
it is: pruned layers are plain narrower matrices, so the graph needs nothing of kprune. ``--quantize
int8`` then applies onnxruntime's dynamic quantisation (int8 weights of the matrix products,
activations quantised on the fly).
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kprune.arch import QUESTION_ANSWERING, family_of, task_of

TOLERANCE = 1e-4  # max |logit difference| between onnxruntime and torch accepted for a float export
QUANTIZATIONS = ("int8",)


def input_names(model: nn.Module) -> list[str]:
    names = ["input_ids", "attention_mask"]
    return names if family_of(model).name == "distilbert" else [*names, "token_type_ids"]


def output_names(model: nn.Module) -> list[str]:
    return ["start_logits", "end_logits"] if task_of(model) == QUESTION_ANSWERING else ["logits"]


class _TaskOutputs(nn.Module):
    """The model with named tensor inputs and a tuple of logits out (what an ONNX graph can hold)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.qa = task_of(model) == QUESTION_ANSWERING

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        segments = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, **segments)
        return (outputs.start_logits, outputs.end_logits) if self.qa else (outputs.logits,)


def example_batch(model: nn.Module, batch: int, length: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random token ids (above the special ids) with right padding and two segments."""
    generator = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    input_ids = torch.randint(min(5, vocab - 1), vocab, (batch, length), generator=generator)
    lengths = torch.randint(1, length + 1, (batch,), generator=generator)
    lengths[0] = length
    attention_mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if "token_type_ids" in input_names(model):
        inputs["token_type_ids"] = (
            torch.arange(length)[None, :] >= lengths[:, None] // 2
        ).long() * attention_mask
    return inputs


def export_onnx(model: nn.Module, path: str | Path, *, quantize: str | None = None) -> Path:
    """Write ``model`` (on the CPU, in eval mode) as an ONNX graph to ``path``; quantize: None or "int8"."""
    if quantize not in (None, *QUANTIZATIONS):
        raise ValueError(f"unknown quantization {quantize!r}; choose from {', '.join(QUANTIZATIONS)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.to("cpu").eval()
    example = example_batch(model, batch=2, length=8)
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    with tempfile.TemporaryDirectory() as scratch:
        float_path = Path(scratch) / "float.onnx" if quantize else path
        with _quiet("torch.onnx"):
            torch.onnx.export(
                _TaskOutputs(model).eval(),
                (),
                f=str(float_path),
                kwargs=example,
                input_names=list(example),
                output_names=output_names(model),
                dynamic_shapes={name: {0: batch, 1: sequence} for name in example},
                dynamo=True,
                external_data=False,  # one self-contained file
                verbose=False,
            )
        if quantize == "int8":
            import onnx
            from onnxruntime.quantization import QuantType, quantize_dynamic

            # The quantiser's shape inference rejects some of the exporter's recorded intermediate
            # shapes (transposed weights); without them it infers every shape itself.
            graph = onnx.load(str(float_path))
            del graph.graph.value_info[:]
            onnx.save(graph, str(float_path))
            with _quiet(""):  # the quantiser logs on the root logger
                quantize_dynamic(float_path, path, weight_type=QuantType.QInt8)
    return path


@contextlib.contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    """Without the warnings of the exporter (absent torchvision ops, deprecations, renamed axes) or of
    the quantiser (advice to pre-process, which fails on these graphs): they say nothing about this
    graph. Errors still raise."""
    quieted = logging.getLogger(logger_name)
    level = quieted.level
    quieted.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        quieted.setLevel(level)


def onnx_session(path: str | Path, threads: int | None = None):
    """An onnxruntime CPU session (threads: intra-op threads, None for onnxruntime's default)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def onnx_logits(session, batch: Mapping[str, torch.Tensor]) -> list[np.ndarray]:
    names = [graph_input.name for graph_input in session.get_inputs()]
    return session.run(None, {name: batch[name].cpu().numpy() for name in names})


@torch.no_grad()
def max_logit_difference(model: nn.Module, path: str | Path, batch: Mapping[str, torch.Tensor]) -> float:
    """max |onnxruntime logits - torch logits| over every output on ``batch``."""
    expected = _TaskOutputs(model.to("cpu").eval())(**batch)
    got = onnx_logits(onnx_session(path), batch)
    return max(float(np.abs(g - e.numpy()).max()) for g, e in zip(got, expected, strict=True))
