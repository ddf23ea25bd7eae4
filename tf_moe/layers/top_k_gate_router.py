"""Top-k softmax gating without noise, on normalised inputs: the paper's recurrent models' router."""

import keras
import tensorflow as tf

from tf_moe.layers.checks import check_bool, check_keras_object, check_positive
from tf_moe.layers.noisy_top_k_router import scaled_gate_weight
from tf_moe.layers.router import Router, Routing
from tf_moe.layers.router_registry import register_router
from tf_moe.ops import gating
from tf_moe.ops.dispatch import token_choice_assignments


# The default gate's logits on normalised tokens start with this spread:
# near zero, as the paper's, with the ties among experts broken at random.
_INITIAL_LOGIT_STDDEV = 0.01


@register_router("top_k_gate")
@keras.saving.register_keras_serializable(package="tf_moe")
class TopKGateRouter(Router):
    """The paper's gate without its noise, on normalised inputs.

    `G(x) = Softmax(KeepTopK(x_hat W_g, k))` (Shazeer et al. 2017, Eq. 3-5
    without the noise term; the same function as Mixtral's router, Jiang et
    al. 2024, when `normalize_inputs=False`), where `x_hat = x /
    sqrt(mean(x^2) + 1e-6)` is the token scaled to unit root mean square
    (RMSNorm without a gain, Zhang & Sennrich 2019): each token goes to its
    k experts of highest logit, their gate values the softmax over those k
    logits. `W_g` starts near zero (on a normalised token each logit has
    standard deviation 0.01) and learns at the model's rate, or
    `learning_rate_multiplier` times faster: it is stored as `W_g / m` and
    used as `m * (W_g / m)`, so Adam-type optimizers step it m times
    further. `MoELayer` adds the paper's
    balancing losses (section 4): the importance loss balances the gates;
    without noise the load is the count of tokens per expert, reported but
    without gradient.

    `MoELayer`'s default router until `TopKRouter` beat it in the
    Transformer language model; it stays the router of the paper's LSTM
    models (`tf_moe.models.lstm_lm`, `seq2seq`), where `TopKRouter` lost at
    the main job's learning rate, and of `tf_moe.upcycle`, as its gate
    values sum to 1 (docs/results.md, "The default router"). Why these
    defaults (docs/results.md, "Why the paper's router lost in the
    Transformer"): with a zero-initialised gate, the paper's noise
    (`softplus(0) = 0.69` standard deviations) outweighs the logits for
    hundreds of steps, so training routes by noise. How fast the logits move depends
    on the scale of the router's input, which differs between models (a
    LayerNorm'd Transformer block against an LSTM's output); normalising it
    lets one gate speed serve both. A gate 3x faster than the model (the
    previous default) won at the learning rates first tried and lost at
    the higher ones each model reaches when tuned, in both models: its
    routing moves too fast (docs/results.md, "Equal tuning"). The paper's zero gate would, without
    noise, send every token to the same k experts (ties go to the lowest
    index), and the task loss reaches only the chosen experts' logits, so
    the others join one after another over the first steps; a gate near
    zero starts with near-uniform gates too, but with the ties broken at
    random, every expert gets tokens from the first step. A start further
    from zero (logits of standard deviation 1) won in the LSTM language
    model and lost in the Transformer (docs/results.md, "Where the default
    gate starts").

    Args:
        num_experts: int, number of experts n.
        k: int, experts per token, 1 <= k <= num_experts.
        learning_rate_multiplier: finite float > 0, how much faster than
            the rest of the model the gate learns (under plain SGD the
            factor is its square); the default 1 trains it at the model's
            rate.
        normalize_inputs: bool, whether the gate sees each token scaled to
            unit root mean square (default True) or as it is.
        gate_initializer: initializer of the stored `W_g / m`; None (the
            default) draws it normal with standard deviation
            `0.01 / (m sqrt(d))`, so that on normalised tokens each logit
            starts with standard deviation 0.01; "zeros" is the paper's
            start.
        **kwargs: `z_loss_weight` (float >= 0, default 0: the router z-loss
            of `Router` on `x W_g`) and base layer arguments (`name`, ...).
            `dtype` defaults to float32.

    Call arguments:
        inputs: [tokens, d] float tensor.
        training: unused (the routing is the same while training).
        mask: optional [tokens] bool; masked tokens are not routed.

    Returns:
        A `Routing` of `k * tokens` assignments, all first choices first.

    Example:

    >>> router = TopKGateRouter(num_experts=8, k=2)
    >>> routing = router(keras.random.normal((16, 32)))
    >>> routing.expert_id.shape
    TensorShape([32])
    """

    def __init__(
        self, num_experts, k, learning_rate_multiplier=1.0, normalize_inputs=True, gate_initializer=None, **kwargs
    ):
        super().__init__(num_experts, k, **kwargs)
        check_positive("learning_rate_multiplier", learning_rate_multiplier)
        self.learning_rate_multiplier = float(learning_rate_multiplier)
        self.normalize_inputs = check_bool("normalize_inputs", normalize_inputs)
        self.gate_initializer = check_keras_object("gate_initializer", keras.initializers, gate_initializer)

    def build(self, input_shape):
        self.check_input_shape(input_shape)
        initializer = self.gate_initializer
        if initializer is None:
            stddev = _INITIAL_LOGIT_STDDEV / (self.learning_rate_multiplier * input_shape[-1] ** 0.5)
            initializer = keras.initializers.RandomNormal(stddev=stddev)
        self.w_gate = self.add_weight(name="w_gate", shape=(input_shape[-1], self.num_experts), initializer=initializer)

    def call(self, inputs, training=None, mask=None):
        x, valid = self.masked_tokens(inputs, mask)
        if self.normalize_inputs:
            x = keras.ops.rms_normalization(x, epsilon=1e-6)
        logits = tf.matmul(x, scaled_gate_weight(self.w_gate, self.learning_rate_multiplier))
        expert_index, expert_weight, _ = gating.top_k_gates(logits, self.k)
        if valid is not None:
            expert_index = tf.where(valid[:, None], expert_index, self.num_experts)
            expert_weight = tf.where(valid[:, None], expert_weight, 0.0)
        token_id, expert_id, weight = token_choice_assignments(expert_index, expert_weight)
        return Routing(
            token_id=token_id,
            expert_id=expert_id,
            weight=weight,
            importance=gating.importance(expert_index, expert_weight, self.num_experts),
            load=gating.hard_load(expert_index, self.num_experts),
            dropped=tf.zeros(()),
            losses=self.z_losses(logits, valid),
            metrics={},
        )

    def get_config(self):
        config = super().get_config()
        config["learning_rate_multiplier"] = self.learning_rate_multiplier
        config["normalize_inputs"] = self.normalize_inputs
        config["gate_initializer"] = (
            None if self.gate_initializer is None else keras.initializers.serialize(self.gate_initializer)
        )
        return config
