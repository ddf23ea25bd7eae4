"""The stacked experts' two-layer feed-forward pass, with its gradient written out.

Every expert e computes `activation(x_e W1_e + b1_e) W2_e + b2_e` on its slots
of the dispatch buffer; with the weights stacked along a leading expert axis
that is two batched matmuls for all experts at once. The gradient is the
dense layer's, batched: per layer one matmul for the input gradient
(`dy W^T`), one for the kernel gradient (`x^T dy`) and a sum over slots for
the bias, so the backward pass costs twice the forward's matmuls, as for a
dense layer, with no broadcast bookkeeping for the bias or the batch axis
(whose shapes vary with the capacity on the dropless path).
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
        inputs: [n, capacity, d], each expert's slots.
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
    if (bias_in is None) != (bias_out is None):
        raise ValueError("Give both `bias_in` and `bias_out`, or neither.")
    use_bias = bias_in is not None
    args = (inputs, kernel_in, kernel_out) + ((bias_in, bias_out) if use_bias else ())

    @tf.custom_gradient
    def forward(*args):
        x, w_in, w_out = args[:3]
        pre_activation = tf.matmul(x, w_in)
        if use_bias:
            pre_activation = pre_activation + args[3]
        # Persistent: the outer gradient may be taken more than once.
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(pre_activation)
            hidden = activation(pre_activation)
        outputs = tf.matmul(hidden, w_out)
        if use_bias:
            outputs = outputs + args[4]

        def gradient(d_outputs):
            d_hidden = tf.matmul(d_outputs, w_out, adjoint_b=True)
            d_w_out = tf.matmul(hidden, d_outputs, adjoint_a=True)
            d_pre = tape.gradient(hidden, pre_activation, output_gradients=d_hidden)
            grads = [tf.matmul(d_pre, w_in, adjoint_b=True), tf.matmul(x, d_pre, adjoint_a=True), d_w_out]
            if use_bias:
                grads += [
                    tf.reduce_sum(d_pre, axis=1, keepdims=True),
                    tf.reduce_sum(d_outputs, axis=1, keepdims=True),
                ]
            return grads

        return outputs, gradient

    return forward(*args)
