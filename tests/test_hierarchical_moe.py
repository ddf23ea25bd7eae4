"""MoELayer with the hierarchical router (and HierarchicalMoE) against a dense
computation of appendix B's y_H."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_moe
from tests import numpy_reference as ref
from tests.layer_test_case import randomise_weights, run_layer_test


def _randomised(a=3, b=4, kp=2, ks=2, d=6, h=7, seed=0, **kwargs):
    layer = tf_moe.HierarchicalMoE(a, b, kp, ks, hidden_units=h, seed=seed, **kwargs)
    layer.build((None, d))
    randomise_weights(layer, seed)
    return layer


def _product_gates(layer, x):
    """Noise-free appendix B gates G_primary(x)_i * G_i(x)_j, dense [T, a*b]."""
    gate = layer.router
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


def test_group_and_expert_capacity_drops_are_counted_exactly():
    """Groups gate their first ceil(0.5 * 2 * 30 / 3) = 10 (token, group) pairs
    in choice-major order, experts keep their first ceil(0.5 * 4 * 30 / 12) = 5
    assignments; the output and the dropped fraction follow both limits."""
    layer = _randomised(noisy_gating=False, capacity_factor=0.5)
    x = np.random.default_rng(5).standard_normal((30, 6)).astype("float32")
    y = layer(x).numpy()
    gates = _product_gates(layer, x)
    primary = layer.router.primary
    _, primary_gates, _ = ref.noisy_top_k(x, primary.w_gate.numpy(), primary.w_noise.numpy(), 0, 2, 0, False)
    ranked = np.argsort(-primary_gates, axis=1, kind="stable")[:, :2]
    used, pair_kept = np.zeros(3, int), np.zeros((30, 3), bool)
    for choice in range(2):
        for token in range(30):
            group = ranked[token, choice]
            pair_kept[token, group] = used[group] < 10
            used[group] += 1
    gates = gates * np.repeat(pair_kept, 4, axis=1)
    # Experts take assignments in (primary choice, secondary choice, token) order.
    order = []
    for p in range(2):
        for choice in range(2):
            for token in range(30):
                group = ranked[token, p]
                if pair_kept[token, group]:
                    block = gates[token, group * 4 : group * 4 + 4]
                    order.append((token, group * 4 + np.argsort(-block, kind="stable")[choice]))
    used, kept = np.zeros(12, int), np.zeros_like(gates)
    for token, expert in order:
        if used[expert] < 5:
            kept[token, expert] = gates[token, expert]
        used[expert] += 1
    np.testing.assert_allclose(y, _dense_output(layer, x, kept), rtol=1e-5, atol=1e-5)
    dropped = 4 * 30 - (kept > 0).sum()
    group_drops = (~pair_kept[np.arange(30)[:, None], ranked]).sum()
    assert group_drops > 0 and dropped > 2 * group_drops  # both limits bite
    result = layer.balance.result()
    assert float(result[f"{layer.name}_dropped_fraction"]) == pytest.approx(dropped / 120, rel=1e-6)


def test_k1_trains_with_finite_gradients():
    layer = _randomised(kp=1, ks=1)
    x = np.random.default_rng(6).standard_normal((32, 6)).astype("float32")
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(tf.square(layer(x, training=True))) + tf.add_n(layer.losses)
    grads = tape.gradient(loss, layer.trainable_weights)
    assert all(g is not None and np.all(np.isfinite(g)) for g in grads)


def test_fit_under_xla_equals_fit_without():
    x = np.random.default_rng(7).standard_normal((32, 8)).astype("float32")
    y = np.tanh(x[:, :4])

    def fit(jit):
        keras.utils.set_random_seed(0)
        inputs = keras.Input((8,), batch_size=16)
        moe = tf_moe.HierarchicalMoE(3, 3, hidden_units=8, capacity_factor=1.0, noisy_gating=False, name="hmoe")
        model = keras.Model(inputs, keras.layers.Dense(4)(moe(inputs)))
        randomise_weights(moe, seed=1)
        model.compile(keras.optimizers.SGD(0.05), "mse", jit_compile=jit)
        return model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0).history

    logs, plain = fit(True), fit(False)
    assert plain["hmoe_dropped_fraction"][0] > 0
    for key in ("loss", "hmoe_cv_importance", "hmoe_cv_load", "hmoe_dropped_fraction",
                "hmoe_unrouted_fraction", "hmoe_topk_agreement", "hmoe_noise_to_signal"):
        np.testing.assert_allclose(logs[key], plain[key], rtol=1e-4, atol=1e-6)


def test_name_config_and_router():
    layer = tf_moe.HierarchicalMoE(4, 2, 1, 2, hidden_units=5, capacity_factor=1.0, seed=3)
    assert layer.name.startswith("hierarchical_moe")
    assert isinstance(layer, tf_moe.MoELayer) and isinstance(layer.router, tf_moe.HierarchicalRouter)
    config = layer.get_config()
    assert "num_experts" not in config and "router" not in config and config["num_groups"] == 4
    assert tf_moe.HierarchicalMoE.from_config(config).get_config() == config


def test_is_moe_layer_with_the_hierarchical_router():
    x = np.random.default_rng(9).standard_normal((2, 5, 6)).astype("float32")
    layer = _randomised(seed=2)
    router = tf_moe.HierarchicalRouter(3, 4, 2, 2, seed=2)
    plain = tf_moe.MoELayer(hidden_units=7, router=router)
    plain(x)
    plain.set_weights(layer.get_weights())
    np.testing.assert_array_equal(np.asarray(plain(x)), np.asarray(layer(x)))


@pytest.mark.parametrize("arg", ["gate", "router", "num_experts", "k"])
def test_router_arguments_are_rejected_not_ignored(arg):
    with pytest.raises(ValueError, match=f"`{arg}`"):
        tf_moe.HierarchicalMoE(2, 2, hidden_units=4, **{arg: "softmax" if arg in ("gate", "router") else 4})


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


@pytest.mark.parametrize("router", ["noisy_top_k", "softmax"])
def test_flat_k1_matches_dense(router):
    """Flat k=1: each token gets exactly its best expert with weight 1."""
    layer = tf_moe.MoELayer(5, 1 if router == "noisy_top_k" else None, 7, router=router)
    layer.build((None, 6))
    randomise_weights(layer, seed=8)
    x = np.random.default_rng(8).standard_normal((20, 6)).astype("float32")
    logits = x @ layer.router.w_gate.numpy()
    if router == "softmax":
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
