"""Family adapters: where each encoder keeps its attention heads, FFN neurons and task head.

K-prune sees an encoder as a stack of 2L sublayers, each a sum of independent units followed by a
residual connection and a LayerNorm (post-LN):

    attention sublayer:  LN(X + W_O [ctx_1; ...; ctx_H] + b_O)     units = heads (d_h features each)
    FFN sublayer:        LN(X + W_down act(W_up X + b_up) + b_down)  units = neurons (1 feature each)

An adapter only says where the linear maps of those formulas live in a transformers model; the
math is written once, in :mod:`kprune.sublayer`. Adding a family is one ``Family`` entry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from kprune.tasks import CLASSIFICATION, QUESTION_ANSWERING, REGRESSION

ATTENTION = "attention"
FFN = "ffn"


@dataclass(frozen=True)
class Family:
    """Attribute paths of one encoder family, relative to the model's base model and to one layer."""

    name: str
    layers: str  # ModuleList of layers, relative to model.base_model
    self_attention: str  # module that holds q/k/v (replaced when every head is pruned)
    query: str
    key: str
    value: str
    attention_output: str
    attention_norm: str
    ffn_up: str
    ffn_activation: str  # attribute holding the activation callable
    ffn_down: str
    ffn_norm: str
    classify: Callable[[nn.Module, torch.Tensor], torch.Tensor]  # final hidden states -> logits
    # The classification head's first linear map, which reads the first token's final hidden state.
    head_input: Callable[[nn.Module], nn.Linear]


def _bert_classify(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    return model.classifier(model.base_model.pooler(hidden))


def _head_module_classify(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    # RoBERTa, XLM-R and ELECTRA classification heads take the whole sequence and pick token 0.
    return model.classifier(hidden)


def _distilbert_classify(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    return model.classifier(torch.relu(model.pre_classifier(hidden[:, 0])))


def _bert_head_input(model: nn.Module) -> nn.Linear:
    return model.base_model.pooler.dense


def _head_module_input(model: nn.Module) -> nn.Linear:
    return model.classifier.dense


def _distilbert_head_input(model: nn.Module) -> nn.Linear:
    return model.pre_classifier


_BERT_LIKE = dict(
    layers="encoder.layer",
    self_attention="attention.self",
    query="attention.self.query",
    key="attention.self.key",
    value="attention.self.value",
    attention_output="attention.output.dense",
    attention_norm="attention.output.LayerNorm",
    ffn_up="intermediate.dense",
    ffn_activation="intermediate.intermediate_act_fn",
    ffn_down="output.dense",
    ffn_norm="output.LayerNorm",
)

FAMILIES: dict[str, Family] = {
    "bert": Family("bert", classify=_bert_classify, head_input=_bert_head_input, **_BERT_LIKE),
    "roberta": Family("roberta", classify=_head_module_classify, head_input=_head_module_input, **_BERT_LIKE),
    "xlm-roberta": Family(
        "xlm-roberta", classify=_head_module_classify, head_input=_head_module_input, **_BERT_LIKE
    ),
    "electra": Family("electra", classify=_head_module_classify, head_input=_head_module_input, **_BERT_LIKE),
    "distilbert": Family(
        "distilbert",
        layers="transformer.layer",
        self_attention="attention",
        query="attention.q_lin",
        key="attention.k_lin",
        value="attention.v_lin",
        attention_output="attention.out_lin",
        attention_norm="sa_layer_norm",
        ffn_up="ffn.lin1",
        ffn_activation="ffn.activation",
        ffn_down="ffn.lin2",
        ffn_norm="output_layer_norm",
        classify=_distilbert_classify,
        head_input=_distilbert_head_input,
    ),
}


class UnsupportedModelError(ValueError):
    """The model is not an encoder family or task head that kprune knows."""


def family_of(model: nn.Module) -> Family:
    config = getattr(model, "config", None)
    # A pruned folder's config (kprune.modeling_kprune) has a model_type of its own and names its family.
    model_type = getattr(config, "pruned_family", None) or getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise UnsupportedModelError(
            f"kprune cannot prune model_type {model_type!r} ({type(model).__name__}); "
            f"supported encoder families: {', '.join(sorted(FAMILIES))}."
        )
    return FAMILIES[model_type]


def task_of(model: nn.Module) -> str:
    """The task head of a model: classification, regression or extractive question answering."""
    if hasattr(model, "qa_outputs"):
        return QUESTION_ANSWERING
    if hasattr(model, "classifier"):
        config = model.config
        if config.problem_type == "regression" or config.num_labels == 1:
            return REGRESSION
        if config.problem_type == "multi_label_classification":
            raise UnsupportedModelError("multi-label classification heads are not supported.")
        return CLASSIFICATION
    raise UnsupportedModelError(
        f"{type(model).__name__} has no task head; kprune needs a fine-tuned *ForSequenceClassification "
        "or *ForQuestionAnswering model, because it preserves the model's predictions."
    )


def head_dim_of(model: nn.Module) -> int:
    config = model.config
    return config.hidden_size // config.num_attention_heads


def encoder_layers(model: nn.Module) -> nn.ModuleList:
    return model.base_model.get_submodule(family_of(model).layers)


def task_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Logits from the last encoder hidden states: (B, C) for classification/regression, (B, S, 2) for QA."""
    if task_of(model) == QUESTION_ANSWERING:
        return model.qa_outputs(hidden)
    return family_of(model).classify(model, hidden)


def head_input_map(model: nn.Module) -> nn.Linear:
    """The head's first linear map, the one that reads the encoder's last hidden states: the pooler's or
    classification head's dense map at the first token (BERT's pooler, RoBERTa's classifier.dense,
    DistilBERT's pre_classifier), or QA's qa_outputs at every token."""
    if task_of(model) == QUESTION_ANSWERING:
        return model.qa_outputs
    return family_of(model).head_input(model)


class _EncoderInputCaptured(Exception):
    def __init__(self, hidden: torch.Tensor):
        self.hidden = hidden


def encoder_input(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The hidden states entering layer 0 (embeddings, plus ELECTRA's projection); the encoder is not run."""

    def capture(module, args, kwargs):
        raise _EncoderInputCaptured(args[0] if args else kwargs["hidden_states"])

    handle = encoder_layers(model)[0].register_forward_pre_hook(capture, with_kwargs=True)
    try:
        model(**batch)
    except _EncoderInputCaptured as captured:
        return captured.hidden
    finally:
        handle.remove()
    raise RuntimeError("the model never called its first encoder layer")
