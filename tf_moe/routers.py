"""The routers of `MoELayer`, by name.

| name              | router               | experts per token        | balancing loss                | source                                  |
|-------------------|----------------------|--------------------------|-------------------------------|-----------------------------------------|
| `"top_k_gate"`    | `TopKGateRouter`     | k                        | CV^2 of importance            | Shazeer et al. 2017, without the noise  |
| `"noisy_top_k"`   | `NoisyTopKRouter`    | k                        | CV^2 of importance and load   | Shazeer et al. 2017, section 2.1        |
| `"softmax"`       | `SoftmaxRouter`      | all n (dense baseline)   | CV^2 of importance and load   | Shazeer et al. 2017, section 2.1        |
| `"batchwise"`     | `BatchwiseRouter`    | k on average             | CV^2, plus a threshold loss   | Shazeer et al. 2017, appendix F         |
| (an instance)     | `HierarchicalRouter` | k_primary * k_secondary  | CV^2 of Importance_H, Load_H  | Shazeer et al. 2017, appendix B         |
| `"switch"`        | `SwitchRouter`       | 1                        | alpha * E * sum f_i P_i       | Fedus et al. 2022, section 2.2          |
| `"top_k"`         | `TopKRouter`         | k (MoELayer's default)   | alpha * E * sum f_i P_i       | Lepikhin et al. 2020; Fedus et al. 2022 |
| `"expert_choice"` | `ExpertChoiceRouter` | k on average (its c)     | none: balanced by design      | Zhou et al. 2022, section 3             |
| `"loss_free"`     | `LossFreeRouter`     | k                        | none: per-expert biases       | Wang et al. 2024; DeepSeek-V3 2.1.2     |
| `"hash"`          | `HashRouter`         | 1                        | none: a fixed map of token id | Roller et al. 2021                      |

Every router with logits takes `z_loss_weight`, the router z-loss of
Zoph et al. 2022 (section 3.1). `get` turns a name, a serialized config or
an instance into a router. The routers register their names themselves
(`tf_moe.layers.router_registry.register_router`); this module is the
registry's public view.
"""

from tf_moe.layers import router_registry
from tf_moe.layers.batchwise_router import BatchwiseRouter
from tf_moe.layers.expert_choice_router import ExpertChoiceRouter
from tf_moe.layers.hash_router import HashRouter
from tf_moe.layers.hierarchical_router import HierarchicalRouter
from tf_moe.layers.legacy import from_gate_arguments
from tf_moe.layers.loss_free_router import LossFreeRouter
from tf_moe.layers.noisy_top_k_router import NoisyTopKRouter
from tf_moe.layers.router import Router, Routing
from tf_moe.layers.softmax_router import SoftmaxRouter
from tf_moe.layers.switch_router import SwitchRouter
from tf_moe.layers.top_k_gate_router import TopKGateRouter
from tf_moe.layers.top_k_router import TopKRouter

# Every name `get` knows, sorted.
NAMES = router_registry.router_names()
# Routers that send every token to one expert: k must be None or 1.
ONE_EXPERT = router_registry.router_names(router_registry.K_ONE)


# A router from a name, a serialized config or an instance.
get = router_registry.get_router


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
    "TopKGateRouter",
    "TopKRouter",
    "from_gate_arguments",
    "get",
]
