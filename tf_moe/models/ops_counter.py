"""Multiply-adds per timestep, counted the way the paper's Table 1 does."""

import math

import keras

from tf_moe.layers.moe_layer import MoELayer


def _kernel_size(*variables):
    return sum(math.prod(v.shape) for v in variables)


def layer_ops_per_timestep(layer):
    """Multiply-adds one token costs in `layer` at inference.

    Dense-like layers cost one multiply-add per kernel weight; an LSTM its
    input and recurrent kernels; an MoE layer its router plus the `k` experts
    a token visits (`MoELayer.ops_per_token`, whatever the router);
    multi-head attention its four projections (not the scores, which grow
    with the context, as attention is left out of the paper's count). Layers
    without a kernel (embedding lookups, dropout, adds) count as zero.
    """
    if isinstance(layer, MoELayer):
        return layer.ops_per_token()
    if isinstance(layer, keras.layers.Bidirectional):
        return layer_ops_per_timestep(layer.forward_layer) + layer_ops_per_timestep(layer.backward_layer)
    if isinstance(layer, keras.layers.RNN):
        cell = layer.cell
        return _kernel_size(cell.kernel, cell.recurrent_kernel)
    if isinstance(layer, keras.layers.Dense):
        return _kernel_size(layer.kernel)
    if isinstance(layer, keras.layers.MultiHeadAttention):
        # The query, key, value and output projections; the attention scores
        # and their weighted sum grow with the context and are not counted.
        return _kernel_size(*(w for w in layer.weights if w.name == "kernel"))
    if isinstance(layer, keras.Model):
        return sum(layer_ops_per_timestep(sub) for sub in layer.layers)
    return 0


def ops_per_timestep(model, exclude=("embedding", "position_embedding", "logits")):
    """Multiply-adds per timestep of `model`, excluding embedding and softmax.

    This is the "ops/timestep" of the paper's Table 1: the cost of one
    token's forward pass through every layer but the embedding and the
    softmax. Attention over a source sentence is not counted (it grows with
    the source length).

    Args:
        model: a built Keras model.
        exclude: names of top-level layers left out (the models of
            `tf_moe.models` name their softmax projection "logits").

    Returns:
        int, multiply-adds per timestep.

    Example:

    >>> model = lstm_lm(vocab_size=100, units=8, num_experts=4, k=2,
    ...                 expert_hidden_units=16)
    >>> ops_per_timestep(model)  # 2 LSTMs + gate + 2 experts
    1568
    """
    if not model.built:
        raise ValueError("`model` must be built before counting its ops.")
    return sum(
        layer_ops_per_timestep(layer) for layer in model.layers if layer.name not in exclude
    )
