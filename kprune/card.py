"""The model card (README.md) of a pruned-model folder, in the hub's format: YAML metadata, then Markdown.

It says where the model comes from (source, method, hyperparameters, budget), what it kept (FLOPs,
parameters, heads and neurons per layer), how well it does (metrics, when measured), how to load it,
and which kprune and command made it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

from huggingface_hub import ModelCardData
from torch import nn

from kprune.arch import QUESTION_ANSWERING, family_of, head_dim_of, task_of
from kprune.sublayer import unit_counts

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # owner/name


def _unpruned_neurons(config) -> int:
    return getattr(config, "intermediate_size", None) or config.hidden_dim  # DistilBERT: hidden_dim


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(parameters of the pruned model, parameters of the model it was pruned from)."""
    config = model.config
    hidden, head_dim = config.hidden_size, head_dim_of(model)
    heads, neurons = unit_counts(model)
    removed_heads = sum(config.num_attention_heads - count for count in heads)
    removed_neurons = sum(_unpruned_neurons(config) - count for count in neurons)
    # A head: its q/k/v rows and biases and its out-projection columns; a neuron: an up row, its bias
    # and a down column. Every supported family has biases on these maps.
    per_head = 4 * hidden * head_dim + 3 * head_dim
    per_neuron = 2 * hidden + 1
    kept = sum(parameter.numel() for parameter in model.parameters())
    return kept, kept + removed_heads * per_head + removed_neurons * per_neuron


def _is_hub_id(source: str) -> bool:
    return bool(_HUB_ID.match(source)) and not Path(source).exists()


def model_card(
    model: nn.Module,
    record: Mapping | None = None,
    *,
    metrics: Mapping[str, Mapping] | None = None,
    command: str | None = None,
    version: str = "unknown",
) -> str:
    """The README.md text; ``record`` is a PruneRecord's dict, ``metrics`` maps a data set to its metrics."""
    family, task = family_of(model).name, task_of(model)
    source = (record or {}).get("source") or "an encoder"
    pipeline_tag = "question-answering" if task == QUESTION_ANSWERING else "text-classification"
    metadata = ModelCardData(
        library_name="transformers",
        pipeline_tag=pipeline_tag,
        base_model=source if record and _is_hub_id(source) else None,
        tags=["kprune", "pruning", "structured-pruning", family],
    )
    head = "QuestionAnswering" if task == QUESTION_ANSWERING else "SequenceClassification"
    pipeline_line = [  # transformers 5 has no question-answering pipeline
        f'pipe = transformers.pipeline("{pipeline_tag}", model="PATH_OR_HUB_ID", trust_remote_code=True)'
    ]
    if task == QUESTION_ANSWERING:
        pipeline_line = []
    heads, neurons = unit_counts(model)
    kept, original = parameter_counts(model)
    lines = [
        "---",
        metadata.to_yaml(),
        "---",
        "",
        f"# {source}, pruned with K-prune",
        "",
        f"A {family} {task} model with fewer attention heads and FFN neurons per layer, pruned from "
        f"`{source}` without retraining by [kprune](https://arxiv.org/abs/2308.03449) (K-prune: "
        "knowledge-preserving pruning, Park, Choi, Kang, ICLR 2024).",
        "",
        "## Load",
        "",
        "The layers have different widths, which a stock config cannot express, so the folder carries "
        "`modeling_kprune.py` (the family's transformers classes with resized layers; torch and "
        "transformers only) and loading runs it:",
        "",
        "```python",
        "import transformers",
        f'model = transformers.AutoModelFor{head}.from_pretrained("PATH_OR_HUB_ID", trust_remote_code=True)',
        *pipeline_line,
        "",
        "import kprune  # no remote code: kprune's own copy of the classes",
        'model = kprune.load_pruned("PATH")',
        "```",
        "",
        "## What was kept",
        "",
        "| | |",
        "|---|---|",
        f"| parameters | {kept:,} of {original:,} ({100 * kept / original:.1f}%) |",
    ]
    if record:
        config = record.get("config", {})
        budget = record["budget_flops"] / record["flops_original"]
        lines += [
            f"| encoder FLOPs | {100 * record['flops_kept']:.1f}% (budget {100 * budget:.1f}%): "
            f"{record['flops_final']:.3g} of {record['flops_original']:.3g} per sequence of "
            f"{record['seq_len']:.1f} tokens |",
            f"| method | {config.get('method', 'K-prune')} |",
            f"| calibration sample | {record['num_sequences']} sequences, {record['num_tokens']} tokens |",
            "",
            "Hyperparameters: " + ", ".join(f"`{name}={value}`" for name, value in config.items()),
        ]
    lines += ["", "## Heads and neurons per layer", "", "| layer | heads | neurons |", "|---|---|---|"]
    total_heads, total_neurons = model.config.num_attention_heads, _unpruned_neurons(model.config)
    for layer, (layer_heads, layer_neurons) in enumerate(zip(heads, neurons, strict=True)):
        lines.append(f"| {layer} | {layer_heads}/{total_heads} | {layer_neurons}/{total_neurons} |")
    if metrics:
        lines += ["", "## Metrics", ""]
        for data, values in metrics.items():
            measured = ", ".join(
                f"{name} {value:.4f}" if isinstance(value, float) else f"{name} {value}"
                for name, value in values.items()
            )
            lines.append(f"- {data}: {measured}")
    lines += ["", "## Provenance", "", f"kprune {version}"]
    if command:
        lines += ["", "```", command, "```"]
    return "\n".join(lines) + "\n"
