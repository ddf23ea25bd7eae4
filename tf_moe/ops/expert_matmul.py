"""The stacked experts' two-layer feed-forward pass, with its gradient written out.

Every expert e computes `activation(x_e W1_e + b1_e) W2_e + b2_e` on its slots
of the dispatch buffer; with the weights stacked along a leading expert axis
that is two batched matmuls for all experts at once. The gradient is the
dense layer's, batched: per layer one matmul for the input gradient
(`dy W^T`), one for the kernel gradient (`x^T dy`) and a sum over slots for
the bias, so the backward pass costs twice the forward's matmuls, as for a
dense layer, with no broadcast bookkeeping for the bias or the batch axis
(whose shapes vary with the capacity on the dropless path).
`split_feed_forward` runs the same experts on a dropless buffer split in
two, so that only the experts holding more tokens than the rest get the
extra slots.
"""

import tensorflow as tf


def gated_activation(activation):
    """The hidden layer of a gated linear unit, `activation(a) * b`, from the pre-activation `[a | b]`.

    Shazeer (2020): with `[a | b] = x [W | V]` this is `activation(x W) * (x V)`,
    so `stacked_feed_forward` runs gated experts with one input matmul.
    """

    def glu(pre_activation):
        gate, linear = tf.split(pre_activation, 2, axis=-1)
        return activation(gate) * linear

    return glu


def stacked_feed_forward(inputs, kernel_in, kernel_out, bias_in=None, bias_out=None, activation=tf.nn.relu):
    """`activation(x W1 + b1) W2 + b2` for every expert at once.

    Args:
        inputs: [n, capacity, d], each expert's slots, or [1, capacity, d],
            the same tokens for every expert (shared experts).
        kernel_in: [n, d, h].
        kernel_out: [n, h, o].
        bias_in: [n, 1, h] or None (then `bias_out` must be None too).
        bias_out: [n, 1, o] or None.
        activation: function of the hidden layer's pre-activation, applied
            along the last axis (elementwise, or `gated_activation`'s, which
            halves the width: then `kernel_in` is [n, d, 2h]); its gradient
            is taken by `tf.GradientTape`, for ReLU from its output.

    All tensors share one float dtype (the compute dtype).

    Returns:
        [n, capacity, o], differentiable in every argument.
    """
    weights = _weights(kernel_in, kernel_out, bias_in, bias_out)

    @tf.custom_gradient
    def forward(x, *weights):
        outputs, backward = _two_layers(x, weights, activation)

        def gradient(d_outputs):
            d_x, d_weights = backward(d_outputs)
            if x.shape[0] == 1 and d_x.shape[0] != 1:
                # Tokens broadcast to every expert get every expert's gradient.
                d_x = tf.reduce_sum(d_x, axis=0, keepdims=True)
            return [d_x] + d_weights

        return outputs, gradient

    return forward(inputs, *weights)


def split_feed_forward(
    inputs, overflow_inputs, overflow_experts, kernel_in, kernel_out, bias_in=None, bias_out=None,
    activation=tf.nn.relu,
):
    """`stacked_feed_forward` on every expert's first slots and on more slots of some experts.

    A dropless buffer pads every expert to the fullest one's count. Split,
    every expert gets `c0` slots and only the experts with more assignments
    get `c1` further ones: the second buffer runs on those experts' weights
    alone, gathered (a copy of m experts' weights), and their gradients are
    added to the full bank's. The same function as `stacked_feed_forward` on
    one buffer of `c0 + c1` slots per expert, overflow rows placed at their
    experts and zeros elsewhere, with the zero rows' work left out.

    Args:
        inputs: [n, c0, d], every expert's first slots.
        overflow_inputs: [m, c1, d], further slots of the experts
            `overflow_experts`, row j for expert `overflow_experts[j]`.
        overflow_experts: [m] int32, distinct expert indices.
        kernel_in, kernel_out, bias_in, bias_out, activation: as in
            `stacked_feed_forward`.

    Returns:
        `([n, c0, o], [m, c1, o])`, differentiable in every tensor argument.
    """
    weights = _weights(kernel_in, kernel_out, bias_in, bias_out)

    @tf.custom_gradient
    def forward(x, overflow_x, *weights):
        outputs, backward = _two_layers(x, weights, activation)
        overflow_weights = [tf.gather(w, overflow_experts) for w in weights]
        overflow_outputs, overflow_backward = _two_layers(overflow_x, overflow_weights, activation)

        def gradient(d_outputs, d_overflow_outputs):
            d_x, d_weights = backward(d_outputs)
            d_overflow_x, d_overflow_weights = overflow_backward(d_overflow_outputs)
            d_kernels = [
                # In place: each kernel gradient is a fresh matmul output that
                # nothing else reads, and a copy of the whole bank's gradient
                # (`tensor_scatter_nd_add`) would cost more than the split saves.
                tf.raw_ops.InplaceAdd(x=d, i=overflow_experts, v=v)
                for d, v in zip(d_weights[:2], d_overflow_weights[:2])
            ]
            # A bias gradient may alias its input (a sum over one slot): not in place.
            rows = overflow_experts[:, None]
            d_biases = [tf.tensor_scatter_nd_add(d, rows, v) for d, v in zip(d_weights[2:], d_overflow_weights[2:])]
            return [d_x, d_overflow_x] + d_kernels + d_biases

        return (outputs, overflow_outputs), gradient

    return forward(inputs, overflow_inputs, *weights)


def _weights(kernel_in, kernel_out, bias_in, bias_out):
    if (bias_in is None) != (bias_out is None):
        raise ValueError("Give both `bias_in` and `bias_out`, or neither.")
    return (kernel_in, kernel_out) + (() if bias_in is None else (bias_in, bias_out))


def _two_layers(x, weights, activation):
    """The experts' outputs on one buffer, and the function of their gradient.

    `backward(d_outputs)` returns `(d_x, d_weights)`, `d_weights` in the
    order of `weights` (kernels, then biases if any).
    """
    w_in, w_out = weights[:2]
    use_bias = len(weights) == 4
    pre_activation = tf.matmul(x, w_in)
    if use_bias:
        pre_activation = pre_activation + weights[2]
    # Persistent: the outer gradient may be taken more than once.
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(pre_activation)
        hidden = activation(pre_activation)
    outputs = tf.matmul(hidden, w_out)
    if use_bias:
        outputs = outputs + weights[3]

    def backward(d_outputs):
        d_hidden = tf.matmul(d_outputs, w_out, adjoint_b=True)
        d_pre = tape.gradient(hidden, pre_activation, output_gradients=d_hidden)
        d_x = tf.matmul(d_pre, w_in, adjoint_b=True)
        # The weights' gradients only after the kernels' last reads (d_hidden,
        # d_x): an optimizer that updates a variable while a read of it is
        # alive first copies the whole variable (TensorFlow's copy-on-write),
        # the whole expert bank here.
        with tf.control_dependencies([d_x]):
            d_weights = [tf.matmul(x, d_pre, adjoint_a=True), tf.matmul(hidden, d_outputs, adjoint_a=True)]
            if use_bias:
                d_weights += [
                    tf.reduce_sum(d_pre, axis=1, keepdims=True),
                    tf.reduce_sum(d_outputs, axis=1, keepdims=True),
                ]
        return d_x, d_weights

    return outputs, backward
