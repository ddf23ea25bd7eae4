"""Softmax top-k routing with the Switch load-balancing loss (GShard, Switch, Mixtral)."""

import keras
import tensorflow as tf

from tf_moe.layers.checks import check_bool, check_non_negative
from tf_moe.layers.router import Router, Routing
from tf_moe.layers.router_registry import register_router
from tf_moe.ops import gating
from tf_moe.ops.dispatch import token_choice_assignments
from tf_moe.ops.replicas import cross_replica_sum, replica_uniform


def router_kernel_initializer(seed=None):
    """The routers' `W_r` initializer of Fedus et al. 2022 (section 2.4).

    A truncated normal of mean 0 and standard deviation `sqrt(0.1 / d)`: the
    Switch Transformer's smaller-than-usual scale, which its authors found
    to stabilise training.
    """
    return keras.initializers.VarianceScaling(
        scale=0.1, mode="fan_in", distribution="truncated_normal", seed=seed
    )


def balance_statistics(expert_index, probabilities, valid):
    """Per-expert choice counts, probability sums and the token count of the global batch.

    The inputs of `gating.load_balancing_loss`, summed over the replicas of
    a data-parallel strategy so that the loss is that of the global batch.

    Args:
        expert_index: [T, k] int32 choices (`num_experts` for masked tokens).
        probabilities: [T, E] float32 router probabilities, 0 on masked rows.
        valid: [T] bool or None.

    Returns:
        `(counts [E], probability_sums [E], tokens)`.
    """
    num_experts = probabilities.shape[-1]
    if valid is None:
        tokens = tf.cast(tf.shape(probabilities)[0], tf.float32)
    else:
        tokens = tf.reduce_sum(tf.cast(valid, tf.float32))
    counts = gating.hard_load(expert_index, num_experts)
    return cross_replica_sum([counts, tf.reduce_sum(probabilities, axis=0), tokens])


@register_router("top_k")
@keras.saving.register_keras_serializable(package="tf_moe")
class TopKRouter(Router):
    """Softmax top-k routing with the `f · P` load-balancing loss: `MoELayer`'s default.

    `p = Softmax(x W_r)` over all experts; each token goes to the k experts
    of highest probability with gate values `p_i` (or, with
    `normalize=True`, `p_i / sum_{j in top k} p_j`, as Mixtral's softmax
    over the top-k logits; Jiang et al. 2024). The balancing loss is the
    Switch Transformer's (Fedus et al. 2022, section 2.2, eq. 4), which
    GShard (Lepikhin et al. 2020) introduced for top-2 routing:
    `alpha * E * sum_i f_i P_i`, with `f_i` the fraction of the T tokens'
    `k * T` choices that went to expert i (all k choices counted, divided
    by k, so the loss is alpha under perfect balance whatever k) and `P_i`
    the mean probability of expert i. Only `P` carries gradient. It is
    returned in `Routing.losses["load_balancing"]`, so `MoELayer` does not
    add the CV^2 losses of Shazeer et al. (`uses_balancing_loss` is False);
    importance (the sum of the gate values) and load (tokens per expert)
    are still reported for the balance metrics. Under data parallelism `f`
    and `P` are of the global batch.

    While training, the router's input can be multiplied by jitter noise
    `Uniform(1 - jitter_epsilon, 1 + jitter_epsilon)` (the "input jitter"
    of Fedus et al. 2022, appendix C; 0 for none). `W_r` starts from a truncated
    normal of standard deviation `sqrt(0.1 / d)` (their section 2.4). The
    router computes in float32.

    Why it is the default (docs/results.md, "The default router"): in a
    small Transformer language model at equal ops it beat the dense FFN by
    more than either model's spread over seeds on the Penn Treebank and on
    the Bible, where the paper's gate without noise (`TopKGateRouter`, the
    previous default) was ahead by less. Without `normalize` a token's gate
    values sum to the probability its k experts hold, below 1: that is
    what won in the Transformer (`normalize=True` did as well as the
    previous default, no better), and what lost the paper's LSTM model at a
    low learning rate.

    Args:
        num_experts: int, number of experts E.
        k: int, experts per token, 1 <= k <= num_experts.
        normalize: bool, renormalise the k gate values to sum to 1.
        balance_weight: finite float >= 0, alpha (Fedus et al. use 1e-2).
        jitter_epsilon: finite float in [0, 1), the jitter's half width.
        seed: optional int seed of the initial weights and the jitter.
        **kwargs: `z_loss_weight` (float >= 0, default 0: the router z-loss
            of `Router` on `x W_r`, with x jittered while training) and base
            layer arguments (`name`, ...). `dtype` defaults to float32.

    Call arguments:
        inputs: [tokens, d] float tensor.
        training: bool, adds the jitter.
        mask: optional [tokens] bool; masked tokens are not routed and count
            in neither f, P nor T.

    Returns:
        A `Routing` of `k * tokens` assignments, all first choices first.

    Example:

    >>> router = TopKRouter(num_experts=8, k=2, normalize=True)
    >>> routing = router(keras.random.normal((16, 32)), training=True)
    >>> sorted(routing.losses)
    ['load_balancing']
    """

    loss_names = ("load_balancing", "z_loss")
    uses_balancing_loss = False

    def __init__(
        self, num_experts, k, normalize=False, balance_weight=1e-2, jitter_epsilon=0.0, seed=None,
        **kwargs,
    ):
        super().__init__(num_experts, k, **kwargs)
        check_non_negative("balance_weight", balance_weight)
        check_non_negative("jitter_epsilon", jitter_epsilon)
        if jitter_epsilon >= 1:
            raise ValueError(f"`jitter_epsilon` must be below 1, got {jitter_epsilon!r}.")
        self.normalize = check_bool("normalize", normalize)
        self.balance_weight = float(balance_weight)
        self.jitter_epsilon = float(jitter_epsilon)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def build(self, input_shape):
        self.check_input_shape(input_shape)
        self.w_gate = self.add_weight(
            name="w_gate", shape=(input_shape[-1], self.num_experts),
            initializer=router_kernel_initializer(self.seed),
        )

    def call(self, inputs, training=None, mask=None):
        x, valid = self.masked_tokens(inputs, mask)
        if training and self.jitter_epsilon:
            eps = self.jitter_epsilon
            x = x * replica_uniform(self.seed_generator, tf.shape(x), 1.0 - eps, 1.0 + eps)
        logits = tf.matmul(x, tf.cast(self.w_gate, tf.float32))
        probabilities = tf.nn.softmax(logits, axis=-1)
        expert_weight, expert_index = tf.math.top_k(probabilities, k=self.k)
        if self.normalize:
            expert_weight = expert_weight / tf.reduce_sum(expert_weight, axis=-1, keepdims=True)
        if valid is not None:
            expert_index = tf.where(valid[:, None], expert_index, self.num_experts)
            expert_weight = tf.where(valid[:, None], expert_weight, 0.0)
            probabilities = tf.where(valid[:, None], probabilities, 0.0)
        counts, probability_sums, tokens = balance_statistics(expert_index, probabilities, valid)
        balance = self.balance_weight * gating.load_balancing_loss(counts, probability_sums, tokens, self.k)
        token_id, expert_id, weight = token_choice_assignments(expert_index, expert_weight)
        return Routing(
            token_id=token_id,
            expert_id=expert_id,
            weight=weight,
            importance=gating.importance(expert_index, expert_weight, self.num_experts),
            load=gating.hard_load(expert_index, self.num_experts),
            dropped=tf.zeros(()),
            losses={"load_balancing": balance, **self.z_losses(logits, valid)},
            metrics={},
        )


    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "normalize": self.normalize,
                "balance_weight": self.balance_weight,
                "jitter_epsilon": self.jitter_epsilon,
                "seed": self.seed,
            }
        )
        return config
