"""`HierarchicalMoE`: `MoELayer` with the hierarchical router (Shazeer et al. 2017, appendix B)."""

import keras

from tf_moe.layers.hierarchical_router import HierarchicalRouter
from tf_moe.layers.moe_layer import MoELayer


@keras.saving.register_keras_serializable(package="tf_moe")
class HierarchicalMoE(MoELayer):
    """Two-level MoE: a primary gate picks groups, each group's gate its experts.

    A convenience for `MoELayer(router=HierarchicalRouter(...))`:
    `y_H = sum_i sum_j G_primary(x)_i G_i(x)_j E_{i,j}(x)` over `num_groups`
    groups of `experts_per_group` experts (appendix B; the paper's MoE-256-h
    is 16 x 16 with k = 2 at both levels), with the balancing loss on
    `Importance_H` and `Load_H`. See `HierarchicalRouter` for the gating and
    `MoELayer` for everything else (dispatch, masks, capacity, metrics).

    Args:
        num_groups: int, number of groups a.
        experts_per_group: int, experts per group b.
        k_primary: int, groups per token, <= num_groups.
        k_secondary: int, experts per chosen group, <= experts_per_group.
        noisy_gating: bool, add both gates' tunable noise while training.
        noise_epsilon: finite float >= 0 added to the noise scales.
        seed: optional int seed of the gating noise.
        **kwargs: `MoELayer`'s arguments (`hidden_units`, which is required,
            `output_units`, `importance_weight`, ...) and the base layer's.
            `capacity_factor` sizes the groups' gates too: each group's gate
            takes `ceil(capacity_factor * k_primary * tokens / a)` tokens and
            each expert `ceil(capacity_factor * k_primary * k_secondary *
            tokens / (a*b))`; what is over capacity contributes zero and
            counts as dropped. A `router`, `gate`, `num_experts` or `k` is an
            error: the router is always the hierarchical one (use `MoELayer`
            for others).

    Example:

    >>> layer = HierarchicalMoE(num_groups=4, experts_per_group=4, hidden_units=32)
    >>> layer(np.zeros((2, 5, 16), "float32")).shape
    TensorShape([2, 5, 16])
    """

    default_name = "hierarchical_moe"

    def __init__(
        self, num_groups, experts_per_group, k_primary=2, k_secondary=2, *, noisy_gating=True,
        noise_epsilon=1e-2, seed=None, **kwargs,
    ):
        for arg in ("router", "gate", "num_experts", "k"):
            if arg in kwargs:
                raise ValueError(
                    f"HierarchicalMoE always routes with HierarchicalRouter and takes no `{arg}`; "
                    "use `MoELayer(router=...)` for another router."
                )
        router = HierarchicalRouter(
            num_groups, experts_per_group, k_primary, k_secondary, noisy=noisy_gating,
            noise_epsilon=noise_epsilon, capacity_factor=kwargs.get("capacity_factor"), seed=seed,
        )
        super().__init__(router=router, **kwargs)
        self.noisy_gating = router.noisy
        self.noise_epsilon = router.noise_epsilon
        self.seed = seed

    @property
    def num_groups(self):
        return self.router.num_groups

    @property
    def experts_per_group(self):
        return self.router.experts_per_group

    @property
    def k_primary(self):
        return self.router.k_primary

    @property
    def k_secondary(self):
        return self.router.k_secondary

    def get_config(self):
        config = super().get_config()
        for key in ("num_experts", "k", "router"):
            del config[key]
        config.update(
            {
                "num_groups": self.num_groups,
                "experts_per_group": self.experts_per_group,
                "k_primary": self.k_primary,
                "k_secondary": self.k_secondary,
                "noisy_gating": self.noisy_gating,
                "noise_epsilon": self.noise_epsilon,
                "seed": self.seed,
            }
        )
        return config
