"""tf_moe 0.1 compatibility, in one place: its `MoE` layer, gate arguments and model layouts.

tf_moe 0.1 had one layer, `MoE`, whose gate was chosen by name with the
noise options on the layer (`gate=`, `noisy_gating=`, `noise_epsilon=`,
`seed=`); its `ExpertParallelMoE` configs carry those arguments too, and
its seq2seq models recorded no parts. `MoE` keeps that API and its config;
`from_gate_arguments` and `router_config` turn the gate arguments into the
router they meant; `v01_seq2seq_part_names` is the fixed layout of its
seq2seq models. (`MoELayer.gate`, the router under its 0.1 name, stays on
`MoELayer`: every `.keras` file saves the router's weights under it.)
"""

import keras

from tf_moe.layers.batchwise_router import BatchwiseRouter
from tf_moe.layers.checks import check_bool, check_not_above, check_positive_int
from tf_moe.layers.moe_layer import MoELayer
from tf_moe.layers.noisy_top_k_router import NoisyTopKRouter
from tf_moe.layers.softmax_router import SoftmaxRouter

# The gate arguments of tf_moe 0.1's layers, now a router's.
GATE_ARGUMENTS = ("gate", "noisy_gating", "noise_epsilon", "seed")


def from_gate_arguments(num_experts, k, gate="noisy_top_k", noisy_gating=True, noise_epsilon=1e-2, seed=None):
    """The router that tf_moe 0.1's `MoE(gate=..., noisy_gating=..., ...)` meant.

    Args:
        num_experts, k: the MoE's.
        gate: "noisy_top_k", "softmax" or "batchwise".
        noisy_gating, noise_epsilon, seed: the noisy top-k gate's options
            (unused by the other gates, as in 0.1).

    Returns:
        A `Router`.
    """
    if gate == "noisy_top_k":
        return NoisyTopKRouter(num_experts, k, noisy=noisy_gating, noise_epsilon=noise_epsilon, seed=seed)
    if gate == "softmax":
        return SoftmaxRouter(num_experts)
    if gate == "batchwise":
        return BatchwiseRouter(num_experts, k)
    raise ValueError(f"`gate` must be one of ('noisy_top_k', 'softmax', 'batchwise'), got {gate!r}.")


def router_config(config):
    """An `MoELayer` config with tf_moe 0.1's gate arguments (if any) replaced by its `router`."""
    config = dict(config)
    gate = {key: config.pop(key) for key in GATE_ARGUMENTS if key in config}
    if gate:
        config["router"] = from_gate_arguments(config["num_experts"], config["k"], **gate)
        config["k"] = None  # the softmax gate ignored `k`
    return config


def v01_seq2seq_part_names(model):
    """The layer of each part of a seq2seq model saved by tf_moe 0.1, which recorded none."""
    names = {layer.name for layer in model.layers}
    middle = ["decoder_moe"] if "decoder_moe" in names else ["decoder_wide_hidden", "decoder_wide_output"]
    return {
        "encoder_output": "encoder_lstm_3_residual",
        "embedding": "embedding",
        "decoder_lstm_1": "decoder_lstm_1",
        "attention": "attention",
        "decoder_middle": middle,
        "decoder_lstm_2": "decoder_lstm_2",
        "logits": "logits",
    }


@keras.saving.register_keras_serializable(package="tf_moe")
class MoE(MoELayer):
    """`MoELayer` with tf_moe 0.1's arguments: the gate by name, noise options on the layer.

    `MoE(n, k, h, gate=..., noisy_gating=..., noise_epsilon=..., seed=...)`
    is `MoELayer(n, k, h, router=...)` with the router those arguments
    describe (`from_gate_arguments`); everything else is
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
        router = from_gate_arguments(num_experts, k, gate, noisy_gating, noise_epsilon, seed)
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
