"""`MoE`, tf_moe 0.1's spelling of MoELayer: same layer, 0.1 arguments and config."""

import numpy as np
import pytest

import tf_moe
from tests.layer_test_case import randomise_weights, run_layer_test


def test_layer_citizenship_with_the_0_1_arguments():
    run_layer_test(
        tf_moe.MoE,
        dict(num_experts=4, k=2, hidden_units=8, output_units=6, noise_epsilon=0.02, seed=3),
        input_shape=(3, 5, 10),
        expected_output_shape=(3, 5, 6),
    )


@pytest.mark.parametrize(
    "gate_arguments, router",
    [
        (dict(gate="noisy_top_k", noisy_gating=False, noise_epsilon=0.5, seed=4),
         tf_moe.NoisyTopKRouter(4, 2, noisy=False, noise_epsilon=0.5, seed=4)),
        (dict(gate="softmax"), tf_moe.SoftmaxRouter(4)),
        (dict(gate="batchwise"), tf_moe.BatchwiseRouter(4, 2)),
    ],
)
def test_gate_arguments_make_the_router_they_name(gate_arguments, router):
    legacy = tf_moe.MoE(4, 2, 8, **gate_arguments)
    assert isinstance(legacy, tf_moe.MoELayer)
    assert type(legacy.router) is type(router)
    expected = {k: v for k, v in router.get_config().items() if k not in ("name", "trainable", "dtype")}
    assert {k: legacy.router.get_config()[k] for k in expected} == expected
    config = legacy.get_config()
    assert "router" not in config and config["gate"] == gate_arguments["gate"] and config["k"] == 2
    # The same layer as MoELayer with that router.
    x = np.random.default_rng(0).standard_normal((12, 5)).astype("float32")
    layer = tf_moe.MoELayer(hidden_units=8, router=router)
    legacy(x)
    layer(x)
    randomise_weights(legacy)
    layer.set_weights(legacy.get_weights())
    np.testing.assert_array_equal(np.asarray(legacy(x)), np.asarray(layer(x)))


def test_unknown_gate_is_rejected():
    with pytest.raises(ValueError, match="`gate`"):
        tf_moe.MoE(4, 2, 7, gate="top_k")
