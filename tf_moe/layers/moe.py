"""`MoE`: tf_moe 0.1's spelling of `MoELayer`, kept so old code and files load."""

import keras

from tf_moe import routers
from tf_moe.layers.checks import check_bool, check_not_above, check_positive_int
from tf_moe.layers.moe_layer import MoELayer


@keras.saving.register_keras_serializable(package="tf_moe")
class MoE(MoELayer):
    """`MoELayer` with tf_moe 0.1's arguments: the gate by name, noise options on the layer.

    `MoE(n, k, h, gate=..., noisy_gating=..., noise_epsilon=..., seed=...)`
    is `MoELayer(n, k, h, router=...)` with the router those arguments
    describe (`tf_moe.routers.from_gate_arguments`); everything else is
    `MoELayer`'s. Its config keeps the 0.1 form, and `.keras` files saved
    by tf_moe 0.1 load into it unchanged. New code should use `MoELayer`.

    Args:
        num_experts, k, hidden_units, output_units, activation,
            importance_weight, load_weight, capacity_factor, use_bias,
            kernel_initializer, bias_initializer, kernel_regularizer,
            bias_regularizer: as `MoELayer`.
        noisy_gating: bool, the noisy top-k gate adds its noise while
            training.
        noise_epsilon: finite float >= 0 added to the noise scale.
        seed: optional int seed of the gating noise.
        gate: "noisy_top_k" (section 2.1), "softmax" (the dense baseline;
            `k` unused) or "batchwise" (appendix F).
        **kwargs: base layer arguments (`name`, `dtype`, ...).

    Example:

    >>> MoE(num_experts=8, k=2, hidden_units=64, gate="batchwise")(np.zeros((2, 16, 32), "float32")).shape
    TensorShape([2, 16, 32])
    """

    def __init__(
        self,
        num_experts,
        k,
        hidden_units,
        output_units=None,
        activation="relu",
        noisy_gating=True,
        noise_epsilon=1e-2,
        importance_weight=0.1,
        load_weight=0.1,
        capacity_factor=None,
        use_bias=True,
        kernel_initializer=None,
        bias_initializer="zeros",
        kernel_regularizer=None,
        bias_regularizer=None,
        seed=None,
        gate="noisy_top_k",
        **kwargs,
    ):
        num_experts = check_positive_int("num_experts", num_experts)
        k = check_positive_int("k", k)
        check_not_above("k", k, "num_experts", num_experts)
        router = routers.from_gate_arguments(num_experts, k, gate, noisy_gating, noise_epsilon, seed)
        super().__init__(
            num_experts=num_experts,
            hidden_units=hidden_units,
            output_units=output_units,
            activation=activation,
            router=router,
            importance_weight=importance_weight,
            load_weight=load_weight,
            capacity_factor=capacity_factor,
            use_bias=use_bias,
            kernel_initializer=kernel_initializer,
            bias_initializer=bias_initializer,
            kernel_regularizer=kernel_regularizer,
            bias_regularizer=bias_regularizer,
            **kwargs,
        )
        # As given: the softmax gate routes to all experts whatever `k` says.
        self.gate_arguments = {
            "k": k,
            "noisy_gating": check_bool("noisy_gating", noisy_gating),
            "noise_epsilon": float(noise_epsilon),
            "seed": seed,
            "gate": gate,
        }

    def get_config(self):
        config = super().get_config()
        del config["router"]
        config.update(self.gate_arguments)
        return config

    @classmethod
    def from_config(cls, config):
        return super(MoELayer, cls).from_config(config)
