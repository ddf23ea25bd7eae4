"""Dense softmax gating, the paper's non-sparse baseline (PAPER.md section 1)."""

import keras
import tensorflow as tf

from tf_moe.layers.checks import check_positive_int


@keras.saving.register_keras_serializable(package="tf_moe")
class SoftmaxGate(keras.layers.Layer):
    """Plain softmax gating `G(x) = Softmax(x W_g)` over all experts.

    The dense baseline the paper compares noisy top-k gating against: every
    token goes to every expert, weighted by its softmax gate, so an MoE with
    this gate computes all n experts on every token. Returned in the same
    sparse form as `NoisyTopKGate` (with k = n), so it shares the MoE's
    dispatch path. `W_g` starts at zero (uniform gates). The gate computes in
    float32 whatever the global dtype policy.

    Args:
        num_experts: int, number of experts n.
        **kwargs: base layer arguments (`name`, ...). `dtype` defaults to
            float32.

    Call arguments:
        inputs: [tokens, d] float tensor.
        training: unused (the gate has no noise); accepted for a uniform
            gate interface.
        mask: optional [tokens] bool; masked tokens get zero gates and do not
            count in importance or load.

    Returns:
        A dict with `expert_index` [tokens, n] int32 (every expert, in
        order), `expert_weight` [tokens, n] float32 (the softmax, zero for
        masked tokens), `importance` [n] (sum of gates), `load` [n] (tokens
        per expert: every unmasked token) and `logits` [tokens, n].

    Example:

    >>> gate = SoftmaxGate(num_experts=4)
    >>> gate(keras.random.normal((16, 32)))["expert_weight"].shape
    TensorShape([16, 4])
    """

    def __init__(self, num_experts, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        check_positive_int("num_experts", num_experts)
        self.num_experts = num_experts
        # Experts per token, read by the MoE to size static capacity.
        self.k = num_experts
        self.supports_masking = True

    def build(self, input_shape):
        if len(input_shape) != 2 or input_shape[-1] is None:
            raise ValueError(
                f"`inputs` of SoftmaxGate must be [tokens, d] with known d, got {input_shape}."
            )
        self.w_gate = self.add_weight(
            name="w_gate", shape=(input_shape[-1], self.num_experts), initializer="zeros"
        )

    def call(self, inputs, training=None, mask=None):
        logits = tf.matmul(tf.cast(inputs, tf.float32), tf.cast(self.w_gate, tf.float32))
        gates = tf.nn.softmax(logits, axis=-1)
        if mask is None:
            token_weight = tf.ones_like(logits[:, 0])
        else:
            token_weight = tf.cast(tf.reshape(mask, [-1]), tf.float32)
        gates = gates * token_weight[:, None]
        expert_index = tf.broadcast_to(tf.range(self.num_experts), tf.shape(logits))
        return {
            "expert_index": expert_index,
            "expert_weight": gates,
            "importance": tf.reduce_sum(gates, axis=0),
            "load": tf.fill([self.num_experts], tf.reduce_sum(token_weight)),
            "logits": logits,
        }

    def compute_mask(self, inputs, mask=None):
        return None

    def compute_output_shape(self, input_shape):
        tokens = input_shape[0]
        return {
            "expert_index": (tokens, self.num_experts),
            "expert_weight": (tokens, self.num_experts),
            "importance": (self.num_experts,),
            "load": (self.num_experts,),
            "logits": (tokens, self.num_experts),
        }

    def get_config(self):
        config = super().get_config()
        config.update({"num_experts": self.num_experts})
        return config
