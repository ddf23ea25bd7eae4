"""The hierarchical Mixture-of-Experts layer (PAPER.md section 4, appendix B)."""

import keras

from tf_moe.layers.hierarchical_gate import HierarchicalGate, check_hierarchy
from tf_moe.layers.moe import MoE


@keras.saving.register_keras_serializable(package="tf_moe")
class HierarchicalMoE(MoE):
    """Two-level MoE: a primary gate picks groups, each group's gate its experts.

    `y_H = sum_i sum_j G_primary(x)_i G_i(x)_j E_{i,j}(x)` over `num_groups`
    groups of `experts_per_group` experts (appendix B; the paper's MoE-256-h
    is 16 x 16 with k = 2 at both levels). Both levels are noisy top-k gates,
    and a group's gate is evaluated only on the tokens sent to that group
    (see `HierarchicalGate`), so gating costs O(tokens * (a + k_primary * b)
    * d) instead of the O(tokens * a * b * d) of a flat gate over a * b
    experts. The a * b experts are one stacked `FeedForwardExperts` bank
    (expert `i * b + j` is E_{i,j}) on the same sparse dispatch path as
    `MoE`, and everything else is the `MoE`'s: flattening of leading axes,
    masks, capacity, mixed precision, the balancing loss
    `importance_weight * CV(Importance_H)^2 + load_weight * CV(Load_H)^2`
    added with `add_loss` while training, and the load-balance metrics in
    the `fit` logs under `<name>_cv_importance`, ... .

    Args:
        num_groups: int, number of groups a.
        experts_per_group: int, experts per group b.
        k_primary: int, groups per token, <= num_groups.
        k_secondary: int, experts per chosen group, <= experts_per_group.
        hidden_units: int, hidden width of each expert (keyword only).
        output_units: int or None, output width (None: the input width).
        activation: activation of the experts' hidden layer.
        noisy_gating: bool, add both gates' tunable noise while training.
        noise_epsilon: float >= 0 added to the noise scales.
        importance_weight: float >= 0, w_importance.
        load_weight: float >= 0, w_load.
        capacity_factor: None for dropless dispatch (dynamic shapes), or a
            float > 0 for static capacities: each expert takes
            `ceil(capacity_factor * k_primary * k_secondary * tokens / (a*b))`
            tokens and each group's gate
            `ceil(capacity_factor * k_primary * tokens / a)`; what is over
            capacity contributes zero and counts as dropped.
        use_bias, kernel_initializer, bias_initializer, kernel_regularizer,
            bias_regularizer: for the experts' weights.
        seed: optional int seed of the gating noise.
        **kwargs: base layer arguments (`name`, `dtype`, ...).

    Call arguments:
        inputs: [..., d] tensor of rank >= 2.
        training: bool, enables noise, the smooth loads and the losses.
        mask: optional bool tensor of shape `inputs.shape[:-1]`: masked
            tokens are not routed, their output is zero and they count in
            neither importance nor load.

    Returns:
        [..., output_units or d].

    Example:

    >>> layer = HierarchicalMoE(num_groups=4, experts_per_group=4, hidden_units=32)
    >>> layer(np.zeros((2, 5, 16), "float32")).shape
    TensorShape([2, 5, 16])
    """

    default_name = "hierarchical_moe"

    def __init__(
        self,
        num_groups,
        experts_per_group,
        k_primary=2,
        k_secondary=2,
        *,
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
        **kwargs,
    ):
        check_hierarchy(num_groups, experts_per_group, k_primary, k_secondary)
        # Read by `_make_gate`, which the MoE constructor calls.
        self.num_groups = num_groups
        self.experts_per_group = experts_per_group
        self.k_primary = k_primary
        self.k_secondary = k_secondary
        super().__init__(
            num_experts=num_groups * experts_per_group,
            k=k_primary * k_secondary,
            hidden_units=hidden_units,
            output_units=output_units,
            activation=activation,
            noisy_gating=noisy_gating,
            noise_epsilon=noise_epsilon,
            importance_weight=importance_weight,
            load_weight=load_weight,
            capacity_factor=capacity_factor,
            use_bias=use_bias,
            kernel_initializer=kernel_initializer,
            bias_initializer=bias_initializer,
            kernel_regularizer=kernel_regularizer,
            bias_regularizer=bias_regularizer,
            seed=seed,
            **kwargs,
        )

    def _make_gate(self):
        return HierarchicalGate(
            self.num_groups,
            self.experts_per_group,
            self.k_primary,
            self.k_secondary,
            noisy=self.noisy_gating,
            noise_epsilon=self.noise_epsilon,
            capacity_factor=self.capacity_factor,
            seed=self.seed,
            name="gate",
        )

    def get_config(self):
        config = super().get_config()
        for key in ("num_experts", "k", "gate"):
            del config[key]
        config.update(
            {
                "num_groups": self.num_groups,
                "experts_per_group": self.experts_per_group,
                "k_primary": self.k_primary,
                "k_secondary": self.k_secondary,
            }
        )
        return config
