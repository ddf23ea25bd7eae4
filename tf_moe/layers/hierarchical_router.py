"""Two-level noisy top-k gating of the hierarchical MoE (Shazeer et al. 2017, appendix B)."""

from typing import NamedTuple

import keras
import tensorflow as tf

from tf_moe.layers.checks import (
    check_bool,
    check_positive,
    check_capacity_factor,
    check_non_negative,
    check_not_above,
    check_positive_int,
)
from tf_moe.layers.noisy_top_k_router import NoisyTopKRouter, scaled_gate_weight
from tf_moe.layers.router import Router, Routing
from tf_moe.layers.router_registry import INSTANCE_ONLY, register_router
from tf_moe.ops import dispatch as dispatch_ops
from tf_moe.ops import gating
from tf_moe.ops.replicas import replica_normal


def check_hierarchy(num_groups, experts_per_group, k_primary, k_secondary):
    """Raises a ValueError naming the argument of a bad two-level configuration."""
    for arg, value in (
        ("num_groups", num_groups),
        ("experts_per_group", experts_per_group),
        ("k_primary", k_primary),
        ("k_secondary", k_secondary),
    ):
        check_positive_int(arg, value)
    check_not_above("k_primary", k_primary, "num_groups", num_groups)
    check_not_above("k_secondary", k_secondary, "experts_per_group", experts_per_group)


def hierarchical_load(primary_load, secondary_load, group_size):
    """`Load_H(X)_{i,j} = Load_primary(X)_i * Load_i(X^(i))_j / |X^(i)|`.

    Args:
        primary_load: [a] load of the primary gate over groups.
        secondary_load: [a, b] load of each group's gate over its own tokens.
        group_size: [a] `|X^(i)|`, tokens the primary gate sent to group i.
            An empty group has zero secondary load; the division is guarded
            so its experts get a load of 0.

    Returns:
        [a * b] float32, expert `i * b + j` at position `i * b + j`.
    """
    ratio = secondary_load / tf.maximum(group_size, 1.0)[:, None]
    return tf.reshape(primary_load[:, None] * ratio, [-1])


class _Groups(NamedTuple):
    """The (token, group) pairs of the primary gate, dispatched into per-group buffers."""

    buffer: tf.Tensor  # [a, C, d] tokens per group slot
    slot: tf.Tensor  # [pairs] slot of each pair (a * C: none)
    kept: tf.Tensor  # [pairs] bool, the pair has a slot
    occupied: tf.Tensor  # [a, C] float32, 1 where a slot holds a pair
    capacity: object  # C, an int or a scalar tensor


class _Secondary(NamedTuple):
    """The groups' gates on their buffers."""

    clean_logits: tf.Tensor  # [a, C, b]
    logits: tf.Tensor  # [a, C, b], with noise while training
    stddev: object  # [a, C, b] noise scale, None without noise
    slot_index: tf.Tensor  # [a, C, k_secondary] chosen experts of each slot
    slot_gate: tf.Tensor  # [a, C, k_secondary] their gate values


@register_router(
    "hierarchical", k=INSTANCE_ONLY,
    usage="HierarchicalRouter(num_groups, experts_per_group, k_primary, k_secondary)",
)
@keras.saving.register_keras_serializable(package="tf_moe")
class HierarchicalRouter(Router):
    """Primary noisy top-k gate over groups, then one noisy top-k gate per group (appendix B).

    Token x goes to the experts `E_{i,j}` (expert `i * b + j` of the
    `a * b`) with gate `G_primary(x)_i * G_i(x)_j`, `k_primary * k_secondary`
    of them; both levels are the noisy top-k gates of section 2.1. The
    secondary gates are evaluated only for the groups a token was sent to:
    the (token, group) pairs are packed into a [groups, capacity, d] buffer
    with the core dispatch, and one batched matmul with the stacked
    [groups, d, experts_per_group] gate weights gives their logits, so
    gating costs O(tokens * (a + k_primary * b) * d) rather than
    O(tokens * a * b * d).

    Importance and load follow appendix B: `Importance_H = sum_x
    G_primary(x)_i G_i(x)_j` and `Load_H = Load_primary_i * Load_i(X^(i))_j
    / |X^(i)|`, with each load the smooth estimator of appendix A while
    training with noise (and k < number of candidates), else hard token
    counts. Its metrics are those of the primary gate (`topk_agreement` and
    `noise_to_signal`, see `NoisyTopKRouter`), which decides the group.
    All weights start at zero; the router computes in float32.

    Args:
        num_groups: int, number of groups a.
        experts_per_group: int, experts per group b.
        k_primary: int, groups per token, <= num_groups.
        k_secondary: int, experts per group and token, <= experts_per_group.
        noisy: bool, add the tunable noise at both levels while training.
        noise_epsilon: finite float >= 0 added to the noise scales.
        capacity_factor: None (every (token, group) pair is gated; dynamic
            shape) or a finite float > 0: each group's buffer holds
            `ceil(capacity_factor * k_primary * tokens / num_groups)` pairs
            (static shape); pairs beyond it get no experts and are reported
            in `Routing.dropped`. Independent of the MoE's own capacity.
        seed: optional int seed of the noise.
        learning_rate_multiplier: finite float > 0 for the gates of both
            levels, as `NoisyTopKRouter`'s.
        **kwargs: `z_loss_weight` (float >= 0, default 0: the router z-loss
            of `Router` at both levels, on the clean logits: the mean over
            tokens of the primary gate's plus the mean over the routed
            (token, group) pairs of the secondary gates') and base layer
            arguments (`name`, ...). `dtype` defaults to float32.

    Call arguments:
        inputs: [tokens, d] float tensor.
        training: bool, adds noise and uses the smooth loads.
        mask: optional [tokens] bool; masked tokens are not routed.
        noise: optional pair `(primary [tokens, a], secondary [tokens, a, b])`
            of standard-normal draws to use instead of sampling (for
            reproducible tests); the secondary draws of (token, group) pairs
            that are not routed are unused.

    Returns:
        A `Routing` of `k_primary * k_secondary * tokens` assignments to the
        `a * b` experts, ordered by (primary choice, secondary choice), then
        token.

    Example:

    >>> router = HierarchicalRouter(num_groups=4, experts_per_group=4, seed=0)
    >>> router(keras.random.normal((16, 32)), training=True).expert_id.shape
    TensorShape([64])
    """

    metric_names = NoisyTopKRouter.metric_names

    def __init__(
        self,
        num_groups,
        experts_per_group,
        k_primary=2,
        k_secondary=2,
        noisy=True,
        noise_epsilon=1e-2,
        capacity_factor=None,
        seed=None,
        learning_rate_multiplier=1.0,
        **kwargs,
    ):
        check_hierarchy(num_groups, experts_per_group, k_primary, k_secondary)
        super().__init__(num_groups * experts_per_group, k_primary * k_secondary, **kwargs)
        check_non_negative("noise_epsilon", noise_epsilon)
        check_capacity_factor(capacity_factor)
        # Checked: Python or numpy ints.
        self.num_groups = int(num_groups)
        self.experts_per_group = int(experts_per_group)
        self.k_primary = int(k_primary)
        self.k_secondary = int(k_secondary)
        self.noisy = check_bool("noisy", noisy)
        self.noise_epsilon = float(noise_epsilon)
        self.capacity_factor = None if capacity_factor is None else float(capacity_factor)
        # Without a capacity the group buffers are sized by the routing.
        self.supports_jit = self.capacity_factor is not None
        self.seed = seed
        check_positive("learning_rate_multiplier", learning_rate_multiplier)
        self.learning_rate_multiplier = float(learning_rate_multiplier)
        self.primary = NoisyTopKRouter(
            num_groups, k_primary, noisy=noisy, noise_epsilon=noise_epsilon, seed=seed,
            learning_rate_multiplier=learning_rate_multiplier, z_loss_weight=self.z_loss_weight,
            name="primary",
        )
        # A different stream from the primary gate's when a seed is given.
        self.seed_generator = keras.random.SeedGenerator(None if seed is None else seed + 1)

    def build(self, input_shape):
        self.check_input_shape(input_shape)
        self.primary.build(input_shape)
        shape = (self.num_groups, input_shape[-1], self.experts_per_group)
        self.w_gate = self.add_weight(name="w_gate", shape=shape, initializer="zeros")
        self.w_noise = self.add_weight(name="w_noise", shape=shape, initializer="zeros")

    def call(self, inputs, training=None, mask=None, noise=None):
        """Routes each token to `k_primary` groups, then within each to `k_secondary` experts.

        Steps: the primary gate picks groups, giving (token, group) pairs;
        the pairs are dispatched into per-group buffers [a, C, d] (with
        `capacity_factor`, pairs over a group's capacity are dropped); each
        group's gate picks its experts for the tokens in its buffer; the
        choices go back from buffer slots to pairs, then to assignments of
        experts `group * b + expert`.

        Args:
            inputs: [T, d] tokens.
            training: adds the gates' noise (with `noisy`).
            mask: optional [T] bool, False for tokens to leave unrouted.
            noise: optional `(primary, secondary)` standard-normal draws of
                shapes [T, a] and [T, a, b], in place of the router's own.

        Returns:
            A `Routing` over the `a * b` experts.
        """
        x, valid = self.masked_tokens(inputs, mask)
        primary_noise, secondary_noise = (None, None) if noise is None else noise
        # One (token, group) pair per primary choice, choice-major.
        primary = self.primary(x, training=training, mask=valid, noise=primary_noise)
        num_tokens = x.shape[0] if x.shape[0] is not None else tf.shape(x)[0]
        groups = self._dispatch_pairs(x, primary, num_tokens)
        secondary = self._secondary_gates(groups, primary, training, secondary_noise)
        expert_index, expert_weight = self._pair_choices(groups, primary, secondary)
        return self._routing(primary, groups, secondary, expert_index, expert_weight, num_tokens)

    def _dispatch_pairs(self, x, primary, num_tokens):
        """The (token, group) pairs of the primary gate in per-group buffers: a `_Groups`."""
        a = self.num_groups
        capacity = None
        if self.capacity_factor is not None:
            capacity = dispatch_ops.static_capacity(self.capacity_factor, self.k_primary * num_tokens, a)
        buffer, slot, kept, _ = dispatch_ops.dispatch(x, primary.token_id, primary.expert_id, a, capacity)
        if capacity is None:
            capacity = tf.shape(buffer)[1]
        occupied = tf.reshape(
            tf.scatter_nd(slot[:, None], tf.cast(kept, tf.float32), [a * capacity + 1])[:-1],
            [a, capacity],
        )
        return _Groups(buffer, slot, kept, occupied, capacity)

    def _secondary_gates(self, groups, primary, training, secondary_noise):
        """Each group's gate on its buffer: a `_Secondary` of [a, C, b] logits and top-k choices."""
        clean_logits = tf.matmul(groups.buffer, scaled_gate_weight(self.w_gate, self.learning_rate_multiplier))
        logits, stddev = clean_logits, None
        if self.noisy and bool(training):
            stddev = gating.noise_stddev(
                tf.matmul(groups.buffer, scaled_gate_weight(self.w_noise, self.learning_rate_multiplier)),
                self.noise_epsilon,
            )
            draws = self._slot_noise(
                secondary_noise, clean_logits, primary.token_id, primary.expert_id, groups.slot, groups.capacity
            )
            logits = clean_logits + draws * stddev
        slot_index, slot_gate, _ = gating.top_k_gates(logits, self.k_secondary)
        return _Secondary(clean_logits, logits, stddev, slot_index, slot_gate)

    def _pair_choices(self, groups, primary, secondary):
        """[pairs, k_secondary] expert ids and weights, from slots back to pairs; pairs without a slot get none."""
        a, b, ks = self.num_groups, self.experts_per_group, self.k_secondary
        pair_index = tf.gather(
            tf.concat([tf.reshape(secondary.slot_index, [-1, ks]), tf.zeros([1, ks], tf.int32)], 0), groups.slot
        )
        pair_secondary_gate = tf.gather(
            tf.concat([tf.reshape(secondary.slot_gate, [-1, ks]), tf.zeros([1, ks])], 0), groups.slot
        )
        kept = groups.kept[:, None]
        expert_index = tf.where(kept, primary.expert_id[:, None] * b + pair_index, a * b)
        expert_weight = tf.where(kept, tf.cast(primary.weight, tf.float32)[:, None] * pair_secondary_gate, 0.0)
        return expert_index, expert_weight

    def _routing(self, primary, groups, secondary, expert_index, expert_weight, num_tokens):
        """The `Routing`: assignments, Importance_H and Load_H, drops, losses and the primary's metrics."""
        a, b, ks = self.num_groups, self.experts_per_group, self.k_secondary
        occupied = groups.occupied > 0
        if secondary.stddev is not None and ks < b:
            secondary_load = gating.smooth_load(
                secondary.clean_logits, secondary.logits, secondary.stddev, ks, occupied
            )
        else:
            secondary_load = tf.reshape(gating.hard_load(expert_index, a * b), [a, b])
        losses = self.z_losses(secondary.clean_logits, occupied)
        if losses:  # the primary gate's z-loss too
            losses["z_loss"] += primary.losses["z_loss"]
        routed_pairs = tf.cast(primary.expert_id < a, tf.float32)
        # Pairs are [k_primary * T] (primary choice major) with ks choices
        # each; assignments go (primary choice, secondary choice, token).
        token_id, expert_id, weight = [
            tf.reshape(tf.transpose(tf.reshape(t, [self.k_primary, num_tokens, ks]), [0, 2, 1]), [-1])
            for t in (tf.tile(primary.token_id[:, None], [1, ks]), expert_index, expert_weight)
        ]
        return Routing(
            token_id=token_id,
            expert_id=expert_id,
            weight=weight,
            importance=gating.importance(expert_id, weight, a * b),
            load=hierarchical_load(primary.load, secondary_load, tf.reduce_sum(groups.occupied, axis=1)),
            dropped=ks * tf.reduce_sum(routed_pairs - tf.cast(groups.kept, tf.float32)),
            losses=losses,
            metrics=primary.metrics,
        )

    def _slot_noise(self, secondary_noise, clean_logits, pair_token, pair_group, slot, capacity):
        """Standard-normal draws for the [a, C, b] secondary logits."""
        if secondary_noise is None:
            return replica_normal(self.seed_generator, tf.shape(clean_logits))
        a, b = self.num_groups, self.experts_per_group
        pair_noise = tf.gather_nd(
            tf.cast(secondary_noise, tf.float32),
            tf.stack([pair_token, tf.minimum(pair_group, a - 1)], axis=-1),
        )
        # Pairs without a slot (masked or over capacity) write to the row cut off.
        return tf.reshape(
            tf.scatter_nd(slot[:, None], pair_noise, [a * capacity + 1, b])[:-1],
            tf.shape(clean_logits),
        )

    def ops_per_token(self, input_units):
        # The primary gate on every token, then the gates of the k_primary
        # groups it picks.
        return input_units * (self.num_groups + self.k_primary * self.experts_per_group)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_groups": self.num_groups,
                "experts_per_group": self.experts_per_group,
                "k_primary": self.k_primary,
                "k_secondary": self.k_secondary,
                "noisy": self.noisy,
                "noise_epsilon": self.noise_epsilon,
                "capacity_factor": self.capacity_factor,
                "seed": self.seed,
                "learning_rate_multiplier": self.learning_rate_multiplier,
            }
        )
        return config
