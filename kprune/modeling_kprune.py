"""Encoders with a different number of attention heads and FFN neurons in each layer (pruned by kprune).

kprune copies this file into every pruned-model folder, next to a config whose ``auto_map`` names the
classes below, so that ``AutoModelFor...from_pretrained(folder, trust_remote_code=True)`` and
``transformers.pipeline(..., trust_remote_code=True)`` load the folder without kprune installed. It needs
only torch and transformers. Each model class is the family's own transformers class; the one change is
that, before its weights are initialised or loaded, every layer's linear maps are resized to
``config.heads_per_layer`` heads and ``config.neurons_per_layer`` FFN neurons. The forward pass is
transformers' own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import (
    BertConfig,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    DistilBertConfig,
    DistilBertForQuestionAnswering,
    DistilBertForSequenceClassification,
    ElectraConfig,
    ElectraForQuestionAnswering,
    ElectraForSequenceClassification,
    RobertaConfig,
    RobertaForQuestionAnswering,
    RobertaForSequenceClassification,
    XLMRobertaConfig,
    XLMRobertaForQuestionAnswering,
    XLMRobertaForSequenceClassification,
)


@dataclass(frozen=True)
class Layout:
    """Where one family keeps a layer's linear maps (module paths)."""

    layers: str  # ModuleList of layers, relative to model.base_model
    self_attention: str  # the module holding q/k/v, relative to a layer
    attention_inputs: tuple[str, str, str]  # query, key, value
    attention_output: str
    ffn_up: str
    ffn_down: str


_BERT_LAYOUT = Layout(
    layers="encoder.layer",
    self_attention="attention.self",
    attention_inputs=("attention.self.query", "attention.self.key", "attention.self.value"),
    attention_output="attention.output.dense",
    ffn_up="intermediate.dense",
    ffn_down="output.dense",
)
_DISTILBERT_LAYOUT = Layout(
    layers="transformer.layer",
    self_attention="attention",
    attention_inputs=("attention.q_lin", "attention.k_lin", "attention.v_lin"),
    attention_output="attention.out_lin",
    ffn_up="ffn.lin1",
    ffn_down="ffn.lin2",
)

# By family name (kprune.arch's names): the same paths as kprune's adapter table, which this file
# cannot import.
LAYOUTS = {
    "bert": _BERT_LAYOUT,
    "roberta": _BERT_LAYOUT,
    "xlm-roberta": _BERT_LAYOUT,
    "electra": _BERT_LAYOUT,
    "distilbert": _DISTILBERT_LAYOUT,
}


class EmptyAttention(nn.Module):
    """Self-attention with every head pruned: it contributes only the output bias.

    transformers reshapes q/k/v with ``view(..., -1, head_dim)``, which fails on zero heads, so the
    attention module is swapped for this one. It keeps the original (now zero-width) linear maps under
    their original names, so state-dict keys do not change.
    """

    def __init__(self, original: nn.Module, output_name: str | None):
        super().__init__()
        for name, child in original.named_children():
            self.add_module(name, child)
        self.output_name = output_name

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        context = hidden_states.new_zeros(*hidden_states.shape[:-1], 0)
        if self.output_name is not None:  # the output projection lives inside this module (DistilBERT)
            return getattr(self, self.output_name)(context), None
        return context, None


def resize_layers(model: nn.Module, layout: Layout, heads: list[int], neurons: list[int]) -> None:
    """Give layer i heads[i] attention heads and neurons[i] FFN neurons (new weights uninitialised)."""
    layers = model.base_model.get_submodule(layout.layers)
    if not len(heads) == len(neurons) == len(layers):
        raise ValueError(f"{len(heads)} head and {len(neurons)} neuron counts for {len(layers)} layers")
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    for layer, num_heads, num_neurons in zip(layers, heads, neurons, strict=True):
        for path in layout.attention_inputs:
            _resize(layer, path, out_features=num_heads * head_dim)
        _resize(layer, layout.attention_output, in_features=num_heads * head_dim)
        _resize(layer, layout.ffn_up, out_features=num_neurons)
        _resize(layer, layout.ffn_down, in_features=num_neurons)
        if num_heads == 0:
            inner = layout.attention_output.removeprefix(layout.self_attention + ".")
            output_name = inner if inner != layout.attention_output else None
            original = layer.get_submodule(layout.self_attention)
            layer.set_submodule(layout.self_attention, EmptyAttention(original, output_name))


def _resize(layer: nn.Module, path: str, *, in_features: int | None = None, out_features: int | None = None):
    old = layer.get_submodule(path)
    shape = (
        old.out_features if out_features is None else out_features,
        old.in_features if in_features is None else in_features,
    )
    factory = dict(device=old.weight.device, dtype=old.weight.dtype)
    # Built without nn.Linear.__init__: transformers initialises or loads the weights next, and
    # nn.Linear's own init would be wasted work that warns on zero-width layers.
    new = nn.Linear.__new__(nn.Linear)
    nn.Module.__init__(new)
    new.out_features, new.in_features = shape
    new.weight = nn.Parameter(torch.empty(shape, **factory))
    if old.bias is None:
        new.register_parameter("bias", None)
    else:
        new.bias = nn.Parameter(torch.empty(shape[0], **factory))
    layer.set_submodule(path, new)


class PrunedLayers:
    """Mixin for a transformers model class: resize the layers to the config's counts in ``post_init``.

    ``post_init`` runs once every module exists and before the weights are initialised; inside
    ``from_pretrained`` the model is built on the meta device, so the full-size maps cost nothing.
    """

    layout: Layout

    def post_init(self):
        resize_layers(self, self.layout, self.config.heads_per_layer, self.config.neurons_per_layer)
        super().post_init()


# One config class per family: the family's config under its own model_type, so that loading a pruned
# folder without trust_remote_code stops with transformers' "contains custom code" message instead
# of a shape mismatch; pruned_family names the family (the keys of LAYOUTS).
class KPrunedBertConfig(BertConfig):
    model_type = "kprune-bert"
    pruned_family = "bert"


class KPrunedRobertaConfig(RobertaConfig):
    model_type = "kprune-roberta"
    pruned_family = "roberta"


class KPrunedXLMRobertaConfig(XLMRobertaConfig):
    model_type = "kprune-xlm-roberta"
    pruned_family = "xlm-roberta"


class KPrunedDistilBertConfig(DistilBertConfig):
    model_type = "kprune-distilbert"
    pruned_family = "distilbert"


class KPrunedElectraConfig(ElectraConfig):
    model_type = "kprune-electra"
    pruned_family = "electra"


class KPrunedBertForSequenceClassification(PrunedLayers, BertForSequenceClassification):
    config_class = KPrunedBertConfig
    layout = LAYOUTS["bert"]


class KPrunedBertForQuestionAnswering(PrunedLayers, BertForQuestionAnswering):
    config_class = KPrunedBertConfig
    layout = LAYOUTS["bert"]


class KPrunedRobertaForSequenceClassification(PrunedLayers, RobertaForSequenceClassification):
    config_class = KPrunedRobertaConfig
    layout = LAYOUTS["roberta"]


class KPrunedRobertaForQuestionAnswering(PrunedLayers, RobertaForQuestionAnswering):
    config_class = KPrunedRobertaConfig
    layout = LAYOUTS["roberta"]


class KPrunedXLMRobertaForSequenceClassification(PrunedLayers, XLMRobertaForSequenceClassification):
    config_class = KPrunedXLMRobertaConfig
    layout = LAYOUTS["xlm-roberta"]


class KPrunedXLMRobertaForQuestionAnswering(PrunedLayers, XLMRobertaForQuestionAnswering):
    config_class = KPrunedXLMRobertaConfig
    layout = LAYOUTS["xlm-roberta"]


class KPrunedDistilBertForSequenceClassification(PrunedLayers, DistilBertForSequenceClassification):
    config_class = KPrunedDistilBertConfig
    layout = LAYOUTS["distilbert"]


class KPrunedDistilBertForQuestionAnswering(PrunedLayers, DistilBertForQuestionAnswering):
    config_class = KPrunedDistilBertConfig
    layout = LAYOUTS["distilbert"]


class KPrunedElectraForSequenceClassification(PrunedLayers, ElectraForSequenceClassification):
    config_class = KPrunedElectraConfig
    layout = LAYOUTS["electra"]


class KPrunedElectraForQuestionAnswering(PrunedLayers, ElectraForQuestionAnswering):
    config_class = KPrunedElectraConfig
    layout = LAYOUTS["electra"]
