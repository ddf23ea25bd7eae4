"""Noisy top-k gating (PAPER.md sections 1 and 3)."""

import keras
import tensorflow as tf

from tf_moe.layers.checks import check_non_negative, check_not_above, check_positive_int
from tf_moe.ops import gating


def replica_normal(seed_generator, shape):
    """Standard-normal draws; each data-parallel replica gets its own stream.

    Replicas share the mirrored generator state, so without the replica id in
    the seed every replica would draw the same noise.
    """
    seed = seed_generator.next()
    context = tf.distribute.get_replica_context()
    if context is not None and context.num_replicas_in_sync > 1:
        seed = seed + tf.cast(tf.stack([context.replica_id_in_sync_group, 0]), seed.dtype)
    # int32 seeds, as keras.random does, so the draw compiles with XLA.
    seed = tf.cast(tf.math.floormod(seed, tf.int32.max - 1), tf.int32)
    return tf.random.stateless_normal(shape, seed=seed)


@keras.saving.register_keras_serializable(package="tf_moe")
class NoisyTopKGate(keras.layers.Layer):
    """Noisy top-k gating network of the sparsely-gated MoE.

    `H(x) = x W_g + N(0, 1) * (Softplus(x W_noise) + noise_epsilon)` while
    training (noise only when `noisy` and training), then
    `G(x) = Softmax(KeepTopK(H(x), k))`, returned in sparse form. Both
    weight matrices start at zero, so every expert starts with equal load.
    The gate computes in float32 whatever the global dtype policy, so gate
    and balancing maths keep full precision under mixed precision.

    Args:
        num_experts: int, number of experts n.
        k: int, experts per token, 1 <= k <= num_experts.
        noisy: bool, add the tunable Gaussian noise while training.
        noise_epsilon: float >= 0 added to the noise scale.
        seed: optional int seed of the noise.
        **kwargs: base layer arguments (`name`, ...). `dtype` defaults to
            float32.

    Call arguments:
        inputs: [tokens, d] float tensor.
        training: bool, adds noise and uses the smooth load estimate.
        mask: optional [tokens] bool; masked tokens get zero gates and do not
            count in importance or load.
        noise: optional [tokens, num_experts] standard-normal draws to use
            instead of sampling (for reproducible tests).

    Returns:
        A dict with `expert_index` [tokens, k] int32 (best first),
        `expert_weight` [tokens, k] float32 (softmax over the kept logits,
        zero for masked tokens), `importance` [num_experts] (sum of gates),
        `load` [num_experts] (the smooth estimator of section 3 when noisy,
        training and k < n; else the hard count of tokens per expert) and
        `logits` [tokens, num_experts] (`H(x)`).

    Example:

    >>> gate = NoisyTopKGate(num_experts=8, k=2)
    >>> routing = gate(keras.random.normal((16, 32)), training=True)
    >>> routing["expert_index"].shape
    TensorShape([16, 2])
    """

    def __init__(self, num_experts, k, noisy=True, noise_epsilon=1e-2, seed=None, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        check_positive_int("num_experts", num_experts)
        check_positive_int("k", k)
        check_not_above("k", k, "num_experts", num_experts)
        check_non_negative("noise_epsilon", noise_epsilon)
        self.num_experts = num_experts
        self.k = k
        self.noisy = bool(noisy)
        self.noise_epsilon = float(noise_epsilon)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)
        # Takes a token mask as an argument; its dict output carries no mask.
        self.supports_masking = True

    def build(self, input_shape):
        if len(input_shape) != 2 or input_shape[-1] is None:
            raise ValueError(
                f"`inputs` of NoisyTopKGate must be [tokens, d] with known d, got {input_shape}."
            )
        shape = (input_shape[-1], self.num_experts)
        self.w_gate = self.add_weight(name="w_gate", shape=shape, initializer="zeros")
        self.w_noise = self.add_weight(name="w_noise", shape=shape, initializer="zeros")

    def call(self, inputs, training=None, mask=None, noise=None):
        x = tf.cast(inputs, tf.float32)
        clean_logits = tf.matmul(x, tf.cast(self.w_gate, tf.float32))
        add_noise = self.noisy and bool(training)
        logits = clean_logits
        if add_noise:
            stddev = gating.noise_stddev(
                tf.matmul(x, tf.cast(self.w_noise, tf.float32)), self.noise_epsilon
            )
            if noise is None:
                noise = replica_normal(self.seed_generator, tf.shape(clean_logits))
            logits = clean_logits + tf.cast(noise, tf.float32) * stddev
        expert_index, expert_weight, _ = gating.top_k_gates(logits, self.k)

        token_weight = None
        if mask is not None:
            token_weight = tf.cast(tf.reshape(mask, [-1]), tf.float32)
            expert_weight = expert_weight * token_weight[:, None]
        if add_noise and self.k < self.num_experts:
            load = gating.smooth_load(clean_logits, logits, stddev, self.k, token_weight)
        else:
            counted = expert_index
            if mask is not None:
                counted = tf.where(tf.reshape(mask, [-1, 1]), expert_index, self.num_experts)
            load = gating.hard_load(counted, self.num_experts)
        return {
            "expert_index": expert_index,
            "expert_weight": expert_weight,
            "importance": gating.importance(expert_index, expert_weight, self.num_experts),
            "load": load,
            "logits": logits,
        }

    def compute_mask(self, inputs, mask=None):
        return None

    def compute_output_shape(self, input_shape):
        tokens = input_shape[0]
        return {
            "expert_index": (tokens, self.k),
            "expert_weight": (tokens, self.k),
            "importance": (self.num_experts,),
            "load": (self.num_experts,),
            "logits": (tokens, self.num_experts),
        }

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_experts": self.num_experts,
                "k": self.k,
                "noisy": self.noisy,
                "noise_epsilon": self.noise_epsilon,
                "seed": self.seed,
            }
        )
        return config
