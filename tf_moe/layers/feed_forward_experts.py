"""A bank of feed-forward experts with stacked weights, plain or gated."""

import keras
import tensorflow as tf
from keras import ops

from tf_moe.layers.checks import check_bool, check_keras_object, check_positive_int
from tf_moe.layers.experts import Experts
from tf_moe.ops.expert_matmul import gated_activation, split_feed_forward, stacked_feed_forward


@keras.saving.register_keras_serializable(package="tf_moe")
class FeedForwardExperts(Experts):
    """`num_experts` two-layer feed-forward networks applied as batched matmuls.

    Every expert is `activation(x W1_e + b1_e) W2_e + b2_e` (the experts of
    Shazeer et al. 2017, section 2), or with `gated=True` the gated linear
    unit `(activation(x W_e + b_e) * (x V_e + c_e)) W2_e + b2_e` of Shazeer
    (2020), "GLU Variants Improve Transformer": SwiGLU with
    `activation="silu"` (the experts of Mixtral, DeepSeekMoE and Qwen-MoE),
    GEGLU with "gelu", GLU with "sigmoid". A gated expert has three kernels
    where a plain one has two; a hidden width of 2/3 of a plain expert's
    keeps parameters and multiply-adds equal. Their weights are stacked
    along a leading expert axis ([n, d, h], [n, h, o]) so all experts run in
    one batched matmul on a dispatch buffer, whatever their number; their
    gradient is written out (`tf_moe.ops.expert_matmul`), so the backward
    pass costs twice the forward's matmuls, as a dense layer's does.

    Args:
        num_experts: int, number of experts n.
        hidden_units: int, width h of each expert's hidden layer.
        output_units: int or None, width o of each expert's output (None:
            the input width).
        activation: activation of the hidden layer (of its gate when
            `gated`).
        use_bias: whether the layers have biases.
        gated: bool, gated linear unit experts: `kernel_gate` [n, d, h] (and
            `bias_gate`) is the activated projection, `kernel_in` the linear
            one.
        kernel_initializer: initializer of the stacked [n, d, h] and [n, h, o]
            kernels. The default is Glorot uniform per expert (fans taken from
            the last two axes).
        bias_initializer: initializer of the biases.
        kernel_regularizer, bias_regularizer: optional regularizers.
        **kwargs: base layer arguments (`name`, `dtype`, ...).

    Call arguments:
        inputs: [n, capacity, d], the tokens routed to each expert, or
            [1, capacity, d], the same tokens for every expert (as
            `MoELayer` runs its shared experts).

    Returns:
        [n, capacity, o].

    Example:

    >>> experts = FeedForwardExperts(num_experts=4, hidden_units=32, output_units=8)
    >>> experts(keras.random.normal((4, 10, 16))).shape
    TensorShape([4, 10, 8])
    >>> swiglu = FeedForwardExperts(4, 21, activation="silu", gated=True)
    >>> swiglu(keras.random.normal((4, 10, 16))).shape
    TensorShape([4, 10, 16])
    """

    # An expert on the second buffer of `call_split` costs what its rows cost
    # plus a fixed part: its weights gathered, its gradients added to the
    # bank's, and each matmul's packing of its weights (with oneDNN on a
    # 2-core x86 host, about 40 rows' worth per expert at 512 x 1024). Costs
    # of 8, 32 and 64 rows gave the experts' forward and backward passes
    # 0.87, 0.88 and 0.86 of the padded buffer's time at 256 experts
    # (`benchmarks/parts.py --experts 256 --router top_k --overflow-cost C`).
    overflow_cost = 32.0
    # `stacked_feed_forward` broadcasts [1, slots, d] against the stacked kernels.
    broadcasts_tokens = True

    def __init__(
        self,
        num_experts,
        hidden_units,
        output_units=None,
        activation="relu",
        use_bias=True,
        gated=False,
        kernel_initializer=None,
        bias_initializer="zeros",
        kernel_regularizer=None,
        bias_regularizer=None,
        **kwargs,
    ):
        super().__init__(num_experts, output_units, **kwargs)
        self.hidden_units = check_positive_int("hidden_units", hidden_units)
        self.activation = check_keras_object("activation", keras.activations, activation)
        self.use_bias = check_bool("use_bias", use_bias)
        self.gated = check_bool("gated", gated)
        # Keras computes fans of an [n, d, h] kernel as (n*d, n*h); a scale of
        # n gives each expert the Glorot variance of its own [d, h] kernel.
        # None (the per-expert Glorot default) is saved as None, so a copy
        # with another number of experts gets its own default.
        self._default_kernel_initializer = kernel_initializer is None
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
        self.check_input_shape(input_shape)
        input_units = input_shape[-1]
        self.output_units = self.output_units or input_units
        n = self.num_experts
        if self.gated:
            self.kernel_gate = self._kernel("kernel_gate", (n, input_units, self.hidden_units))
        self.kernel_in = self._kernel("kernel_in", (n, input_units, self.hidden_units))
        self.kernel_out = self._kernel("kernel_out", (n, self.hidden_units, self.output_units))
        if self.use_bias:
            if self.gated:
                self.bias_gate = self._bias("bias_gate", (n, 1, self.hidden_units))
            self.bias_in = self._bias("bias_in", (n, 1, self.hidden_units))
            self.bias_out = self._bias("bias_out", (n, 1, self.output_units))

    def _kernel(self, name, shape):
        return self.add_weight(
            name=name, shape=shape, initializer=self.kernel_initializer, regularizer=self.kernel_regularizer
        )

    def _bias(self, name, shape):
        return self.add_weight(
            name=name, shape=shape, initializer=self.bias_initializer, regularizer=self.bias_regularizer
        )

    def call(self, inputs):
        weights, activation = self._weights_and_activation()
        return stacked_feed_forward(ops.cast(inputs, self.compute_dtype), *weights, activation=activation)

    def call_split(self, inputs, overflow_inputs, overflow_experts):
        """The experts on every expert's first slots and on further slots of some experts.

        Args:
            inputs: [n, c0, d].
            overflow_inputs: [m, c1, d], row j for expert `overflow_experts[j]`.
            overflow_experts: [m] int32, distinct expert indices.

        Returns:
            `([n, c0, o], [m, c1, o])`, what `call` gives on those rows.
        """
        weights, activation = self._weights_and_activation()
        inputs, overflow_inputs = (ops.cast(x, self.compute_dtype) for x in (inputs, overflow_inputs))
        return split_feed_forward(inputs, overflow_inputs, overflow_experts, *weights, activation=activation)

    def _weights_and_activation(self):
        """`((kernel_in, kernel_out, bias_in, bias_out), activation)` for `tf_moe.ops.expert_matmul`."""
        # Read here, as tensors in the compute dtype (Keras autocasts them
        # inside a layer call; the cast is for `call_split`, called outside
        # one), so their gradients flow back through the reads to the variables.
        def read(variable):
            return ops.cast(tf.convert_to_tensor(variable), self.compute_dtype)

        kernel_in, kernel_out = read(self.kernel_in), read(self.kernel_out)
        bias_in, bias_out = (read(self.bias_in), read(self.bias_out)) if self.use_bias else (None, None)
        activation = self.activation
        if self.gated:
            # Both input projections in one matmul: [n, d, 2h], gate half first.
            kernel_in = tf.concat([read(self.kernel_gate), kernel_in], axis=-1)
            if self.use_bias:
                bias_in = tf.concat([read(self.bias_gate), bias_in], axis=-1)
            activation = gated_activation(self.activation)
        return (kernel_in, kernel_out, bias_in, bias_out), activation

    def ops_per_token(self):
        """Multiply-adds of one expert on one token (every kernel; needs the layer built)."""
        projections = 2 if self.gated else 1
        return projections * self.kernel_in.shape[-2] * self.hidden_units + self.hidden_units * self.output_units

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "hidden_units": self.hidden_units,
                "activation": keras.activations.serialize(self.activation),
                "use_bias": self.use_bias,
                "gated": self.gated,
                "kernel_initializer": None
                if self._default_kernel_initializer
                else keras.initializers.serialize(self.kernel_initializer),
                "bias_initializer": keras.initializers.serialize(self.bias_initializer),
                "kernel_regularizer": keras.regularizers.serialize(self.kernel_regularizer),
                "bias_regularizer": keras.regularizers.serialize(self.bias_regularizer),
            }
        )
        return config
