"""The routers of `MoELayer`, by name.

| name              | router               | experts per token        | balancing loss                | source                                  |
|-------------------|----------------------|--------------------------|-------------------------------|-----------------------------------------|
| `"noisy_top_k"`   | `NoisyTopKRouter`    | k                        | CV^2 of importance and load   | Shazeer et al. 2017, section 2.1        |
| `"softmax"`       | `SoftmaxRouter`      | all n (dense baseline)   | CV^2 of importance and load   | Shazeer et al. 2017, section 2.1        |
| `"batchwise"`     | `BatchwiseRouter`    | k on average             | CV^2, plus a threshold loss   | Shazeer et al. 2017, appendix F         |
| (an instance)     | `HierarchicalRouter` | k_primary * k_secondary  | CV^2 of Importance_H, Load_H  | Shazeer et al. 2017, appendix B         |
| `"switch"`        | `SwitchRouter`       | 1                        | alpha * E * sum f_i P_i       | Fedus et al. 2022, section 2.2          |
| `"top_k"`         | `TopKRouter`         | k                        | alpha * E * sum f_i P_i       | Lepikhin et al. 2020; Fedus et al. 2022 |
| `"expert_choice"` | `ExpertChoiceRouter` | k on average (its c)     | none: balanced by design      | Zhou et al. 2022, section 3             |
| `"loss_free"`     | `LossFreeRouter`     | k                        | none: per-expert biases       | Wang et al. 2024; DeepSeek-V3 2.1.2     |
| `"hash"`          | `HashRouter`         | 1                        | none: a fixed map of token id | Roller et al. 2021                      |

Every router with logits takes `z_loss_weight`, the router z-loss of
Zoph et al. 2022 (section 3.1). `get` turns a name, a serialized config or
an instance into a router.
"""

import keras

from tf_moe.layers.batchwise_router import BatchwiseRouter
from tf_moe.layers.expert_choice_router import ExpertChoiceRouter
from tf_moe.layers.hash_router import HashRouter
from tf_moe.layers.hierarchical_router import HierarchicalRouter
from tf_moe.layers.loss_free_router import LossFreeRouter
from tf_moe.layers.noisy_top_k_router import NoisyTopKRouter
from tf_moe.layers.router import Router, Routing
from tf_moe.layers.softmax_router import SoftmaxRouter
from tf_moe.layers.switch_router import SwitchRouter
from tf_moe.layers.top_k_router import TopKRouter

# Routers made from (num_experts, k) alone.
_BY_NAME = {
    "noisy_top_k": lambda num_experts, k: NoisyTopKRouter(num_experts, k),
    "softmax": lambda num_experts, k: SoftmaxRouter(num_experts),
    "batchwise": lambda num_experts, k: BatchwiseRouter(num_experts, k),
    "switch": lambda num_experts, k: SwitchRouter(num_experts),
    "top_k": lambda num_experts, k: TopKRouter(num_experts, k),
    # k is the experts a token visits on average: the capacity factor c.
    "expert_choice": lambda num_experts, k: ExpertChoiceRouter(num_experts, 2.0 if k is None else k),
    "loss_free": lambda num_experts, k: LossFreeRouter(num_experts, k),
    "hash": lambda num_experts, k: HashRouter(num_experts),
}
# Every name `get` knows.
NAMES = tuple(_BY_NAME)
# Routers that send every token to one expert: k must be None or 1.
ONE_EXPERT = ("switch", "hash")
# Routers made without a `k` (the expert-choice one then takes its default c).
_K_OPTIONAL = ("softmax", *ONE_EXPERT, "expert_choice")
# Routers that need more than (num_experts, k): how to make them.
_NEEDS_ARGUMENTS = {
    "hierarchical": "HierarchicalRouter(num_groups, experts_per_group, k_primary, k_secondary)",
}


def get(identifier, num_experts=None, k=None):
    """A `Router` from a name, a `keras.layers.serialize` config or an instance.

    Args:
        identifier: a `Router` (returned as is), its serialized config (a
            dict), or one of the names in the table above (routers that
            need more than `num_experts` and `k`, such as the hierarchical
            one, are passed as instances).
        num_experts: int, experts of a router made by name.
        k: int, experts per token of a router made by name: None or
            `num_experts` for "softmax" (every expert on every token), None
            or 1 for "switch" and "hash"; for "expert_choice" the experts a
            token visits on average, its capacity factor c (None: 2).

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
    if num_experts is None or (k is None and identifier not in _K_OPTIONAL):
        raise ValueError(f"`router={identifier!r}` needs `num_experts` and `k`.")
    if identifier == "softmax" and k not in (None, num_experts):
        raise ValueError(
            f"The softmax router sends every token to every expert: `k` must be None or "
            f"`num_experts` ({num_experts}), got {k!r}."
        )
    if identifier in ONE_EXPERT and k not in (None, 1):
        raise ValueError(f"The {identifier} router sends every token to one expert: `k` must be None or 1, got {k!r}.")
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
    "NAMES",
    "ONE_EXPERT",
    "BatchwiseRouter",
    "ExpertChoiceRouter",
    "HashRouter",
    "HierarchicalRouter",
    "LossFreeRouter",
    "NoisyTopKRouter",
    "Router",
    "Routing",
    "SoftmaxRouter",
    "SwitchRouter",
    "TopKRouter",
    "from_gate_arguments",
    "get",
]
