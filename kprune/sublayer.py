"""One sublayer of a post-LN encoder, computed from explicit tensors.

Every sublayer is written as  ``output = LN(X + W_out F + b_out)`` where ``F`` holds the features of its
units: per-head context vectors (``units`` heads of ``width = d_h`` features) or FFN activations
(``units`` neurons of width 1). Features are returned as a 4-D tensor ``(B, S, units, width)`` so the
knowledge, tuning and surgery code never needs to know which kind of sublayer it handles.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kprune.arch import ATTENTION, FFN, Family, encoder_layers, family_of, head_dim_of
from kprune.flops import encoder_flops
from kprune.modeling_kprune import EmptyAttention


@dataclass
class Sublayer:
    """Sublayer ``index`` (0..2L-1) of ``model``: attention of layer index//2 if even, else its FFN."""

    model: nn.Module
    index: int

    @property
    def layer(self) -> int:
        return self.index // 2

    @property
    def kind(self) -> str:
        return ATTENTION if self.index % 2 == 0 else FFN

    # Resolved once: a prune reads them about 120k times (the layer module itself is never replaced, only
    # its parts).
    @functools.cached_property
    def family(self) -> Family:
        return family_of(self.model)

    @functools.cached_property
    def module(self) -> nn.Module:
        return encoder_layers(self.model)[self.layer]

    def part(self, attribute: str) -> nn.Module:
        return self.module.get_submodule(getattr(self.family, attribute))

    @property
    def input_parts(self) -> tuple[str, ...]:
        """The Family attributes of the maps whose output rows belong to the units."""
        return ("query", "key", "value") if self.kind == ATTENTION else ("ffn_up",)

    @property
    def output_part(self) -> str:
        """The Family attribute of the output projection, whose input columns belong to the units."""
        return "attention_output" if self.kind == ATTENTION else "ffn_down"

    @property
    def output(self) -> nn.Linear:
        return self.part(self.output_part)

    @property
    def layer_norm(self) -> nn.LayerNorm:
        return self.part("attention_norm" if self.kind == ATTENTION else "ffn_norm")

    @property
    def width(self) -> int:
        """Features per unit: d_h for a head, 1 for a neuron."""
        return head_dim_of(self.model) if self.kind == ATTENTION else 1

    @property
    def num_units(self) -> int:
        return self.output.in_features // self.width

    def features(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor, first_token_only: bool = False
    ) -> torch.Tensor:
        """Unit features (B, S, units, width): the input of the output projection, split by unit.

        first_token_only: the features at each sequence's first position only, (B, 1, units, width), the
        same values as the first position of the full result (an attention sublayer's one query still
        attends to every token): all a sequence classifier's head reads of the last layer."""
        batch = hidden.shape[0]
        queries = hidden[:, :1] if first_token_only else hidden
        units = self.num_units
        if self.kind == FFN:
            activation = functools.reduce(getattr, self.family.ffn_activation.split("."), self.module)
            return activation(self.part("ffn_up")(queries)).unsqueeze(-1)
        d_h = self.width
        if units == 0:
            return hidden.new_zeros(batch, queries.shape[1], 0, d_h)
        query, key, value = (
            self.part(name)(inputs).view(batch, inputs.shape[1], units, d_h).transpose(1, 2)
            for name, inputs in (("query", queries), ("key", hidden), ("value", hidden))
        )
        keys_visible = attention_mask[:, None, None, :].bool()
        context = F.scaled_dot_product_attention(query, key, value, attn_mask=keys_visible)
        return context.transpose(1, 2)

    def residual_sum(self, hidden: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Pre-LayerNorm output X + W_out F + b_out (the bias stays even when every unit is pruned)."""
        return hidden + self.output(features.flatten(2))

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.layer_norm(self.residual_sum(hidden, self.features(hidden, attention_mask)))

    def output_column_norms(self) -> torch.Tensor:
        """Squared norm of each output-projection column, as (units, width)."""
        return self.output.weight.detach().pow(2).sum(0).view(self.num_units, self.width)

    def keep_units(self, keep: torch.Tensor, output_weight: torch.Tensor | None = None) -> None:
        """Physically remove the units where ``keep`` is False; optionally set the new output weight."""
        keep = keep.to(device="cpu", dtype=torch.bool)
        if keep.shape != (self.num_units,):
            raise ValueError(f"keep mask has shape {tuple(keep.shape)}, sublayer has {self.num_units} units")
        columns = torch.arange(self.num_units * self.width).view(self.num_units, self.width)[keep].flatten()
        for name in self.input_parts:
            self._replace(name, _select(self.part(name), columns, dim=0))
        self._replace(self.output_part, _select(self.output, columns, dim=1))
        if output_weight is not None:
            self.set_output_weight(output_weight)
        if self.kind == ATTENTION and not keep.any():
            self._empty_attention()

    def set_output_weight(self, weight: torch.Tensor) -> None:
        """Copy a (tuned) weight of the output projection's shape into it."""
        output = self.output
        if weight.shape != output.weight.shape:
            raise ValueError(f"tuned weight {tuple(weight.shape)} != {tuple(output.weight.shape)}")
        output.weight.data.copy_(weight)

    def release_weights(self) -> None:
        """Let this sublayer's weights go: each parameter of its maps and LayerNorm becomes an empty tensor,
        so its memory is freed unless another model shares it. The module keeps its sizes (unit counts and
        FLOPs still read) but can no longer run."""
        for part in (*(self.part(name) for name in self.input_parts), self.output, self.layer_norm):
            for name, parameter in list(part.named_parameters(recurse=False)):
                setattr(part, name, nn.Parameter(parameter.detach().new_empty(0), requires_grad=False))

    def _replace(self, attribute: str, new: nn.Module) -> None:
        self.module.set_submodule(getattr(self.family, attribute), new)

    def _empty_attention(self) -> None:
        path = self.family.self_attention
        original = self.module.get_submodule(path)
        if isinstance(original, EmptyAttention):
            return
        output_path = self.family.attention_output
        inner_output = output_path[len(path) + 1 :] if output_path.startswith(path + ".") else None
        self.module.set_submodule(path, EmptyAttention(original, inner_output))


def _select(linear: nn.Linear, index: torch.Tensor, dim: int) -> nn.Linear:
    """A new Linear with only the given output rows (dim 0) or input columns (dim 1)."""
    index = index.to(linear.weight.device)
    weight = linear.weight.detach().index_select(dim, index)
    bias = linear.bias
    if bias is not None:
        bias = bias.detach()[index] if dim == 0 else bias.detach()
    # Built without nn.Linear.__init__: its random init is wasted work and warns on zero-width layers.
    new = nn.Linear.__new__(nn.Linear)
    nn.Module.__init__(new)
    new.in_features, new.out_features = weight.shape[1], weight.shape[0]
    new.weight = nn.Parameter(weight.clone(), requires_grad=linear.weight.requires_grad)
    if bias is None:
        new.register_parameter("bias", None)
    else:
        new.bias = nn.Parameter(bias.clone(), requires_grad=linear.bias.requires_grad)
    return new


def sublayers(model: nn.Module) -> list[Sublayer]:
    return [Sublayer(model, index) for index in range(2 * len(encoder_layers(model)))]


def unit_counts(model: nn.Module) -> tuple[list[int], list[int]]:
    """(heads per layer, neurons per layer) of a possibly pruned model."""
    counts = [sub.num_units for sub in sublayers(model)]
    return counts[0::2], counts[1::2]


def encoder_flops_of(model: nn.Module, seq_len: float) -> float:
    """FLOPs of the model's heads and neurons for sequences of ``seq_len`` tokens."""
    heads, neurons = unit_counts(model)
    return encoder_flops(heads, neurons, model.config.hidden_size, head_dim_of(model), seq_len)


def set_unit_counts(model: nn.Module, heads: list[int], neurons: list[int]) -> None:
    """Shape an unpruned model like a pruned one (keeping the first units), before loading its weights."""
    subs = sublayers(model)
    counts = [count for pair in zip(heads, neurons, strict=True) for count in pair]
    if len(counts) != len(subs):
        raise ValueError(f"the structure has {len(counts) // 2} layers, the model {len(subs) // 2}")
    for sub, count in zip(subs, counts, strict=True):
        if not 0 <= count <= sub.num_units:
            raise ValueError(f"sublayer {sub.index} cannot keep {count} of {sub.num_units} units")
        sub.keep_units(torch.arange(sub.num_units) < count)
