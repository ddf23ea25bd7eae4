"""SoftmaxGate and MoE(gate="softmax"): the dense baseline of section 1."""

import numpy as np
import pytest

import tf_moe
from tests import numpy_reference as ref
from tests.layer_test_case import run_layer_test


def _softmax(logits):
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_gates_are_the_softmax_over_all_experts():
    gate = tf_moe.SoftmaxGate(5)
    gate.build((None, 4))
    rng = np.random.default_rng(0)
    gate.w_gate.assign(rng.standard_normal((4, 5)).astype("float32"))
    x = rng.standard_normal((12, 4)).astype("float32")
    mask = np.arange(12) % 3 != 0
    routing = gate(x, mask=mask)
    expected = _softmax(x @ gate.w_gate.numpy()) * mask[:, None]
    np.testing.assert_array_equal(routing["expert_index"], np.tile(np.arange(5), (12, 1)))
    np.testing.assert_allclose(routing["expert_weight"], expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(routing["importance"], expected.sum(axis=0), rtol=1e-5)
    np.testing.assert_array_equal(routing["load"], np.full(5, mask.sum()))


def test_moe_citizenship():
    run_layer_test(
        tf_moe.MoE,
        dict(num_experts=3, k=1, hidden_units=8, output_units=6, gate="softmax"),
        input_shape=(3, 5, 10),
        expected_output_shape=(3, 5, 6),
    )


@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_moe_equals_every_expert_weighted_by_softmax(capacity_factor):
    """`k` plays no part: every token reaches every expert, and a capacity
    factor of 1 already holds all of them (capacity = tokens)."""
    layer = tf_moe.MoE(4, 2, 7, gate="softmax", capacity_factor=capacity_factor)
    layer.build((None, 6))
    rng = np.random.default_rng(1)
    for variable in layer.weights:
        variable.assign(rng.standard_normal(variable.shape).astype("float32") * 0.5)
    x = rng.standard_normal((15, 6)).astype("float32")
    e = layer.experts
    expected = ref.dense_moe(
        x, _softmax(x @ layer.gate.w_gate.numpy()), e.kernel_in.numpy(), e.bias_in.numpy()[:, 0],
        e.kernel_out.numpy(), e.bias_out.numpy()[:, 0],
    )
    np.testing.assert_allclose(layer(x, training=True).numpy(), expected, rtol=1e-5, atol=1e-5)
    assert float(layer.balance.result()[f"{layer.name}_dropped_fraction"]) == 0.0


def test_unknown_gate_is_rejected():
    with pytest.raises(ValueError, match="gate"):
        tf_moe.MoE(4, 2, 7, gate="top_k")


def test_config_round_trip():
    gate = tf_moe.SoftmaxGate(6, name="g")
    assert tf_moe.SoftmaxGate.from_config(gate.get_config()).get_config() == gate.get_config()
