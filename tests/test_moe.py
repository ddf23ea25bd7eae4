"""Tests of the MoE layer against dense references."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_moe
from tests import numpy_reference as ref
from tests.layer_test_case import run_layer_test
from tf_moe.distribute import get_strategy


def _randomised_moe(d=6, n=5, k=2, h=7, seed=0, **kwargs):
    """An MoE with random (non-zero) gate and expert weights."""
    layer = tf_moe.MoE(num_experts=n, k=k, hidden_units=h, **kwargs)
    layer.build((None, d))
    rng = np.random.default_rng(seed)
    for variable in layer.weights:
        variable.assign(rng.standard_normal(variable.shape).astype("float32") * 0.5)
    return layer


def _expert_weights(layer):
    e = layer.experts
    return (
        e.kernel_in.numpy(),
        e.bias_in.numpy()[:, 0],
        e.kernel_out.numpy(),
        e.bias_out.numpy()[:, 0],
    )


def _capacity_kept_gates(gates, k, capacity):
    """Zeroes the gates that a capacity limit drops: choice-major priority."""
    t, n = gates.shape
    ranked = np.argsort(-gates, axis=1, kind="stable")[:, :k]
    used = np.zeros(n, int)
    kept = np.zeros_like(gates)
    for choice in range(k):
        for token in range(t):
            e = ranked[token, choice]
            if used[e] < capacity:
                kept[token, e] = gates[token, e]
                used[e] += 1
    return kept


@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_layer_citizenship(capacity_factor):
    run_layer_test(
        tf_moe.MoE,
        dict(num_experts=4, k=2, hidden_units=8, output_units=6, capacity_factor=capacity_factor),
        input_shape=(3, 5, 10),
        expected_output_shape=(3, 5, 6),
        # With capacity, a masked token changes T and hence capacity; the
        # dropless layer must not leak masked tokens into others.
        supports_masking=capacity_factor is None,
    )


def test_dropless_output_equals_dense_reference():
    layer = _randomised_moe()
    x = np.random.default_rng(1).standard_normal((4, 8, 6)).astype("float32")
    y = layer(x, training=False).numpy()
    flat = x.reshape(-1, 6)
    _, gates, _ = ref.noisy_top_k(flat, layer.gate.w_gate.numpy(), layer.gate.w_noise.numpy(), 0, 2, 1e-2, train=False)
    want = ref.dense_moe(flat, gates, *_expert_weights(layer)).reshape(4, 8, 6)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("capacity_factor", [0.5, 1.0, 1.5])
def test_capacity_output_equals_dense_reference_with_drops(capacity_factor):
    layer = _randomised_moe(capacity_factor=capacity_factor)
    x = np.random.default_rng(2).standard_normal((40, 6)).astype("float32")
    y = layer(x, training=False).numpy()
    _, gates, _ = ref.noisy_top_k(x, layer.gate.w_gate.numpy(), layer.gate.w_noise.numpy(), 0, 2, 1e-2, train=False)
    capacity = math.ceil(capacity_factor * 2 * 40 / 5)
    kept = _capacity_kept_gates(gates, 2, capacity)
    np.testing.assert_allclose(y, ref.dense_moe(x, kept, *_expert_weights(layer)), rtol=1e-5, atol=1e-5)
    dropped = (gates > 0).sum() - (kept > 0).sum()
    result = layer.balance.result()
    np.testing.assert_allclose(result[f"{layer.name}_dropped_fraction"], dropped / 80, rtol=1e-6)
    if capacity_factor == 0.5:
        assert dropped > 0


def test_masked_tokens_are_not_routed_and_give_zeros():
    layer = _randomised_moe()
    x = np.random.default_rng(3).standard_normal((2, 6, 6)).astype("float32")
    mask = np.array([[1, 1, 1, 0, 0, 0], [1, 0, 1, 0, 1, 1]], bool)
    y = layer(x, mask=mask, training=False).numpy()
    np.testing.assert_array_equal(y[~mask], 0.0)
    np.testing.assert_allclose(y[mask], layer(x[mask], training=False).numpy(), rtol=1e-5, atol=1e-6)
    # Importance and load count only the real tokens.
    layer.balance.reset_state()
    embedding_mask = keras.layers.Masking(mask_value=0.0)
    x_padded = np.where(mask[..., None], x, 0.0).astype("float32")
    layer(x_padded, mask=embedding_mask.compute_mask(x_padded), training=False)
    masked_result = {k.split("_", 1)[1]: float(v) for k, v in layer.balance.result().items()}
    layer.balance.reset_state()
    layer(x[mask], training=False)
    plain_result = {k.split("_", 1)[1]: float(v) for k, v in layer.balance.result().items()}
    assert masked_result == pytest.approx(plain_result)


def test_keras_mask_flows_through_functional_model():
    inputs = keras.Input((None,), dtype="int32")
    h = keras.layers.Embedding(20, 8, mask_zero=True)(inputs)
    h = tf_moe.MoE(4, 2, 16)(h)
    outputs = keras.layers.LSTM(5)(h)
    model = keras.Model(inputs, outputs)
    ids = np.array([[3, 4, 5, 0, 0], [6, 7, 8, 9, 1]])
    padded_more = np.concatenate([ids, np.zeros((2, 3), int)], axis=1)
    np.testing.assert_allclose(model(ids), model(padded_more), rtol=1e-5, atol=1e-6)


def test_loss_is_the_papers_balancing_loss():
    layer = _randomised_moe(importance_weight=0.3, load_weight=0.7)
    x = np.random.default_rng(4).standard_normal((32, 6)).astype("float32")
    layer(x, training=False)
    assert layer.losses == []  # no loss at inference
    layer(x, training=True)
    (loss,) = layer.losses
    result = layer.balance.result()
    cv_imp = float(result[f"{layer.name}_cv_importance"])
    cv_load = float(result[f"{layer.name}_cv_load"])
    assert cv_imp > 0 and cv_load > 0
    # The loss of the training call (averaged with the eval call in the metric).
    layer.balance.reset_state()
    layer(x, training=True)
    result = layer.balance.result()
    np.testing.assert_allclose(
        layer.losses[0],
        0.3 * float(result[f"{layer.name}_cv_importance"]) ** 2 + 0.7 * float(result[f"{layer.name}_cv_load"]) ** 2,
        rtol=1e-4,
    )


def test_gradients_reach_gate_noise_and_used_experts():
    layer = tf_moe.MoE(num_experts=4, k=2, hidden_units=8)
    x = tf.random.stateless_normal((64, 6), seed=[0, 1])
    with tf.GradientTape() as tape:
        y = layer(x, training=True)
        loss = tf.reduce_sum(tf.square(y - 1.0)) + tf.add_n(layer.losses)
    grads = dict(zip([v.path for v in layer.trainable_weights], tape.gradient(loss, layer.trainable_weights)))
    for path, grad in grads.items():
        assert grad is not None, path
        assert np.all(np.isfinite(grad)), path
        assert np.any(grad != 0), path
    used = np.unique(layer.gate(x, training=False)["expert_index"])
    kernel_grad = grads[layer.experts.kernel_in.path].numpy()
    for e in used:
        assert np.any(kernel_grad[e] != 0)


def test_balancing_losses_balance_the_load():
    """A few hundred steps: CV(load) ends far lower with the losses than without."""

    def train(weight):
        keras.utils.set_random_seed(0)
        inputs = keras.Input((16,))
        moe = tf_moe.MoE(8, 2, 16, importance_weight=weight, load_weight=weight, seed=0)
        model = keras.Model(inputs, keras.layers.Dense(1)(moe(inputs)))
        model.compile(keras.optimizers.Adam(1e-2), "mse")
        rng = np.random.default_rng(0)
        # A shared offset in the inputs lets an unbalanced gate collapse fast.
        x = rng.standard_normal((4096, 16)).astype("float32") + 1.0
        y = np.sin(x[:, :1] * 2) + x[:, 1:2]
        model.fit(x, y, batch_size=128, epochs=10, verbose=0)  # 320 steps
        moe.balance.reset_state()
        model.evaluate(x[:1024], y[:1024], batch_size=1024, verbose=0)
        return float(moe.balance.result()[f"{moe.name}_cv_load"])

    balanced, unbalanced = train(0.1), train(0.0)
    assert balanced < 0.4
    assert unbalanced > 3 * balanced


def test_invalid_arguments_get_clear_errors():
    with pytest.raises(ValueError, match="`k`"):
        tf_moe.MoE(num_experts=4, k=0, hidden_units=8)
    with pytest.raises(ValueError, match="`k`"):
        tf_moe.MoE(num_experts=4, k=5, hidden_units=8)
    with pytest.raises(ValueError, match="`num_experts`"):
        tf_moe.MoE(num_experts=0, k=1, hidden_units=8)
    with pytest.raises(ValueError, match="`capacity_factor`"):
        tf_moe.MoE(num_experts=4, k=1, hidden_units=8, capacity_factor=0.0)
    with pytest.raises(ValueError, match="`capacity_factor`"):
        tf_moe.MoE(num_experts=4, k=1, hidden_units=8, capacity_factor=-1.0)
    with pytest.raises(ValueError, match="`importance_weight`"):
        tf_moe.MoE(num_experts=4, k=1, hidden_units=8, importance_weight=-0.1)
    with pytest.raises(ValueError, match="rank >= 2"):
        tf_moe.MoE(num_experts=4, k=1, hidden_units=8)(np.zeros(5, "float32"))
    layer = tf_moe.MoE(num_experts=4, k=1, hidden_units=8)
    layer(np.zeros((2, 5), "float32"))
    with pytest.raises(ValueError, match="axis -1"):
        layer(np.zeros((2, 6), "float32"))


@pytest.mark.parametrize("capacity_factor", [None, 1.25])
def test_empty_batch_and_single_token(capacity_factor):
    layer = tf_moe.MoE(num_experts=4, k=2, hidden_units=8, output_units=3, capacity_factor=capacity_factor)
    for training in (False, True):
        empty = layer(np.zeros((0, 5), "float32"), training=training)
        assert empty.shape == (0, 3)
        one = layer(np.ones((1, 5), "float32"), training=training)
        assert one.shape == (1, 3) and np.all(np.isfinite(one))
        assert all(np.isfinite(float(loss)) for loss in layer.losses)


def test_no_nan_with_zero_noise_scale():
    layer = tf_moe.MoE(num_experts=4, k=2, hidden_units=8, noise_epsilon=0.0)
    layer.build((None, 5))
    layer.gate.w_noise.assign(np.full((5, 4), -1e4, "float32"))  # softplus -> 0
    x = np.random.default_rng(5).standard_normal((16, 5)).astype("float32")
    for training in (False, True):
        assert np.all(np.isfinite(layer(x, training=training)))
        assert np.all(np.isfinite(list(layer.balance.result().values())))


def test_capacity_path_trains_under_xla():
    def model_fn(jit):
        keras.utils.set_random_seed(1)
        inputs = keras.Input((6, 8), batch_size=16)
        outputs = tf_moe.MoE(4, 2, 16, capacity_factor=1.25, seed=3)(inputs)
        model = keras.Model(inputs, outputs)
        model.compile("adam", "mse", jit_compile=jit)
        return model

    x = np.random.default_rng(6).standard_normal((64, 6, 8)).astype("float32")
    xla, plain = model_fn(True), model_fn(False)
    plain.set_weights(xla.get_weights())
    np.testing.assert_allclose(xla.predict(x, batch_size=16, verbose=0), plain.predict(x, batch_size=16, verbose=0), rtol=1e-4, atol=1e-5)
    history = xla.fit(x, x, batch_size=16, epochs=2, verbose=0).history
    assert np.all(np.isfinite(history["loss"]))
    assert "moe_cv_load" in history or any(key.endswith("_cv_load") for key in history)


def test_mirrored_strategy_matches_one_device():
    """2 logical CPUs with a global batch of 32 = one device with 32."""
    devices = [d.name for d in tf.config.list_logical_devices("CPU")[:2]]
    x = np.random.default_rng(7).standard_normal((96, 8)).astype("float32")
    y = np.tanh(x[:, :4])

    def train(strategy):
        with strategy.scope():
            keras.utils.set_random_seed(2)
            inputs = keras.Input((8,))
            outputs = keras.layers.Dense(4)(tf_moe.MoE(4, 2, 16, noisy_gating=False, name="moe")(inputs))
            model = keras.Model(inputs, outputs)
            model.compile(keras.optimizers.SGD(0.1), "mse")
            # Random gate weights, so the routing and its gradients matter.
            rng = np.random.default_rng(3)
            model.set_weights([rng.standard_normal(w.shape).astype("float32") * 0.5 for w in model.get_weights()])
        history = model.fit(x, y, batch_size=32, epochs=3, shuffle=False, verbose=0).history
        return history, model.get_weights()

    single, single_weights = train(tf.distribute.OneDeviceStrategy(devices[0]))
    mirrored, mirrored_weights = train(get_strategy("mirrored", devices=devices))
    np.testing.assert_allclose(mirrored["loss"], single["loss"], rtol=1e-4)
    np.testing.assert_allclose(mirrored["moe_aux_loss"], single["moe_aux_loss"], rtol=1e-3, atol=1e-6)
    for a, b in zip(mirrored_weights, single_weights):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_graph_size_does_not_grow_with_num_experts():
    def num_ops(n):
        layer = tf_moe.MoE(num_experts=n, k=2, hidden_units=8)
        layer.build((None, 6))
        fn = tf.function(lambda x: layer(x, training=True))
        graph = fn.get_concrete_function(tf.TensorSpec([None, 6])).graph
        return len(graph.get_operations())

    assert num_ops(4) == num_ops(64)


def test_mixed_precision_keeps_gate_and_loss_in_float32():
    layer = tf_moe.MoE(num_experts=4, k=2, hidden_units=8, dtype="mixed_float16")
    x = np.random.default_rng(8).standard_normal((16, 6)).astype("float32")
    y = layer(x, training=True)
    assert y.dtype == "float16"
    assert layer.gate.compute_dtype == "float32"
    assert layer.losses[0].dtype == "float32"
    assert layer.gate(x, training=True)["expert_weight"].dtype == "float32"


def test_sequential_and_fit_logs_report_load_balance():
    model = keras.Sequential([keras.Input((4, 6)), tf_moe.MoE(4, 2, 8, name="experts_layer"), keras.layers.Dense(1)])
    model.compile("adam", "mse")
    x = np.random.default_rng(9).standard_normal((32, 4, 6)).astype("float32")
    history = model.fit(x, x[..., :1], epochs=1, verbose=0).history
    for key in ("cv_importance", "cv_load", "max_over_mean_load", "dropped_fraction", "aux_loss"):
        assert f"experts_layer_{key}" in history
    logs = model.evaluate(x, x[..., :1], verbose=0, return_dict=True)
    assert logs["experts_layer_dropped_fraction"] == 0.0


@pytest.mark.parametrize("gate", ["noisy_top_k", "softmax", "batchwise"])
@pytest.mark.parametrize("capacity_factor", [None, 1.5])
def test_all_masked_or_empty_batch_gives_zeros(gate, capacity_factor):
    # Every expert is empty: combine must still find its zero padding row.
    layer = _randomised_moe(d=4, n=4, k=2, gate=gate, capacity_factor=capacity_factor)
    x = np.ones((2, 3, 4), "float32")
    for training in (False, True):
        y = layer(x, mask=np.zeros((2, 3), bool), training=training)
        np.testing.assert_array_equal(np.asarray(y), np.zeros((2, 3, 4), "float32"))
    assert layer(np.ones((0, 3, 4), "float32")).shape == (0, 3, 4)


def test_hierarchical_all_masked_batch_gives_zeros():
    layer = tf_moe.HierarchicalMoE(2, 2, hidden_units=8)
    y = layer(np.ones((2, 3, 4), "float32"), mask=np.zeros((2, 3), bool), training=True)
    np.testing.assert_array_equal(np.asarray(y), np.zeros((2, 3, 4), "float32"))
