"""Auxiliary-loss-free load balancing with per-expert biases (Wang et al. 2024; DeepSeek-V3)."""

import keras
import tensorflow as tf

from tf_moe.layers.checks import check_non_negative
from tf_moe.layers.router import Router, Routing
from tf_moe.layers.router_registry import register_router
from tf_moe.layers.top_k_router import balance_statistics, router_kernel_initializer
from tf_moe.ops import gating
from tf_moe.ops.dispatch import token_choice_assignments
from tf_moe.ops.replicas import cross_replica_sum

AFFINITIES = ("sigmoid", "softmax")


def bias_update(counts, rate):
    """`gamma * sign(mean_j c_j - c_i)`: the step of every expert bias (Wang et al. 2024, Algorithm 1).

    Experts that got fewer tokens than the mean move up by `rate`, those
    that got more move down, the rest stay.

    Args:
        counts: [E] tokens per expert in the step (of the global batch).
        rate: gamma, the bias update rate.

    Returns:
        [E] float32.
    """
    counts = tf.cast(counts, tf.float32)
    return rate * tf.sign(tf.reduce_mean(counts) - counts)


def sequence_balance_loss(expert_index, probabilities, valid, sequence_ids, k):
    """DeepSeek-V3's sequence-wise balance loss `mean_s E * sum_i f_i P_i` (section 2.1.2, eq. 17-20).

    `f` and `P` (`gating.load_balancing_loss`) of each sequence on its own,
    averaged over the sequences of the global batch.

    Args:
        expert_index: [T, k] int32 choices (`E` for masked tokens).
        probabilities: [T, E] normalised affinities `s'`, 0 on masked rows.
        valid: [T] bool.
        sequence_ids: [T] int, the sequence of each token, in [0, T).
        k: choices per token.

    Returns:
        A float32 scalar.
    """
    num_tokens, num_experts = tf.shape(probabilities)[0], probabilities.shape[-1]
    # Masked tokens go to an extra sequence that is cut off.
    sequence = tf.where(valid, tf.cast(sequence_ids, tf.int32), num_tokens)
    segments = num_tokens + 1
    pair = sequence[:, None] * (num_experts + 1) + expert_index
    counts = tf.math.unsorted_segment_sum(
        tf.ones_like(pair, tf.float32), pair, segments * (num_experts + 1)
    )
    counts = tf.reshape(counts, [segments, num_experts + 1])[:-1, :num_experts]
    probability_sums = tf.math.unsorted_segment_sum(probabilities, sequence, segments)[:-1]
    tokens = tf.math.unsorted_segment_sum(tf.cast(valid, tf.float32), sequence, segments)[:-1]
    losses = gating.load_balancing_loss(counts, probability_sums, tokens, k)
    present = tf.cast(tokens > 0, tf.float32)
    total, sequences = cross_replica_sum([tf.reduce_sum(losses * present), tf.reduce_sum(present)])
    return total / tf.maximum(sequences, 1.0)


@register_router("loss_free")
@keras.saving.register_keras_serializable(package="tf_moe")
class LossFreeRouter(Router):
    """Top-k routing balanced by per-expert biases instead of a loss (Wang et al. 2024; DeepSeek-V3).

    Affinities `s = Sigmoid(x W_r)` (DeepSeek-V3, section 2.1.2) or
    `Softmax(x W_r)` (`affinity="softmax"`). Each token
    goes to the k experts of highest `s_i + b_i`, with gate values from `s`
    alone, normalised over the k chosen: `g_i = s_i / sum_{j chosen} s_j`.
    The bias b only selects; it never enters an output or a gradient.

    After every training step, `b_i += bias_update_rate * sign(mean_j c_j -
    c_i)`, with `c_i` the tokens the step sent to expert i (Wang et al.
    2024, Algorithm 1; gamma = 1e-3 as theirs): overloaded experts become
    less attractive, underloaded ones more. The update happens in `call`
    while training (never at inference or in `evaluate`), with
    `assign_add` after the step's selection: once per training call of the
    layer, i.e. once per `fit` step. Under data parallelism the counts are
    of the global batch (summed over replicas) and the bias variable is
    created with `aggregation="only_first_replica"`, so every replica
    computes the same update and it is applied once per step, not once per
    replica. The bias is a non-trainable weight (`expert_bias`): saved and
    restored with the model (`.keras`, `.weights.h5`, checkpoints), and
    untouched by optimizers and gradients.

    Optionally (`balance_weight` > 0) the router adds DeepSeek-V3's
    complementary sequence-wise balance loss `alpha * E * sum_i f_i P_i`
    (their eq. 17-20; they use alpha = 1e-4) with `P` the mean of the
    normalised affinities `s_i / sum_j s_j`, per sequence, averaged over
    sequences: pass per-token `sequence_ids` (e.g. `MoELayer(...)(x,
    sequence_ids=ids)` with ids the [batch, time] row index) to mark the
    sequences; without them the whole (global) batch is one sequence. `f`
    counts the experts chosen with the bias (what was dispatched; the
    paper's indicator is written with the top-k of `s`, the same while b
    is 0). The CV^2 losses of Shazeer et al. are off (`uses_balancing_loss`
    is False); importance and load are reported for the metrics. `W_r`
    starts from a truncated normal of standard deviation `sqrt(0.1 / d)`.
    The router computes in float32.

    Args:
        num_experts: int, number of experts E.
        k: int, experts per token, 1 <= k <= num_experts.
        affinity: "sigmoid" (DeepSeek-V3) or "softmax".
        bias_update_rate: finite float >= 0, gamma (0 freezes the biases).
        balance_weight: finite float >= 0, alpha of the sequence-wise loss
            (default 0: no loss).
        seed: optional int seed of the initial weights.
        **kwargs: `z_loss_weight` (float >= 0, default 0: the router z-loss
            of `Router` on `x W_r`) and base layer arguments (`name`, ...).
            `dtype` defaults to float32.

    Call arguments:
        inputs: [tokens, d] float tensor.
        training: bool; True updates the biases from this batch's load.
        mask: optional [tokens] bool; masked tokens are not routed and not
            counted in the bias update.
        sequence_ids: optional [tokens] int in [0, tokens), the sequence of
            each token, for the sequence-wise loss.

    Returns:
        A `Routing` of `k * tokens` assignments, all first choices first.

    Example:

    >>> router = LossFreeRouter(num_experts=8, k=2)
    >>> routing = router(keras.random.normal((16, 32)), training=True)
    >>> router.expert_bias.shape  # moved by +-1e-3 from this batch's load
    (8,)
    """

    loss_names = ("sequence_balance", "z_loss")
    uses_balancing_loss = False

    def __init__(
        self, num_experts, k, affinity="sigmoid", bias_update_rate=1e-3, balance_weight=0.0,
        seed=None, **kwargs,
    ):
        super().__init__(num_experts, k, **kwargs)
        if affinity not in AFFINITIES:
            raise ValueError(f"`affinity` must be one of {AFFINITIES}, got {affinity!r}.")
        check_non_negative("bias_update_rate", bias_update_rate)
        check_non_negative("balance_weight", balance_weight)
        self.affinity = affinity
        self.bias_update_rate = float(bias_update_rate)
        self.balance_weight = float(balance_weight)
        self.seed = seed

    def build(self, input_shape):
        self.check_input_shape(input_shape)
        self.w_gate = self.add_weight(
            name="w_gate", shape=(input_shape[-1], self.num_experts),
            initializer=router_kernel_initializer(self.seed),
        )
        # Replicas all compute the same update from global counts; it is
        # applied once, from the first.
        self.expert_bias = self.add_weight(
            name="expert_bias", shape=(self.num_experts,), initializer="zeros", trainable=False,
            aggregation="only_first_replica",
        )

    def call(self, inputs, training=None, mask=None, sequence_ids=None):
        x, valid = self.masked_tokens(inputs, mask)
        logits = tf.matmul(x, tf.cast(self.w_gate, tf.float32))
        if self.affinity == "sigmoid":
            affinity = tf.nn.sigmoid(logits)
        else:
            affinity = tf.nn.softmax(logits, axis=-1)
        bias = tf.cast(self.expert_bias, tf.float32)
        _, expert_index = tf.math.top_k(affinity + bias, k=self.k)
        chosen = tf.gather(affinity, expert_index, batch_dims=1)
        expert_weight = chosen / tf.reduce_sum(chosen, axis=-1, keepdims=True)
        if valid is not None:
            expert_index = tf.where(valid[:, None], expert_index, self.num_experts)
            expert_weight = tf.where(valid[:, None], expert_weight, 0.0)
        load = gating.hard_load(expert_index, self.num_experts)
        if training and self.bias_update_rate:
            (counts,) = cross_replica_sum([load])
            self.expert_bias.assign_add(bias_update(counts, self.bias_update_rate))
        losses = self.z_losses(logits, valid)
        if self.balance_weight:
            losses["sequence_balance"] = self.balance_weight * self._balance_loss(
                expert_index, affinity, valid, sequence_ids
            )
        token_id, expert_id, weight = token_choice_assignments(expert_index, expert_weight)
        return Routing(
            token_id=token_id,
            expert_id=expert_id,
            weight=weight,
            importance=gating.importance(expert_index, expert_weight, self.num_experts),
            load=load,
            dropped=tf.zeros(()),
            losses=losses,
            metrics={},
        )

    def _balance_loss(self, expert_index, affinity, valid, sequence_ids):
        normalised = affinity / tf.reduce_sum(affinity, axis=-1, keepdims=True)
        if valid is not None:
            normalised = tf.where(valid[:, None], normalised, 0.0)
        if sequence_ids is None:
            counts, probability_sums, tokens = balance_statistics(expert_index, normalised, valid)
            return gating.load_balancing_loss(counts, probability_sums, tokens, self.k)
        if valid is None:
            valid = tf.ones_like(normalised[:, 0], tf.bool)
        sequence_ids = tf.cast(sequence_ids, tf.int32)
        num_tokens = tf.shape(sequence_ids)[0]
        in_range = tf.logical_and(sequence_ids >= 0, sequence_ids < num_tokens)
        check = tf.debugging.assert_equal(
            tf.reduce_all(tf.logical_or(in_range, tf.logical_not(valid))), True,
            message="`sequence_ids` must be in [0, tokens) at unmasked tokens",
        )
        with tf.control_dependencies([check]):
            sequence_ids = tf.identity(sequence_ids)
        return sequence_balance_loss(expert_index, normalised, valid, sequence_ids, self.k)


    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "affinity": self.affinity,
                "bias_update_rate": self.bias_update_rate,
                "balance_weight": self.balance_weight,
                "seed": self.seed,
            }
        )
        return config
