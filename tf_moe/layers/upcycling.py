"""Sparse upcycling: an `MoELayer` whose experts start as copies of a trained dense FFN."""

import keras
import numpy as np

from tf_moe.layers.moe_layer import MoELayer


def _dense_weights(layer, arg):
    """`(kernel, bias or None, activation or None)` of a Keras `Dense` layer or a `(kernel, bias)` pair."""
    if isinstance(layer, keras.layers.Dense):
        if not layer.built:
            raise ValueError(f"`{arg}`: the Dense layer must be built (trained) before upcycling.")
        bias = None if layer.bias is None else keras.ops.convert_to_numpy(layer.bias)
        return keras.ops.convert_to_numpy(layer.kernel), bias, layer.activation
    if isinstance(layer, (tuple, list)) and len(layer) in (1, 2):
        kernel = np.asarray(layer[0])
        bias = None if len(layer) == 1 or layer[1] is None else np.asarray(layer[1])
        if kernel.ndim != 2 or (bias is not None and bias.shape != kernel.shape[1:]):
            raise ValueError(
                f"`{arg}` must be a Dense layer or (kernel [d, h], bias [h] or None), got shapes "
                f"{kernel.shape} and {None if bias is None else bias.shape}."
            )
        return kernel, bias, None
    raise ValueError(f"`{arg}` must be a keras.layers.Dense or a (kernel, bias) pair, got {type(layer).__name__}.")


# The router of an upcycled layer unless told: gate values that sum to 1
# (the layer starts as the FFN) from a random start (the copies move apart).
UPCYCLING_ROUTER = "top_k_gate"


def upcycle(hidden, output, num_experts, k=None, activation=None, **moe_arguments):
    """An `MoELayer` made from a trained dense FFN, every expert a copy of it (sparse upcycling).

    Komatsuzaki et al. (2023), "Sparse Upcycling: Training Mixture-of-Experts
    from Dense Checkpoints": each expert starts as the dense FFN
    `activation(x W1 + b1) W2 + b2`, the router fresh, and training
    continues. The default router is `UPCYCLING_ROUTER` (`TopKGateRouter`):
    its gate values, a softmax over the chosen experts, sum to 1, so the
    new layer computes exactly the dense FFN until the experts' weights
    move apart (as with `"noisy_top_k"` or `TopKRouter(..., normalize=True)`;
    `MoELayer`'s default `TopKRouter` scales each token's FFN output by the
    probability its k experts hold), and its random start tells the copies
    apart from the first step (from a zero gate without noise they would
    get the same tokens and gradients and never move apart).

    Args:
        hidden: the FFN's first layer: a built `keras.layers.Dense` (its
            activation is the experts') or a `(kernel [d, h], bias [h] or
            None)` pair.
        output: its second layer, likewise (`[h, o]`, no activation).
        num_experts: int, number of experts.
        k: int or None, experts per token (as `MoELayer`'s `k`).
        activation: the hidden activation when `hidden` is a pair (default
            "relu"); must be None for a Dense layer, whose own is used.
        **moe_arguments: further `MoELayer` arguments (`router`, default
            `UPCYCLING_ROUTER`; `name`, ...), not the feed-forward ones,
            which come from the FFN.

    Returns:
        A built `MoELayer` with inputs of width d.

    Example:

    >>> hidden, output = keras.layers.Dense(64, activation="relu"), keras.layers.Dense(16)
    >>> y = output(hidden(keras.ops.ones((2, 16))))
    >>> moe = upcycle(hidden, output, num_experts=8, k=2)
    >>> moe.experts.kernel_in.shape
    TensorShape([8, 16, 64])
    """
    kernel_in, bias_in, hidden_activation = _dense_weights(hidden, "hidden")
    kernel_out, bias_out, output_activation = _dense_weights(output, "output")
    if output_activation not in (None, keras.activations.linear):
        raise ValueError("`output`: the FFN's second layer must have no activation.")
    if activation is not None and hidden_activation is not None:
        raise ValueError("`activation`: `hidden` is a Dense layer, whose activation the experts take.")
    if kernel_out.shape[0] != kernel_in.shape[1]:
        raise ValueError(
            f"`output`'s kernel {kernel_out.shape} does not follow `hidden`'s {kernel_in.shape}."
        )
    if (bias_in is None) != (bias_out is None):
        raise ValueError("`hidden` and `output` must both have biases or both have none.")
    input_units, hidden_units = kernel_in.shape
    moe_arguments.setdefault("router", UPCYCLING_ROUTER)
    moe = MoELayer(
        num_experts, k, hidden_units, output_units=kernel_out.shape[1],
        activation=hidden_activation or activation or "relu", use_bias=bias_in is not None,
        **moe_arguments,
    )
    moe.build((None, input_units))
    _copy_into_experts(moe.experts, kernel_in, bias_in, kernel_out, bias_out)
    return moe


def load_dense_ffn(moe, hidden, output):
    """Sets every expert of a built `MoELayer` to a copy of a dense FFN (its router is left alone).

    Args:
        moe: a built `MoELayer` with plain `FeedForwardExperts` of the FFN's
            shapes, activation and biases.
        hidden, output: the FFN's two layers, as for `upcycle`.
    """
    kernel_in, bias_in, hidden_activation = _dense_weights(hidden, "hidden")
    kernel_out, bias_out, _ = _dense_weights(output, "output")
    experts = moe.experts
    if experts.gated or experts.kernel_in.shape[1:] != kernel_in.shape or experts.kernel_out.shape[1:] != kernel_out.shape:
        raise ValueError(
            f"`moe`'s experts ({'gated, ' if experts.gated else ''}{experts.kernel_in.shape[1:]} and "
            f"{experts.kernel_out.shape[1:]}) are not of the FFN's shapes {kernel_in.shape} and {kernel_out.shape}."
        )
    if hidden_activation not in (None, experts.activation) or experts.use_bias != (bias_in is not None):
        raise ValueError("`moe`'s experts differ from the FFN in activation or biases.")
    _copy_into_experts(experts, kernel_in, bias_in, kernel_out, bias_out)


def _copy_into_experts(experts, kernel_in, bias_in, kernel_out, bias_out):
    weights = [experts.kernel_in, experts.kernel_out]
    copies = [kernel_in, kernel_out]
    if experts.use_bias:
        weights += [experts.bias_in, experts.bias_out]
        copies += [bias_in[None], bias_out[None]]
    for variable, value in zip(weights, copies):
        variable.assign(np.broadcast_to(value, variable.shape))
