"""SoftmaxRouter and MoELayer(router="softmax"): the dense baseline of section 2.1."""

import numpy as np
import pytest

import tf_moe
from tests import numpy_reference as ref
from tests.layer_test_case import randomise_weights


def test_gates_are_the_softmax_over_all_experts():
    router = tf_moe.SoftmaxRouter(5)
    router.build((None, 4))
    rng = np.random.default_rng(0)
    router.w_gate.assign(rng.standard_normal((4, 5)).astype("float32"))
    x = rng.standard_normal((12, 4)).astype("float32")
    mask = np.arange(12) % 3 != 0
    x[~mask] = np.nan  # masked rows reach nothing
    routing = router(x, mask=mask)
    expected = np.zeros((12, 5))
    expected[mask] = ref.softmax(x[mask] @ router.w_gate.numpy())
    assert router.k == 5 and routing.token_id.shape == (60,)
    np.testing.assert_allclose(ref.routing_gates(routing, 12, 5), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(routing.importance, expected.sum(axis=0), rtol=1e-5)
    np.testing.assert_array_equal(routing.load, np.full(5, mask.sum()))
    assert routing.metrics == {} and routing.losses == {}


@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_moe_equals_every_expert_weighted_by_softmax(capacity_factor):
    """Every token reaches every expert, and a capacity factor of 1 already
    holds all of them (capacity = tokens)."""
    layer = tf_moe.MoELayer(4, None, 7, router="softmax", capacity_factor=capacity_factor)
    layer.build((None, 6))
    randomise_weights(layer, seed=1)
    x = np.random.default_rng(1).standard_normal((15, 6)).astype("float32")
    e = layer.experts
    expected = ref.dense_moe(
        x, ref.softmax(x @ layer.router.w_gate.numpy()), e.kernel_in.numpy(), e.bias_in.numpy()[:, 0],
        e.kernel_out.numpy(), e.bias_out.numpy()[:, 0],
    )
    np.testing.assert_allclose(layer(x, training=True).numpy(), expected, rtol=1e-5, atol=1e-5)
    assert float(layer.balance.result()[f"{layer.name}_dropped_fraction"]) == 0.0


def test_ops_per_token_and_config_round_trip():
    router = tf_moe.SoftmaxRouter(6, name="g")
    assert router.ops_per_token(10) == 60
    assert tf_moe.SoftmaxRouter.from_config(router.get_config()).get_config() == router.get_config()
