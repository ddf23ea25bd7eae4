"""A bank of feed-forward experts with stacked weights."""

import keras
import tensorflow as tf
from keras import ops

from tf_moe.layers.checks import check_bool, check_keras_object, check_positive_int
from tf_moe.ops.expert_matmul import stacked_feed_forward


@keras.saving.register_keras_serializable(package="tf_moe")
class FeedForwardExperts(keras.layers.Layer):
    """`num_experts` two-layer feed-forward networks applied as batched matmuls.

    Every expert is `activation(x W1_e + b1_e) W2_e + b2_e` (the experts of
    Shazeer et al. 2017, section 2). Their weights are stacked along a leading expert axis
    ([n, d, h], [n, h, o]) so all experts run in one batched matmul on a
    dispatch buffer, whatever their number; their gradient is written out
    (`tf_moe.ops.expert_matmul`), so the backward pass costs twice the
    forward's matmuls, as a dense layer's does.

    Args:
        num_experts: int, number of experts n.
        hidden_units: int, width h of each expert's hidden layer.
        output_units: int, width o of each expert's output.
        activation: activation of the hidden layer.
        use_bias: whether the two layers have biases.
        kernel_initializer: initializer of the stacked [n, d, h] and [n, h, o]
            kernels. The default is Glorot uniform per expert (fans taken from
            the last two axes).
        bias_initializer: initializer of the biases.
        kernel_regularizer, bias_regularizer: optional regularizers.
        **kwargs: base layer arguments (`name`, `dtype`, ...).

    Call arguments:
        inputs: [n, capacity, d], the tokens routed to each expert.

    Returns:
        [n, capacity, o].

    Example:

    >>> experts = FeedForwardExperts(num_experts=4, hidden_units=32, output_units=8)
    >>> experts(keras.random.normal((4, 10, 16))).shape
    TensorShape([4, 10, 8])
    """

    def __init__(
        self,
        num_experts,
        hidden_units,
        output_units,
        activation="relu",
        use_bias=True,
        kernel_initializer=None,
        bias_initializer="zeros",
        kernel_regularizer=None,
        bias_regularizer=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.num_experts = check_positive_int("num_experts", num_experts)
        self.hidden_units = check_positive_int("hidden_units", hidden_units)
        self.output_units = check_positive_int("output_units", output_units)
        self.activation = check_keras_object("activation", keras.activations, activation)
        self.use_bias = check_bool("use_bias", use_bias)
        # Keras computes fans of an [n, d, h] kernel as (n*d, n*h); a scale of
        # n gives each expert the Glorot variance of its own [d, h] kernel.
        self.kernel_initializer = check_keras_object(
            "kernel_initializer", keras.initializers,
            kernel_initializer
            or keras.initializers.VarianceScaling(
                scale=float(self.num_experts), mode="fan_avg", distribution="uniform"
            ),
        )
        self.bias_initializer = check_keras_object("bias_initializer", keras.initializers, bias_initializer)
        self.kernel_regularizer = check_keras_object("kernel_regularizer", keras.regularizers, kernel_regularizer)
        self.bias_regularizer = check_keras_object("bias_regularizer", keras.regularizers, bias_regularizer)

    def build(self, input_shape):
        if len(input_shape) != 3:
            raise ValueError(
                "`inputs` of FeedForwardExperts must have shape "
                f"[num_experts, capacity, d], got shape {input_shape}."
            )
        if input_shape[0] is not None and input_shape[0] != self.num_experts:
            raise ValueError(
                f"`inputs` axis 0 must equal num_experts={self.num_experts}, "
                f"got shape {input_shape}."
            )
        input_units = input_shape[-1]
        if input_units is None:
            raise ValueError("The last axis of `inputs` must be known.")
        n = self.num_experts
        self.kernel_in = self.add_weight(
            name="kernel_in",
            shape=(n, input_units, self.hidden_units),
            initializer=self.kernel_initializer,
            regularizer=self.kernel_regularizer,
        )
        self.kernel_out = self.add_weight(
            name="kernel_out",
            shape=(n, self.hidden_units, self.output_units),
            initializer=self.kernel_initializer,
            regularizer=self.kernel_regularizer,
        )
        if self.use_bias:
            self.bias_in = self.add_weight(
                name="bias_in",
                shape=(n, 1, self.hidden_units),
                initializer=self.bias_initializer,
                regularizer=self.bias_regularizer,
            )
            self.bias_out = self.add_weight(
                name="bias_out",
                shape=(n, 1, self.output_units),
                initializer=self.bias_initializer,
                regularizer=self.bias_regularizer,
            )

    def call(self, inputs):
        weights = [self.kernel_in, self.kernel_out]
        if self.use_bias:
            weights += [self.bias_in, self.bias_out]
        # Read here, as tensors in the compute dtype (Keras autocasts them),
        # so their gradients flow back through the reads to the variables.
        weights = [tf.convert_to_tensor(w) for w in weights]
        inputs = ops.cast(inputs, self.compute_dtype)
        return stacked_feed_forward(inputs, *weights, activation=self.activation)

    def ops_per_token(self):
        """Multiply-adds of one expert on one token (both kernels; needs the layer built)."""
        return self.kernel_in.shape[-2] * self.hidden_units + self.hidden_units * self.output_units

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.output_units,)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_experts": self.num_experts,
                "hidden_units": self.hidden_units,
                "output_units": self.output_units,
                "activation": keras.activations.serialize(self.activation),
                "use_bias": self.use_bias,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
                "bias_initializer": keras.initializers.serialize(self.bias_initializer),
                "kernel_regularizer": keras.regularizers.serialize(self.kernel_regularizer),
                "bias_regularizer": keras.regularizers.serialize(self.bias_regularizer),
            }
        )
        return config
