"""Dense softmax gating, the paper's non-sparse baseline (Shazeer et al. 2017, section 2.1)."""

import keras
import tensorflow as tf

from tf_moe.layers.router import Router, Routing
from tf_moe.layers.router_registry import K_ALL, register_router
from tf_moe.ops import gating
from tf_moe.ops.dispatch import token_choice_assignments


@register_router("softmax", k=K_ALL)
@keras.saving.register_keras_serializable(package="tf_moe")
class SoftmaxRouter(Router):
    """Plain softmax gating `G(x) = Softmax(x W_g)` over all experts.

    The dense baseline the paper compares noisy top-k gating against
    (section 2.1): every token goes to every expert, weighted by its softmax
    gate, so an MoE with this router computes all n experts on every token
    (`k = num_experts`, and a static capacity of
    `ceil(capacity_factor * tokens)`). Importance is the sum of the gates,
    load the number of unmasked tokens for every expert. `W_g` starts at
    zero (uniform gates). The router computes in float32.

    Args:
        num_experts: int, number of experts n.
        **kwargs: `z_loss_weight` (float >= 0, default 0: the router z-loss
            of `Router` on `x W_g`) and base layer arguments (`name`, ...). `dtype` defaults to
            float32.

    Call arguments:
        inputs: [tokens, d] float tensor.
        training: unused (the router has no noise).
        mask: optional [tokens] bool; masked tokens are not routed.

    Returns:
        A `Routing` of `num_experts * tokens` assignments.

    Example:

    >>> router = SoftmaxRouter(num_experts=4)
    >>> router(keras.random.normal((16, 32))).weight.shape
    TensorShape([64])
    """

    def __init__(self, num_experts, **kwargs):
        super().__init__(num_experts, num_experts, **kwargs)

    def build(self, input_shape):
        self.check_input_shape(input_shape)
        self.w_gate = self.add_weight(
            name="w_gate", shape=(input_shape[-1], self.num_experts), initializer="zeros"
        )

    def call(self, inputs, training=None, mask=None):
        x, valid = self.masked_tokens(inputs, mask)
        logits = tf.matmul(x, tf.cast(self.w_gate, tf.float32))
        gates = tf.nn.softmax(logits, axis=-1)
        expert_index = tf.broadcast_to(tf.range(self.num_experts), tf.shape(gates))
        if valid is None:
            tokens = tf.cast(tf.shape(gates)[0], tf.float32)
        else:
            expert_index = tf.where(valid[:, None], expert_index, self.num_experts)
            gates = tf.where(valid[:, None], gates, 0.0)
            tokens = tf.reduce_sum(tf.cast(valid, tf.float32))
        token_id, expert_id, weight = token_choice_assignments(expert_index, gates)
        return Routing(
            token_id=token_id,
            expert_id=expert_id,
            weight=weight,
            importance=gating.importance(expert_index, gates, self.num_experts),
            load=tf.fill([self.num_experts], tokens),
            dropped=tf.zeros(()),
            losses=self.z_losses(logits, valid),
            metrics={},
        )
