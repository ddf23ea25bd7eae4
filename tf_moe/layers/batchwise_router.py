"""Strictly balanced gating (Shazeer et al. 2017, appendix F)."""

import keras
import tensorflow as tf

from tf_moe.layers.checks import check_not_above, check_positive_int
from tf_moe.layers.router import Router, Routing
from tf_moe.layers.router_registry import register_router
from tf_moe.ops import gating
from tf_moe.ops.dispatch import token_choice_assignments

# Keeps the renormalisation finite for a token that no expert kept.
_EPSILON = 1e-9


def tokens_per_expert(k, num_tokens, num_experts):
    """`m = k * T // n`, the batch each expert takes under batchwise gating.

    A Python int when `num_tokens` is; raises a ValueError naming the
    arguments when that int is below 1 (and asserts it when `num_tokens` is
    a tensor).
    """
    if isinstance(num_tokens, int):
        m = k * num_tokens // num_experts
        if m < 1:
            raise ValueError(
                "Batchwise gating needs m = k * tokens // num_experts >= 1 tokens per "
                f"expert; got k={k}, tokens={num_tokens}, num_experts={num_experts}. "
                "Use more tokens per batch, a larger `k` or fewer `num_experts`."
            )
        return m
    m = k * num_tokens // num_experts
    tf.debugging.assert_positive(
        m, message="Batchwise gating needs m = k * tokens // num_experts >= 1."
    )
    return m


def batchwise_threshold_loss(gates, thresholds, threshold_mask, batch_mask, valid):
    """`L_batchwise(X, T, m)` of appendix F, averaged over the tokens.

    `sum_j sum_i (M_threshold(x_j, T)_i - M_batchwise(X, m)_{j,i}) * (X_{j,i} - T_i)`
    with X the softmax gates. The masks are constants of the formula and the
    loss is there to learn T, so gradients reach only `thresholds`: each T_i
    moves up when its threshold lets through more tokens than the batchwise
    mask keeps, down when fewer. Dividing by the token count makes the step
    size independent of the batch size; the minimiser is unchanged.

    Args:
        gates: [tokens, n] softmax gates `G_sigma(x)`.
        thresholds: [n] per-expert thresholds T.
        threshold_mask, batch_mask: [tokens, n] 0/1 masks.
        valid: [tokens] bool; tokens that are False count zero.

    Returns:
        A float32 scalar.
    """
    disagreement = tf.stop_gradient(threshold_mask - batch_mask)
    terms = tf.where(valid[:, None], disagreement * (tf.stop_gradient(gates) - thresholds), 0.0)
    tokens = tf.reduce_sum(tf.cast(valid, tf.float32))
    return tf.reduce_sum(terms) / tf.maximum(tokens, 1.0)


@register_router("batchwise")
@keras.saving.register_keras_serializable(package="tf_moe")
class BatchwiseRouter(Router):
    """Strictly balanced gating: every expert takes the same batch size (appendix F).

    `G(x)_i = G_sigma(x)_i M_i / sum_j G_sigma(x)_j M_j` with
    `G_sigma(x) = Softmax(x W_g)`. While training, M is the batchwise mask:
    each expert keeps its top `m = k * T // n` tokens of the batch of T
    tokens (expert-choice routing), so every expert receives exactly m
    tokens and nothing is ever dropped for capacity. A token that no expert
    picked gets no assignment (the MoE gives it a zero output and counts it
    as unrouted). A token holding NaN or inf is not ranked, so that it
    cannot change which tokens the experts keep; neither mask keeps it, and
    `MoELayer` gives it a NaN output. While training the router also returns the loss
    `L_batchwise` (`Routing.losses["batchwise_threshold"]`, 0 at
    inference), which learns a per-expert threshold vector T.

    At inference the batch cannot be relied on, so M is the threshold mask
    `G_sigma(x)_i > T_i`, decided per token. The number of experts a token
    passes varies; to keep static shapes each token considers only its
    `max_experts_per_token` highest gates (a bounded candidate set), keeps
    those above their threshold and renormalises over them. Candidates
    beyond that bound are not used even if above threshold.

    `W_g` and T start at zero. With all gates tied at the start, every
    expert picks the same first m tokens of the first batch; the first
    gradient step on `W_g` breaks the tie. The router computes in float32.

    Args:
        num_experts: int, number of experts n.
        k: int, average experts per token, 1 <= k <= num_experts; sets m.
        max_experts_per_token: int or None, size of the inference candidate
            set (None: `min(2 * k, num_experts)`).
        **kwargs: `z_loss_weight` (float >= 0, default 0: the router z-loss
            of `Router` on `x W_g`) and base layer arguments (`name`, ...). `dtype` defaults to
            float32.

    Call arguments:
        inputs: [tokens, d] float tensor. While training it is the batch X
            that the batchwise mask ranks, so it needs
            `k * tokens // num_experts >= 1`.
        training: bool, batchwise mask (and threshold loss) if true,
            threshold mask otherwise.
        mask: optional [tokens] bool; masked tokens are never picked and
            do not count in importance, load or the threshold loss.

    Returns:
        A `Routing` of `n * m` assignments, expert-major, while training and
        `tokens * max_experts_per_token` at inference.

    Example:

    >>> router = BatchwiseRouter(num_experts=4, k=2)
    >>> routing = router(keras.random.normal((16, 32)), training=True)
    >>> routing.load.numpy()  # every expert gets m = 2 * 16 // 4 tokens
    array([8., 8., 8., 8.], dtype=float32)
    """

    loss_names = ("batchwise_threshold", "z_loss")

    def __init__(self, num_experts, k, max_experts_per_token=None, **kwargs):
        super().__init__(num_experts, k, **kwargs)
        if max_experts_per_token is not None:
            max_experts_per_token = check_positive_int("max_experts_per_token", max_experts_per_token)
            check_not_above("max_experts_per_token", max_experts_per_token, "num_experts", self.num_experts)
        self.max_experts_per_token = max_experts_per_token
        self.candidates = max_experts_per_token or min(2 * self.k, self.num_experts)

    def build(self, input_shape):
        self.check_input_shape(input_shape)
        if input_shape[0] is not None:
            tokens_per_expert(self.k, input_shape[0], self.num_experts)
        self.w_gate = self.add_weight(
            name="w_gate", shape=(input_shape[-1], self.num_experts), initializer="zeros"
        )
        self.thresholds = self.add_weight(
            name="thresholds", shape=(self.num_experts,), initializer="zeros"
        )

    def call(self, inputs, training=None, mask=None):
        x, valid = self.masked_tokens(inputs, mask)
        logits = tf.matmul(x, tf.cast(self.w_gate, tf.float32))
        gates = tf.nn.softmax(logits, axis=-1)
        thresholds = tf.cast(self.thresholds, tf.float32)
        if valid is None:
            valid = tf.ones_like(gates[:, 0], tf.bool)
        if training:
            rankable = self.rankable_tokens(x, valid)
            (token_id, expert_id, weight), importance, batch_mask = self._batchwise_routing(gates, rankable)
            threshold_mask = tf.cast(gates > thresholds, tf.float32)
            loss = batchwise_threshold_loss(gates, thresholds, threshold_mask, batch_mask, valid)
        else:
            (token_id, expert_id, weight), importance = self._threshold_routing(gates, thresholds, valid)
            loss = tf.zeros(())
        return Routing(
            token_id=token_id,
            expert_id=expert_id,
            weight=weight,
            importance=importance,
            load=gating.hard_load(expert_id, self.num_experts),
            dropped=tf.zeros(()),
            losses={"batchwise_threshold": loss, **self.z_losses(logits, valid)},
            metrics={},
        )

    def _batchwise_routing(self, gates, rankable):
        num_tokens = gates.shape[0]
        if num_tokens is None:
            num_tokens = tf.shape(gates)[0]
        m = tokens_per_expert(self.k, num_tokens, self.num_experts)
        # Masked and non-finite tokens rank below every gate value (gates are >= 0).
        scores = tf.where(rankable[:, None], gates, -1.0)
        _, token_id = tf.math.top_k(tf.transpose(scores), k=m)  # [n, m]
        picked = tf.gather(rankable, token_id)
        expert_id = tf.broadcast_to(tf.range(self.num_experts)[:, None], tf.shape(token_id))
        pairs = tf.stack([token_id, expert_id], axis=-1)
        batch_mask = tf.scatter_nd(pairs, tf.cast(picked, tf.float32), tf.shape(gates))
        kept = tf.where(batch_mask > 0, gates, 0.0)
        kept = kept / tf.maximum(tf.reduce_sum(kept, axis=-1, keepdims=True), _EPSILON)
        expert_id = tf.where(picked, expert_id, self.num_experts)
        assignments = (
            tf.reshape(token_id, [-1]),
            tf.reshape(expert_id, [-1]),
            tf.reshape(tf.gather_nd(kept, pairs), [-1]),
        )
        return assignments, tf.reduce_sum(kept, axis=0), batch_mask

    def _threshold_routing(self, gates, thresholds, valid):
        top_gates, expert_index = tf.math.top_k(gates, k=self.candidates)
        keep = tf.logical_and(top_gates > tf.gather(thresholds, expert_index), valid[:, None])
        kept = tf.where(keep, top_gates, 0.0)
        weight = kept / tf.maximum(tf.reduce_sum(kept, axis=-1, keepdims=True), _EPSILON)
        expert_index = tf.where(keep, expert_index, self.num_experts)
        return (
            token_choice_assignments(expert_index, weight),
            gating.importance(expert_index, weight, self.num_experts),
        )


    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "max_experts_per_token": self.max_experts_per_token,
            }
        )
        return config
