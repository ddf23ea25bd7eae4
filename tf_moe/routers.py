"""The routers of `MoELayer`, by name.

| name             | router               | experts per token       | source (Shazeer et al. 2017) |
|------------------|----------------------|-------------------------|------------------------------|
| `"noisy_top_k"`  | `NoisyTopKRouter`    | k                       | section 2.1                  |
| `"softmax"`      | `SoftmaxRouter`      | all n (dense baseline)  | section 2.1                  |
| `"batchwise"`    | `BatchwiseRouter`    | k on average            | appendix F                   |
| (an instance)    | `HierarchicalRouter` | k_primary * k_secondary | appendix B                   |

All four take the MoE's balancing loss of section 4 (CV^2 of importance and
load); the batchwise router adds its threshold loss. `get` turns a name, a
serialized config or an instance into a router.
"""

import keras

from tf_moe.layers.batchwise_router import BatchwiseRouter
from tf_moe.layers.hierarchical_router import HierarchicalRouter
from tf_moe.layers.noisy_top_k_router import NoisyTopKRouter
from tf_moe.layers.router import Router, Routing
from tf_moe.layers.softmax_router import SoftmaxRouter

# Routers made from (num_experts, k) alone.
_BY_NAME = {
    "noisy_top_k": lambda num_experts, k: NoisyTopKRouter(num_experts, k),
    "softmax": lambda num_experts, k: SoftmaxRouter(num_experts),
    "batchwise": lambda num_experts, k: BatchwiseRouter(num_experts, k),
}
# Routers that need more than (num_experts, k): how to make them.
_NEEDS_ARGUMENTS = {
    "hierarchical": "HierarchicalRouter(num_groups, experts_per_group, k_primary, k_secondary)",
}


def get(identifier, num_experts=None, k=None):
    """A `Router` from a name, a `keras.layers.serialize` config or an instance.

    Args:
        identifier: a `Router` (returned as is), its serialized config (a
            dict), or one of the names "noisy_top_k", "softmax",
            "batchwise" (routers that need more than `num_experts` and `k`,
            such as the hierarchical one, are passed as instances).
        num_experts: int, experts of a router made by name.
        k: int, experts per token of a router made by name (the softmax
            router sends every token to every expert and takes only None or
            `num_experts`).

    Returns:
        A `Router`.

    Example:

    >>> get("noisy_top_k", num_experts=8, k=2).metric_names
    ('topk_agreement', 'noise_to_signal')
    """
    if isinstance(identifier, Router):
        return identifier
    if isinstance(identifier, dict):
        router = keras.layers.deserialize(identifier)
        if not isinstance(router, Router):
            raise TypeError(f"`router` config must describe a Router, got {type(router).__name__}.")
        return router
    if isinstance(identifier, str) and identifier in _NEEDS_ARGUMENTS:
        raise ValueError(
            f"`router={identifier!r}` needs arguments of its own: pass "
            f"`router={_NEEDS_ARGUMENTS[identifier]}`."
        )
    if not isinstance(identifier, str) or identifier not in _BY_NAME:
        raise ValueError(
            f"`router` must be a Router, its config or one of {sorted(_BY_NAME)}, got {identifier!r}."
        )
    if num_experts is None or (k is None and identifier != "softmax"):
        raise ValueError(f"`router={identifier!r}` needs `num_experts` and `k`.")
    if identifier == "softmax" and k not in (None, num_experts):
        raise ValueError(
            f"The softmax router sends every token to every expert: `k` must be None or "
            f"`num_experts` ({num_experts}), got {k!r}."
        )
    return _BY_NAME[identifier](num_experts, k)


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


__all__ = [
    "BatchwiseRouter",
    "HierarchicalRouter",
    "NoisyTopKRouter",
    "Router",
    "Routing",
    "SoftmaxRouter",
    "from_gate_arguments",
    "get",
]
