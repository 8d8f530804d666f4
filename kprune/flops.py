"""FLOPs model of K-prune: cost of one attention head and one FFN neuron for a sequence of length s.

A multiply-add counts as 2 FLOPs. Embeddings, LayerNorm, biases, pooler and classifier are not counted,
so only heads and neurons (the prunable units) make up a model's FLOPs.
"""

import math
from collections.abc import Sequence
from numbers import Integral, Real


def _check_positive_size(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, Integral) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _check_seq_len(seq_len: float) -> None:
    is_number = isinstance(seq_len, Real) and not isinstance(seq_len, bool)
    if not (is_number and math.isfinite(seq_len) and seq_len > 0):
        raise ValueError(f"seq_len must be a finite number > 0, got {seq_len!r}")


def head_flops(hidden_size: int, head_dim: int, seq_len: float) -> float:
    """FLOPs of one attention head: Q/K/V projections, QK^T, attention x V and its slice of the output."""
    _check_positive_size("hidden_size", hidden_size)
    _check_positive_size("head_dim", head_dim)
    _check_seq_len(seq_len)
    d, d_h, s = hidden_size, head_dim, float(seq_len)
    return 3 * 2 * d * d_h * s + 2 * 2 * s * s * d_h + 2 * d_h * s * d


def neuron_flops(hidden_size: int, seq_len: float) -> float:
    """FLOPs of one FFN neuron: one row of the up projection and one column of the down projection."""
    _check_positive_size("hidden_size", hidden_size)
    _check_seq_len(seq_len)
    return 2 * 2 * float(seq_len) * hidden_size


def encoder_flops(
    heads_per_layer: Sequence[int],
    neurons_per_layer: Sequence[int],
    hidden_size: int,
    head_dim: int,
    seq_len: float,
) -> float:
    """FLOPs of an encoder with the given number of heads and neurons in each layer."""
    if len(heads_per_layer) != len(neurons_per_layer):
        raise ValueError(
            f"heads_per_layer has {len(heads_per_layer)} layers, neurons_per_layer {len(neurons_per_layer)}"
        )
    for name, counts in (("heads_per_layer", heads_per_layer), ("neurons_per_layer", neurons_per_layer)):
        if any(isinstance(c, bool) or not isinstance(c, Integral) or c < 0 for c in counts):
            raise ValueError(f"{name} must hold non-negative ints, got {list(counts)!r}")
    per_head = head_flops(hidden_size, head_dim, seq_len)
    per_neuron = neuron_flops(hidden_size, seq_len)
    layers = zip(heads_per_layer, neurons_per_layer, strict=True)
    return sum(heads * per_head + neurons * per_neuron for heads, neurons in layers)
