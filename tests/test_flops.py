import pytest

from kprune.flops import encoder_flops, head_flops, neuron_flops


def test_head_flops_matches_hand_count_of_each_matmul():
    d, d_h, s = 4, 2, 3
    # multiply-adds of each matmul of one head, 2 FLOPs each
    q_proj = k_proj = v_proj = s * d * d_h  # (s, d) @ (d, d_h) = 3*4*2 = 24
    scores = s * d_h * s  # (s, d_h) @ (d_h, s) = 18
    context = s * s * d_h  # (s, s) @ (s, d_h) = 18
    out_proj = s * d_h * d  # (s, d_h) @ (d_h, d) = 24
    multiply_adds = q_proj + k_proj + v_proj + scores + context + out_proj
    assert multiply_adds == 24 + 24 + 24 + 18 + 18 + 24
    assert head_flops(d, d_h, s) == 2 * 132 == 264


def test_neuron_flops_matches_hand_count():
    d, s = 4, 3
    up_row = s * d  # (s, d) @ (d, 1) = 12 multiply-adds
    down_column = s * d  # (s, 1) @ (1, d) = 12 multiply-adds
    assert neuron_flops(d, s) == 2 * (up_row + down_column) == 48


def test_fractional_seq_len():
    # average token lengths are not integers (SST-2: 25.16)
    s = 25.16
    assert head_flops(8, 2, s) == pytest.approx(6 * 8 * 2 * s + 4 * s * s * 2 + 2 * 2 * s * 8)
    assert neuron_flops(8, s) == pytest.approx(4 * s * 8)


def test_encoder_flops_is_sum_over_layers():
    heads, neurons = [2, 0, 1], [5, 3, 0]
    expected = (2 + 0 + 1) * 264 + (5 + 3 + 0) * 48
    assert encoder_flops(heads, neurons, hidden_size=4, head_dim=2, seq_len=3) == expected
    assert encoder_flops([], [], hidden_size=4, head_dim=2, seq_len=3) == 0


def test_bert_base_total():
    d, s, layers = 768, 128, 12
    # Independent count with full matrices: Q, K, V, O are (d, d); scores and context over all 12 heads;
    # the FFN has two (d, 4d) matrices.
    attention = 4 * (2 * s * d * d) + 2 * (2 * s * s * d)
    ffn = 2 * (2 * s * d * 4 * d)
    expected = layers * (attention + ffn)
    assert expected == 22_347_251_712  # ~11.2 G multiply-adds, the usual BERT-base figure at s=128
    assert encoder_flops([12] * layers, [3072] * layers, hidden_size=d, head_dim=64, seq_len=s) == expected


@pytest.mark.parametrize(
    "call",
    [
        lambda: head_flops(0, 2, 3),
        lambda: head_flops(4, -1, 3),
        lambda: head_flops(4, 2, 0),
        lambda: head_flops(4, 2, float("nan")),
        lambda: head_flops(4.0, 2, 3),
        lambda: neuron_flops(4, -3),
        lambda: neuron_flops(True, 3),
        lambda: encoder_flops([1, 2], [3], 4, 2, 3),
        lambda: encoder_flops([1, -2], [3, 3], 4, 2, 3),
        lambda: encoder_flops([1], [2.5], 4, 2, 3),
    ],
)
def test_bad_arguments_raise(call):
    with pytest.raises(ValueError):
        call()
