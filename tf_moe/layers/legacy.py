"""tf_moe 0.1 compatibility: its gate arguments, described as the routers they meant."""

from tf_moe.layers.batchwise_router import BatchwiseRouter
from tf_moe.layers.noisy_top_k_router import NoisyTopKRouter
from tf_moe.layers.softmax_router import SoftmaxRouter


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
