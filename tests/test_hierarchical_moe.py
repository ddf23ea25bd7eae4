"""HierarchicalMoE against a dense computation of appendix B's y_H."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_moe
from tests import numpy_reference as ref
from tests.layer_test_case import run_layer_test


def _randomised(a=3, b=4, kp=2, ks=2, d=6, h=7, seed=0, **kwargs):
    layer = tf_moe.HierarchicalMoE(a, b, kp, ks, hidden_units=h, **kwargs)
    layer.build((None, d))
    rng = np.random.default_rng(seed)
    for variable in layer.weights:
        variable.assign(rng.standard_normal(variable.shape).astype("float32") * 0.5)
    return layer


def _product_gates(layer, x):
    """Noise-free appendix B gates G_primary(x)_i * G_i(x)_j, dense [T, a*b]."""
    gate = layer.gate
    a, b = gate.num_groups, gate.experts_per_group
    _, primary, _ = ref.noisy_top_k(
        x, gate.primary.w_gate.numpy(), gate.primary.w_noise.numpy(), 0, gate.k_primary, 0, False
    )
    gates = np.zeros((len(x), a * b))
    for i in range(a):
        _, secondary, _ = ref.noisy_top_k(
            x, gate.w_gate.numpy()[i], gate.w_noise.numpy()[i], 0, gate.k_secondary, 0, False
        )
        gates[:, i * b : (i + 1) * b] = primary[:, i : i + 1] * secondary
    return gates


def _dense_output(layer, x, gates):
    e = layer.experts
    return ref.dense_moe(
        x, gates, e.kernel_in.numpy(), e.bias_in.numpy()[:, 0], e.kernel_out.numpy(),
        e.bias_out.numpy()[:, 0],
    )


def test_layer_citizenship():
    run_layer_test(
        tf_moe.HierarchicalMoE,
        dict(num_groups=3, experts_per_group=2, hidden_units=8, output_units=6),
        input_shape=(3, 5, 10),
        expected_output_shape=(3, 5, 6),
    )


def test_layer_citizenship_static_capacity_k1():
    run_layer_test(
        tf_moe.HierarchicalMoE,
        dict(num_groups=2, experts_per_group=3, k_primary=1, k_secondary=1, hidden_units=8,
             capacity_factor=2.0),
        input_shape=(2, 4, 5),
        expected_output_shape=(2, 4, 5),
    )


@pytest.mark.parametrize("kp,ks", [(2, 2), (1, 1), (1, 3)])
def test_matches_dense_y_h(kp, ks):
    layer = _randomised(kp=kp, ks=ks)
    x = np.random.default_rng(3).standard_normal((2, 9, 6)).astype("float32")
    flat = x.reshape(-1, 6)
    expected = _dense_output(layer, flat, _product_gates(layer, flat))
    np.testing.assert_allclose(layer(x).numpy().reshape(-1, 6), expected, rtol=1e-5, atol=1e-5)


def test_aux_loss_and_metrics_follow_appendix_b():
    """Without noise the loads are hard counts: Load_H_ij = Load_p_i * Load_i_j
    / |X^(i)| = tokens sent to expert (i, j)."""
    layer = _randomised(noisy_gating=False, importance_weight=0.3, load_weight=0.2)
    x = np.random.default_rng(4).standard_normal((40, 6)).astype("float32")
    layer(x, training=True)
    gates = _product_gates(layer, x)
    importance, load = gates.sum(axis=0), (gates > 0).sum(axis=0)
    expected = 0.3 * ref.cv_squared(importance) + 0.2 * ref.cv_squared(load)
    np.testing.assert_allclose(float(layer.losses[0]), expected, rtol=1e-4)
    result = {key: float(v) for key, v in layer.balance.result().items()}
    name = layer.name
    np.testing.assert_allclose(result[f"{name}_cv_load"], np.sqrt(ref.cv_squared(load)), rtol=1e-4)
    np.testing.assert_allclose(result[f"{name}_max_over_mean_load"], load.max() / load.mean(), rtol=1e-4)
    assert result[f"{name}_dropped_fraction"] == 0.0


def test_group_capacity_drops_are_counted():
    layer = _randomised(noisy_gating=False, capacity_factor=0.5)
    x = np.random.default_rng(5).standard_normal((30, 6)).astype("float32")
    layer(x)
    result = layer.balance.result()
    assert float(result[f"{layer.name}_dropped_fraction"]) > 0.0


def test_k1_trains_with_finite_gradients():
    layer = _randomised(kp=1, ks=1)
    x = np.random.default_rng(6).standard_normal((32, 6)).astype("float32")
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(tf.square(layer(x, training=True))) + tf.add_n(layer.losses)
    grads = tape.gradient(loss, layer.trainable_weights)
    assert all(g is not None and np.all(np.isfinite(g)) for g in grads)


def test_fit_logs_and_xla():
    x = np.random.default_rng(7).standard_normal((32, 8)).astype("float32")
    y = np.tanh(x[:, :4])
    inputs = keras.Input((8,), batch_size=16)
    moe = tf_moe.HierarchicalMoE(3, 3, hidden_units=8, capacity_factor=1.25, name="hmoe")
    model = keras.Model(inputs, keras.layers.Dense(4)(moe(inputs)))
    model.compile("adam", "mse", jit_compile=True)
    logs = model.fit(x, y, batch_size=16, epochs=1, verbose=0).history
    assert np.all(np.isfinite(logs["loss"]))
    for key in ("cv_importance", "cv_load", "dropped_fraction", "unrouted_fraction"):
        assert f"hmoe_{key}" in logs


def test_name_and_config():
    layer = tf_moe.HierarchicalMoE(4, 2, 1, 2, hidden_units=5, capacity_factor=1.0)
    assert layer.name.startswith("hierarchical_moe")
    config = layer.get_config()
    assert "num_experts" not in config and config["num_groups"] == 4
    assert tf_moe.HierarchicalMoE.from_config(config).get_config() == config


@pytest.mark.parametrize(
    "kwargs,arg",
    [
        (dict(num_groups=2, experts_per_group=4, k_primary=3), "k_primary"),
        (dict(num_groups=4, experts_per_group=2, k_secondary=3), "k_secondary"),
        (dict(num_groups=2, experts_per_group=0), "experts_per_group"),
    ],
)
def test_bad_configurations(kwargs, arg):
    with pytest.raises(ValueError, match=arg):
        tf_moe.HierarchicalMoE(hidden_units=4, **kwargs)


@pytest.mark.parametrize("gate", ["noisy_top_k", "softmax"])
def test_flat_k1_matches_dense(gate):
    """Flat k=1: each token gets exactly its best expert with weight 1."""
    layer = tf_moe.MoE(5, 1, 7, gate=gate)
    layer.build((None, 6))
    rng = np.random.default_rng(8)
    for variable in layer.weights:
        variable.assign(rng.standard_normal(variable.shape).astype("float32") * 0.5)
    x = rng.standard_normal((20, 6)).astype("float32")
    logits = x @ layer.gate.w_gate.numpy()
    if gate == "softmax":
        gates = np.exp(logits - logits.max(1, keepdims=True))
        gates /= gates.sum(1, keepdims=True)
    else:
        gates = np.eye(5)[logits.argmax(1)]
    e = layer.experts
    expected = ref.dense_moe(
        x, gates, e.kernel_in.numpy(), e.bias_in.numpy()[:, 0], e.kernel_out.numpy(),
        e.bias_out.numpy()[:, 0],
    )
    np.testing.assert_allclose(layer(x).numpy(), expected, rtol=1e-5, atol=1e-5)
