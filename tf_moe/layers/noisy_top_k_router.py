"""Noisy top-k gating (Shazeer et al. 2017, section 2.1), the default router."""

import keras
import tensorflow as tf

from tf_moe.layers.checks import check_bool, check_non_negative, check_positive
from tf_moe.layers.router import Router, Routing
from tf_moe.layers.router_registry import register_router
from tf_moe.ops import gating
from tf_moe.ops.dispatch import token_choice_assignments
from tf_moe.ops.replicas import replica_normal


def scaled_gate_weight(weight, learning_rate_multiplier):
    """A stored gate matrix as the gate uses it: times `learning_rate_multiplier`, in float32.

    Storing `W / m` and using `m * (W / m)` leaves the function alone but
    makes Adam-type optimizers, whose steps do not depend on the gradient's
    scale, move `W` m times faster.
    """
    weight = tf.cast(weight, tf.float32)
    return weight if learning_rate_multiplier == 1.0 else weight * learning_rate_multiplier


@register_router("noisy_top_k")
@keras.saving.register_keras_serializable(package="tf_moe")
class NoisyTopKRouter(Router):
    """Noisy top-k gating of the sparsely-gated MoE (section 2.1).

    `H(x) = x W_g + StandardNormal() * (Softplus(x W_noise) + noise_epsilon)`
    while training (noise only when `noisy` and training), then
    `G(x) = Softmax(KeepTopK(H(x), k))`: each token goes to its k best
    experts, best first. Both weight matrices start at zero, so every expert
    starts with equal load. Importance is the sum of the gates; load is the
    smooth estimator of section 4 and appendix A while training with noise
    (and k < n), else the count of tokens per expert. The router computes in
    float32 whatever the dtype policy; at inference it costs `x W_g` alone
    (`Router.ops_per_token`: the noise scale only matters while training).

    Metrics (`Routing.metrics`), logged by `MoELayer` per layer:

    * `topk_agreement`: the mean over unmasked tokens of
      `|noisy top-k set & noise-free top-k set| / k`, how often the routing
      that trains the experts is the one used at inference. 1.0 when no
      noise is added (inference, or `noisy=False`).
    * `noise_to_signal`: the mean over unmasked tokens of the noise scale
      `Softplus(x W_noise) + noise_epsilon` (averaged over experts), over
      the mean of the standard deviation across experts of the clean logits
      `x W_g`; reported at inference too (the noise training would add on
      these tokens). 0 with `noisy=False`; inf while `x W_g` has no spread
      at all (the zero-initialised gate before its first update), and
      `MoELayer` leaves such batches out of its logged average.

    Args:
        num_experts: int, number of experts n.
        k: int, experts per token, 1 <= k <= num_experts.
        noisy: bool, add the tunable Gaussian noise while training.
        noise_epsilon: finite float >= 0 added to the noise scale.
        seed: optional int seed of the noise.
        learning_rate_multiplier: finite float > 0, how much faster than
            the rest of the model the gate learns. The router stores
            `W / learning_rate_multiplier` and multiplies it back, so the
            function is unchanged while Adam-type optimizers (whose steps do
            not depend on the gradient's scale) move `W_g` and `W_noise`
            `learning_rate_multiplier` times faster; under plain SGD the
            factor is its square. 1 is the paper's training. Both
            matrices still start at zero. See "Gate learning rate" in
            docs/results.md for the measured effect.
        **kwargs: `z_loss_weight` (float >= 0, default 0: the router z-loss
            of `Router` on the clean logits `x W_g`) and base layer arguments (`name`, ...). `dtype` defaults to
            float32.

    Call arguments:
        inputs: [tokens, d] float tensor.
        training: bool, adds noise and uses the smooth load estimate.
        mask: optional [tokens] bool; masked tokens are not routed.
        noise: optional [tokens, num_experts] standard-normal draws to use
            instead of sampling (for reproducible tests).

    Returns:
        A `Routing` of `k * tokens` assignments, all first choices first.

    Example:

    >>> router = NoisyTopKRouter(num_experts=8, k=2, seed=0)
    >>> routing = router(keras.random.normal((16, 32)), training=True)
    >>> routing.expert_id.shape
    TensorShape([32])
    """

    metric_names = ("topk_agreement", "noise_to_signal")

    def __init__(
        self, num_experts, k, noisy=True, noise_epsilon=1e-2, seed=None,
        learning_rate_multiplier=1.0, **kwargs,
    ):
        super().__init__(num_experts, k, **kwargs)
        check_non_negative("noise_epsilon", noise_epsilon)
        check_positive("learning_rate_multiplier", learning_rate_multiplier)
        self.learning_rate_multiplier = float(learning_rate_multiplier)
        self.noisy = check_bool("noisy", noisy)
        self.noise_epsilon = float(noise_epsilon)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def build(self, input_shape):
        self.check_input_shape(input_shape)
        shape = (input_shape[-1], self.num_experts)
        self.w_gate = self.add_weight(name="w_gate", shape=shape, initializer="zeros")
        self.w_noise = self.add_weight(name="w_noise", shape=shape, initializer="zeros")

    def call(self, inputs, training=None, mask=None, noise=None):
        x, valid = self.masked_tokens(inputs, mask)
        clean_logits, noise_logits = self._logits(x)
        stddev = None if noise_logits is None else gating.noise_stddev(noise_logits, self.noise_epsilon)
        add_noise = self.noisy and bool(training)
        logits = clean_logits
        if add_noise:
            logits = clean_logits + self._standard_normal(noise, clean_logits, valid) * stddev
        smooth = add_noise and self.k < self.num_experts
        expert_index, expert_weight, top_logits = gating.top_k_gates(
            logits, self.k, keep=self.k + 1 if smooth else None
        )
        metrics = self._diagnostics(expert_index, clean_logits, stddev, valid, add_noise)

        if valid is not None:
            expert_index = tf.where(valid[:, None], expert_index, self.num_experts)
            expert_weight = tf.where(valid[:, None], expert_weight, 0.0)
        if smooth:
            load = gating.smooth_load(clean_logits, logits, stddev, self.k, valid, top_logits)
        else:
            load = gating.hard_load(expert_index, self.num_experts)
        token_id, expert_id, weight = token_choice_assignments(expert_index, expert_weight)
        return Routing(
            token_id=token_id,
            expert_id=expert_id,
            weight=weight,
            importance=gating.importance(expert_index, expert_weight, self.num_experts),
            load=load,
            dropped=tf.zeros(()),
            losses=self.z_losses(clean_logits, valid),
            metrics=metrics,
        )

    def _logits(self, x):
        """`(x W_g, x W_noise)`, the latter None without noise.

        One matmul with the two matrices side by side ([d, 2n], built at
        call time so the saved weights keep their names and shapes): x is
        read once and the gradient takes two matmuls instead of four. A
        split, not two slices: its gradient is one concat, where each
        slice's would be a zero-padded [tokens, 2n] tensor, then summed.
        """
        if not self.noisy:
            return tf.matmul(x, self._scaled(self.w_gate)), None
        both = tf.matmul(x, self._scaled(tf.concat([self.w_gate, self.w_noise], axis=1)))
        clean, noise = tf.split(both, 2, axis=1)
        return clean, noise

    def _scaled(self, weight):
        return scaled_gate_weight(weight, self.learning_rate_multiplier)

    def _standard_normal(self, noise, logits, valid):
        if noise is None:
            return replica_normal(self.seed_generator, tf.shape(logits))
        noise = tf.cast(noise, tf.float32)
        # Given draws may hold anything at masked positions.
        return noise if valid is None else tf.where(valid[:, None], noise, 0.0)

    def _diagnostics(self, noisy_index, clean_logits, stddev, valid, add_noise):
        if add_noise:
            agreement = gating.topk_agreement(noisy_index, clean_logits, valid)
        else:
            agreement = tf.ones(())
        if stddev is None:
            ratio = tf.zeros(())
        else:
            ratio = gating.noise_to_signal(stddev, clean_logits, valid)
        return {
            "topk_agreement": tf.stop_gradient(agreement),
            "noise_to_signal": tf.stop_gradient(ratio),
        }


    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "noisy": self.noisy,
                "noise_epsilon": self.noise_epsilon,
                "seed": self.seed,
                "learning_rate_multiplier": self.learning_rate_multiplier,
            }
        )
        return config
