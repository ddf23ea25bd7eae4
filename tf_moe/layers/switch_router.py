"""Switch routing: each token to its one best expert (Fedus, Zoph and Shazeer 2022, section 2.2)."""

import keras

from tf_moe.layers.router_registry import K_ONE, register_router
from tf_moe.layers.top_k_router import TopKRouter


@register_router("switch", k=K_ONE)
@keras.saving.register_keras_serializable(package="tf_moe")
class SwitchRouter(TopKRouter):
    """Switch routing: k = 1 with the `f · P` loss and input jitter (Fedus et al. 2022, section 2.2).

    `p = Softmax(x W_r)`; token x goes to expert `argmax_i p_i` with gate
    value `p_i` (not renormalised, so the router still gets a gradient
    through the gate). The balancing loss is `alpha * E * sum_i f_i P_i`,
    with `f_i` the fraction of tokens sent to expert i and `P_i` the mean
    probability of expert i (their eq. 4-6), returned in
    `Routing.losses["load_balancing"]` in place of the CV^2 losses of
    Shazeer et al. (`uses_balancing_loss` is False). While training the
    router's input is multiplied by `Uniform(1 - jitter_epsilon, 1 +
    jitter_epsilon)` noise (their appendix C). This is `TopKRouter(n, 1)`
    with the paper's defaults; see `TopKRouter` for the details.

    Args:
        num_experts: int, number of experts E.
        balance_weight: finite float >= 0, alpha (1e-2 in the paper).
        jitter_epsilon: finite float in [0, 1), the jitter's half width
            (0 for none).
        seed: optional int seed of the initial weights and the jitter.
        **kwargs: `z_loss_weight` (float >= 0, default 0: the router z-loss
            of `Router` on `x W_r`, with x jittered while training) and base
            layer arguments (`name`, ...). `dtype` defaults to float32.

    Call arguments:
        inputs: [tokens, d] float tensor.
        training: bool, adds the jitter.
        mask: optional [tokens] bool; masked tokens are not routed.

    Returns:
        A `Routing` of one assignment per token.

    Example:

    >>> router = SwitchRouter(num_experts=8, seed=0)
    >>> routing = router(keras.random.normal((16, 32)), training=True)
    >>> routing.expert_id.shape
    TensorShape([16])
    """

    def __init__(self, num_experts, balance_weight=1e-2, jitter_epsilon=1e-2, seed=None, **kwargs):
        super().__init__(
            num_experts, 1, normalize=False, balance_weight=balance_weight,
            jitter_epsilon=jitter_epsilon, seed=seed, **kwargs,
        )

    def get_config(self):
        config = super().get_config()
        del config["normalize"]  # fixed (`k` is too: the base leaves it out)
        return config
