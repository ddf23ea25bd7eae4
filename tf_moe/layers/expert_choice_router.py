"""Expert-choice routing: each expert picks its tokens (Zhou et al. 2022, section 3)."""

import math

import keras
import tensorflow as tf

from tf_moe.layers.checks import check_positive
from tf_moe.layers.router import Router, Routing
from tf_moe.layers.router_registry import K_OPTIONAL, register_router
from tf_moe.layers.top_k_router import router_kernel_initializer
from tf_moe.ops.dispatch import static_capacity


def expert_capacity(capacity_factor, num_tokens, num_experts):
    """`C = min(ceil(T * capacity_factor / E), T)`: the tokens each expert takes.

    Exact (the factor as the fraction of its decimal, see
    `tf_moe.ops.dispatch.static_capacity`); a Python int when `num_tokens`
    is, else an int32 tensor that XLA evaluates from the input shapes.
    """
    capacity = static_capacity(capacity_factor, num_tokens, num_experts)
    if isinstance(num_tokens, int):
        return min(capacity, num_tokens)
    return tf.minimum(capacity, tf.cast(num_tokens, tf.int32))


@register_router("expert_choice", k=K_OPTIONAL)
@keras.saving.register_keras_serializable(package="tf_moe")
class ExpertChoiceRouter(Router):
    """Expert-choice routing: each expert takes its top C tokens of the batch (Zhou et al. 2022).

    `S = Softmax(X W_r)` over the experts, for the batch X of T tokens
    (section 3). Each expert i takes the `C = ceil(T * capacity_factor / E)`
    tokens with the largest scores `S[:, i]` (top-C over the token axis),
    with gate value `S[t, i]`. A token may be taken by several experts or by
    none (`MoELayer` gives it a zero output and reports it in
    `<layer>_unrouted_fraction`). Every expert receives exactly C tokens, so
    the load is balanced by construction and there is no balancing loss
    (`uses_balancing_loss` is False); importance and load are reported for
    the metrics. A token visits `capacity_factor` experts on average; the
    router's `k` is `ceil(capacity_factor)` (at most E), so that
    `MoELayer(capacity_factor >= 1)` never drops an expert's choice and
    `MoELayer.ops_per_token` counts `ceil(capacity_factor)` experts.

    **Not causal.** Whether expert i takes token t depends on every other
    token of the batch, later positions of the same sequence included. In
    an autoregressive model (a language model, a decoder) the output at a
    position therefore depends a little on the future of the batch, both
    while training and when evaluating, so its perplexity is not that of a
    causal model; `tf_moe.models.lstm_lm` warns when given this router and
    `tf_moe.models.Seq2SeqDecoder` refuses it. At inference the router does
    the same on whatever batch it is given: its routing depends on the
    batch composition, and a batch of one token (step-by-step decoding) has
    `C = 1`: every expert takes that token. It suits encoders and
    classifiers that see whole batches.

    Masked tokens are never taken (they rank below every score) and count
    in neither importance nor load; nor is a token holding NaN or inf, so
    that it cannot change which tokens the experts take (`MoELayer` gives
    it a NaN output); C is computed from the T rows of the
    batch, padding included, so that it is static. Under data parallelism
    each replica's experts choose among that replica's tokens. `W_r` starts
    from a truncated normal of standard deviation `sqrt(0.1 / d)`. The
    router computes in float32.

    Args:
        num_experts: int, number of experts E.
        capacity_factor: finite float > 0, c: experts take `T * c / E`
            tokens each (2 in the paper's main runs).
        seed: optional int seed of the initial weights.
        **kwargs: `z_loss_weight` (float >= 0, default 0: the router z-loss
            of `Router` on `X W_r`) and base layer arguments (`name`, ...).
            `dtype` defaults to float32.

    Call arguments:
        inputs: [tokens, d] float tensor: the batch the experts choose from.
        training: unused (the router behaves the same at inference).
        mask: optional [tokens] bool; masked tokens are never taken.

    Returns:
        A `Routing` of `E * C` assignments, expert by expert, best first.

    Example:

    >>> router = ExpertChoiceRouter(num_experts=4, capacity_factor=2.0)
    >>> routing = router(keras.random.normal((16, 32)))
    >>> routing.load.numpy()  # every expert takes 16 * 2 / 4 tokens
    array([8., 8., 8., 8.], dtype=float32)
    """

    uses_balancing_loss = False
    causal = False

    def __init__(self, num_experts, capacity_factor=2.0, seed=None, **kwargs):
        check_positive("capacity_factor", capacity_factor)
        super().__init__(num_experts, min(math.ceil(capacity_factor), num_experts), **kwargs)
        self.capacity_factor = float(capacity_factor)
        self.seed = seed

    def build(self, input_shape):
        self.check_input_shape(input_shape)
        self.w_gate = self.add_weight(
            name="w_gate", shape=(input_shape[-1], self.num_experts),
            initializer=router_kernel_initializer(self.seed),
        )

    def call(self, inputs, training=None, mask=None):
        x, valid = self.masked_tokens(inputs, mask)
        logits = tf.matmul(x, tf.cast(self.w_gate, tf.float32))
        scores = tf.nn.softmax(logits, axis=-1)
        num_tokens = x.shape[0] if x.shape[0] is not None else tf.shape(x)[0]
        capacity = expert_capacity(self.capacity_factor, num_tokens, self.num_experts)
        # Masked and non-finite tokens rank below every score (scores are >= 0).
        rankable = self.rankable_tokens(x, valid)
        ranked = tf.where(rankable[:, None], scores, -1.0)
        _, token_id = tf.math.top_k(tf.transpose(ranked), k=capacity)  # [E, C]
        # Gathered rather than top_k's values: top_k's gradient fails on an
        # empty batch (C = 0).
        top_scores = tf.gather(tf.transpose(scores), token_id, batch_dims=1)
        experts = tf.broadcast_to(tf.range(self.num_experts)[:, None], tf.shape(token_id))
        picked = tf.gather(rankable, token_id)
        expert_id = tf.where(picked, experts, self.num_experts)
        weight = tf.where(picked, top_scores, 0.0)
        return Routing(
            token_id=tf.reshape(token_id, [-1]),
            expert_id=tf.reshape(expert_id, [-1]),
            weight=tf.reshape(weight, [-1]),
            importance=tf.reduce_sum(weight, axis=1),
            load=tf.reduce_sum(tf.cast(picked, tf.float32), axis=1),
            dropped=tf.zeros(()),
            losses=self.z_losses(logits, valid),
            metrics={},
        )


    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "capacity_factor": self.capacity_factor,
                "seed": self.seed,
            }
        )
        return config
