"""The sparsely-gated Mixture-of-Experts layer (PAPER.md sections 1-3)."""

import keras
import numpy as np
import tensorflow as tf

from tf_moe.layers.batchwise_gate import BatchwiseGate
from tf_moe.layers.feed_forward_experts import FeedForwardExperts
from tf_moe.layers.checks import (
    check_capacity_factor,
    check_non_negative,
    check_not_above,
    check_positive_int,
)
from tf_moe.layers.noisy_top_k_gate import NoisyTopKGate
from tf_moe.layers.replica_losses import use_thread_local_losses
from tf_moe.layers.softmax_gate import SoftmaxGate
from tf_moe.metrics import LoadBalanceMetrics
from tf_moe.ops import dispatch as dispatch_ops
from tf_moe.ops.gating import cv_squared

_GATES = ("noisy_top_k", "softmax", "batchwise")


def cross_replica_sum(values):
    """Sums a list of tensors over the replicas of a tf.distribute strategy.

    The balancing losses are functions of the whole batch X, so under data
    parallelism importance and load are summed over replicas before CV^2, and
    every replica sees the loss of the global batch. The forward pass is one
    all-reduce; the backward pass needs none: each replica sends the loss
    gradient into its own share, scaled by the number of
    replicas to undo Keras's 1/replicas loss scaling, so the summed gradients
    equal single-device training on the global batch.
    """
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return values
    replicas = float(context.num_replicas_in_sync)
    totals = context.all_reduce(tf.distribute.ReduceOp.SUM, [tf.stop_gradient(v) for v in values])
    return [
        total + replicas * (value - tf.stop_gradient(value))
        for total, value in zip(totals, values)
    ]


def flatten_tokens(inputs, mask):
    """Flattens [..., d] inputs (and [...] mask) into one batch of tokens.

    Returns `(tokens [T, d], valid [T] bool or None, num_tokens)`, with
    `num_tokens` a Python int when the leading shape is static.
    """
    if mask is not None and len(mask.shape) != len(inputs.shape) - 1:
        raise ValueError(
            f"`mask` must have the shape of `inputs` without its last axis; got mask "
            f"shape {mask.shape} for inputs shape {inputs.shape}."
        )
    leading = inputs.shape[:-1]
    tokens = tf.reshape(inputs, [-1, inputs.shape[-1]])
    if all(dim is not None for dim in leading):
        num_tokens = int(np.prod(leading, dtype=np.int64))
    else:
        num_tokens = tf.shape(tokens)[0]
    valid = None if mask is None else tf.reshape(tf.cast(mask, tf.bool), [-1])
    return tokens, valid, num_tokens


@keras.saving.register_keras_serializable(package="tf_moe")
class MoE(keras.layers.Layer):
    """Sparsely-gated Mixture-of-Experts layer (Shazeer et al., 2017).

    `y = sum_i G(x)_i E_i(x)` with noisy top-k gating: each token is sent to
    k of `num_experts` feed-forward experts, and only those experts run on
    it. All leading axes of the input are flattened into one batch of tokens
    (the paper's "convolutionality"), so an MoE after an LSTM runs on every
    time step at once. While training it adds
    `importance_weight * CV(Importance)^2 + load_weight * CV(Load)^2` with
    `add_loss`, and it reports its load balance in the `fit` logs under
    `<name>_cv_importance`, `<name>_cv_load`, `<name>_max_over_mean_load`,
    `<name>_dropped_fraction`, `<name>_unrouted_fraction` (tokens that got
    no expert at all) and `<name>_aux_loss`.

    Args:
        num_experts: int, number of experts n.
        k: int, experts per token, 1 <= k <= num_experts.
        hidden_units: int, hidden width of each expert.
        output_units: int or None, output width (None: the input width).
        activation: activation of the experts' hidden layer.
        noisy_gating: bool, add the gate's tunable noise while training.
        noise_epsilon: float >= 0 added to the noise scale.
        importance_weight: float >= 0, w_importance.
        load_weight: float >= 0, w_load.
        capacity_factor: None for exact, dropless dispatch (each expert's
            buffer grows to its token count: a dynamic shape). A float > 0
            gives every expert a static capacity of
            `ceil(capacity_factor * k * tokens / num_experts)` tokens, the
            path that compiles with XLA and runs on TPUs; assignments over
            capacity contribute zero and are counted as dropped.
        use_bias: whether the experts' layers have biases.
        kernel_initializer, bias_initializer, kernel_regularizer,
            bias_regularizer: for the experts' weights.
        seed: optional int seed of the gating noise.
        gate: `"noisy_top_k"` (section 1), `"softmax"` (the dense baseline
            `Softmax(x W_g)`: every expert on every token, `k` unused and
            static capacity `ceil(capacity_factor * tokens)`) or
            `"batchwise"` (strictly balanced gating, appendix F: see
            `BatchwiseGate`; each expert takes `k * tokens // num_experts`
            tokens of the batch while training, `noisy_gating` unused).
        **kwargs: base layer arguments (`name`, `dtype`, ...).

    Call arguments:
        inputs: [..., d] tensor of rank >= 2.
        training: bool, enables noise, the smooth load and the losses.
        mask: optional bool tensor of shape `inputs.shape[:-1]` (Keras masks
            are used automatically): masked tokens are not routed, their
            output is zero and they count in neither importance nor load.

    Returns:
        [..., output_units or d].

    Example:

    >>> inputs = keras.Input((None, 64))
    >>> outputs = MoE(num_experts=8, k=2, hidden_units=128)(inputs)
    >>> model = keras.Model(inputs, outputs)
    >>> model(np.zeros((2, 5, 64), "float32")).shape
    TensorShape([2, 5, 64])
    """

    # Layer class of the expert bank; the expert-parallel subclass shards it.
    experts_class = FeedForwardExperts
    # Prefix of unnamed layers' names (Keras would derive "mo_e" from the class).
    default_name = "moe"

    def __init__(
        self,
        num_experts,
        k,
        hidden_units,
        output_units=None,
        activation="relu",
        noisy_gating=True,
        noise_epsilon=1e-2,
        importance_weight=0.1,
        load_weight=0.1,
        capacity_factor=None,
        use_bias=True,
        kernel_initializer=None,
        bias_initializer="zeros",
        kernel_regularizer=None,
        bias_regularizer=None,
        seed=None,
        gate="noisy_top_k",
        **kwargs,
    ):
        if "name" not in kwargs:
            uid = keras.backend.get_uid(self.default_name)
            kwargs["name"] = self.default_name if uid == 1 else f"{self.default_name}_{uid - 1}"
        super().__init__(**kwargs)
        check_positive_int("num_experts", num_experts)
        check_positive_int("k", k)
        check_positive_int("hidden_units", hidden_units)
        if output_units is not None:
            check_positive_int("output_units", output_units)
        check_not_above("k", k, "num_experts", num_experts)
        check_non_negative("importance_weight", importance_weight)
        check_non_negative("load_weight", load_weight)
        check_capacity_factor(capacity_factor)
        self.num_experts = num_experts
        self.k = k
        self.hidden_units = hidden_units
        self.output_units = output_units
        self.activation = keras.activations.get(activation)
        self.noisy_gating = bool(noisy_gating)
        self.noise_epsilon = float(noise_epsilon)
        self.importance_weight = float(importance_weight)
        self.load_weight = float(load_weight)
        self.capacity_factor = None if capacity_factor is None else float(capacity_factor)
        self.use_bias = use_bias
        self.kernel_initializer = kernel_initializer
        self.bias_initializer = bias_initializer
        self.kernel_regularizer = kernel_regularizer
        self.bias_regularizer = bias_regularizer
        self.seed = seed
        if gate not in _GATES:
            raise ValueError(f"`gate` must be one of {_GATES}, got {gate!r}.")
        self.gate_type = gate
        self.supports_masking = True
        use_thread_local_losses(self)
        self.gate = self._make_gate()
        self.balance = LoadBalanceMetrics(name=self.name)

    def _make_gate(self):
        """Creates the gating sublayer (subclasses with another gate override it)."""
        if self.gate_type == "softmax":
            return SoftmaxGate(self.num_experts, name="gate")
        if self.gate_type == "batchwise":
            return BatchwiseGate(self.num_experts, self.k, name="gate")
        return NoisyTopKGate(
            self.num_experts,
            self.k,
            noisy=self.noisy_gating,
            noise_epsilon=self.noise_epsilon,
            seed=self.seed,
            name="gate",
        )

    def build(self, input_shape):
        if len(input_shape) < 2:
            raise ValueError(
                f"`inputs` of MoE must have rank >= 2 ([..., d]), got shape {input_shape}."
            )
        input_units = input_shape[-1]
        if input_units is None:
            raise ValueError(f"The last axis of `inputs` must be known, got shape {input_shape}.")
        self.input_spec = keras.layers.InputSpec(min_ndim=2, axes={-1: input_units})
        self.gate.build((None, input_units))
        self.experts = self._build_experts(self.num_experts, input_units)

    def _build_experts(self, num_experts, input_units):
        """Creates and builds the expert bank (subclasses may shard it)."""
        experts = self.experts_class(
            num_experts,
            self.hidden_units,
            self.output_units or input_units,
            activation=self.activation,
            use_bias=self.use_bias,
            kernel_initializer=self.kernel_initializer,
            bias_initializer=self.bias_initializer,
            kernel_regularizer=self.kernel_regularizer,
            bias_regularizer=self.bias_regularizer,
            dtype=self.dtype_policy,
            name="experts",
        )
        experts.build((num_experts, None, input_units))
        return experts

    def call(self, inputs, training=None, mask=None):
        tokens, valid, num_tokens = flatten_tokens(inputs, mask)
        routing = self.gate(tokens, training=training, mask=valid)
        if "assignments" in routing:
            token_id, expert_id, weight = routing["assignments"]
        else:
            token_id, expert_id, weight = dispatch_ops.token_choice_assignments(
                routing["expert_index"], routing["expert_weight"], valid, self.num_experts
            )
        capacity = None
        if self.capacity_factor is not None:
            capacity = dispatch_ops.static_capacity(
                self.capacity_factor, self.gate.k * num_tokens, self.num_experts
            )
        buffer, slot, kept, _ = dispatch_ops.dispatch(
            tokens, token_id, expert_id, self.num_experts, capacity
        )
        outputs = dispatch_ops.combine(
            self.experts(buffer), slot, kept, token_id, weight, num_tokens
        )
        self._track_balance(routing, token_id, expert_id, kept, valid, num_tokens, training)
        return tf.reshape(outputs, tf.concat([tf.shape(inputs)[:-1], [outputs.shape[-1]]], 0))

    def _track_balance(self, routing, token_id, expert_id, kept, valid, num_tokens, training):
        importance, load = cross_replica_sum([routing["importance"], routing["load"]])
        aux_loss = self.importance_weight * cv_squared(importance) + self.load_weight * cv_squared(load)
        if training:
            self.add_loss(aux_loss)
        # A gate may drop assignments before dispatch (hierarchical group capacity).
        gate_dropped = routing.get("dropped", 0.0)
        routed = tf.reduce_sum(tf.cast(expert_id < self.num_experts, tf.float32)) + gate_dropped
        dropped = routed - tf.reduce_sum(tf.cast(kept, tf.float32))
        reached = tf.math.unsorted_segment_sum(tf.cast(kept, tf.float32), token_id, num_tokens)
        if valid is None:
            tokens = tf.cast(num_tokens, tf.float32)
        else:
            tokens = tf.reduce_sum(tf.cast(valid, tf.float32))
        unrouted = tokens - tf.reduce_sum(tf.cast(reached > 0, tf.float32))
        self.balance.update_state(importance, load, dropped, routed, aux_loss, unrouted, tokens)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.output_units or input_shape[-1],)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_experts": self.num_experts,
                "k": self.k,
                "hidden_units": self.hidden_units,
                "output_units": self.output_units,
                "activation": keras.activations.serialize(self.activation),
                "noisy_gating": self.noisy_gating,
                "noise_epsilon": self.noise_epsilon,
                "importance_weight": self.importance_weight,
                "load_weight": self.load_weight,
                "capacity_factor": self.capacity_factor,
                "use_bias": self.use_bias,
                "kernel_initializer": _serialize(keras.initializers, self.kernel_initializer),
                "bias_initializer": _serialize(keras.initializers, self.bias_initializer),
                "kernel_regularizer": _serialize(keras.regularizers, self.kernel_regularizer),
                "bias_regularizer": _serialize(keras.regularizers, self.bias_regularizer),
                "seed": self.seed,
                "gate": self.gate_type,
            }
        )
        return config


def _serialize(module, value):
    return None if value is None else module.serialize(module.get(value))
