"""TopKGateRouter, MoELayer's default: the paper's top-k softmax gate without noise, learning faster.

Against the numpy transcription of Shazeer et al. (2017), Eq. 3-5 with the
noise term left out, and its gradient by central finite differences.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_moe
from tests import numpy_reference as ref

T, D, N, K = 11, 6, 5, 2


def _router(multiplier=10.0, seed=0, normalize=True):
    router = tf_moe.TopKGateRouter(N, K, learning_rate_multiplier=multiplier, normalize_inputs=normalize)
    router.build((None, D))
    router.w_gate.assign(np.random.default_rng(seed).standard_normal((D, N)).astype("float32") * 0.1)
    return router


def _reference_gates(x, w_stored, multiplier, normalize=True):
    return ref.top_k_gate(x, multiplier * w_stored, K, normalize)[1]


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("normalize", [True, False])
def test_routing_equals_the_papers_gate_without_noise(training, normalize):
    router = _router(normalize=normalize)
    x = np.random.default_rng(1).standard_normal((T, D)).astype("float32") * 3.0
    mask = np.ones(T, bool)
    mask[[2, 7]] = False
    poisoned = np.where(mask[:, None], x, np.nan).astype("float32")
    routing = router(poisoned, mask=mask, training=training)
    want = _reference_gates(x, router.w_gate.numpy(), 10.0, normalize) * mask[:, None]
    got = ref.routing_gates(routing, T, N)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(routing.importance, want.sum(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(routing.load, (want > 0).sum(0))
    assert routing.metrics == {} and routing.losses == {} and not np.isnan(got).any()


def test_gradient_equals_finite_differences_of_the_reference():
    router = _router(multiplier=3.0, seed=2)
    x = np.random.default_rng(3).standard_normal((T, D))
    weights = np.random.default_rng(4).standard_normal((T, N))

    def objective(w_stored):
        return float(np.sum(_reference_gates(x, w_stored, 3.0) * weights))

    with tf.GradientTape() as tape:
        routing = router(tf.constant(x, tf.float32))
        gates = tf.scatter_nd(tf.stack([routing.token_id, routing.expert_id], 1), routing.weight, (T, N + 1))[:, :N]
        value = tf.reduce_sum(gates * weights)
    got = tape.gradient(value, router.w_gate).numpy()
    w = router.w_gate.numpy().astype(np.float64)
    want = np.zeros_like(w)
    step = 1e-5
    for index in np.ndindex(*w.shape):
        plus, minus = w.copy(), w.copy()
        plus[index] += step
        minus[index] -= step
        want[index] = (objective(plus) - objective(minus)) / (2 * step)
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)


def test_input_gradient_through_the_normalisation_equals_finite_differences():
    router = _router(multiplier=3.0, seed=5)
    x = np.random.default_rng(6).standard_normal((T, D)) * 2.0
    weights = np.random.default_rng(7).standard_normal((T, N))
    w_stored = router.w_gate.numpy().astype(np.float64)

    def objective(inputs):
        return float(np.sum(_reference_gates(inputs, w_stored, 3.0) * weights))

    x_tf = tf.constant(x, tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(x_tf)
        routing = router(x_tf)
        gates = tf.scatter_nd(tf.stack([routing.token_id, routing.expert_id], 1), routing.weight, (T, N + 1))[:, :N]
        value = tf.reduce_sum(gates * weights)
    got = tape.gradient(value, x_tf).numpy()
    want = np.zeros_like(x)
    for index in np.ndindex(*x.shape):
        plus, minus = x.copy(), x.copy()
        plus[index] += 1e-5
        minus[index] -= 1e-5
        want[index] = (objective(plus) - objective(minus)) / 2e-5
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)
    # Scaling a token does not change its routing.
    np.testing.assert_allclose(ref.routing_gates(router(x_tf * 7.0), T, N), ref.routing_gates(router(x_tf), T, N), rtol=1e-5)


def test_the_multiplier_keeps_the_function_and_speeds_up_adam():
    x = np.random.default_rng(5).standard_normal((T, D)).astype("float32")
    fast, slow = _router(multiplier=10.0), _router(multiplier=1.0)
    slow.w_gate.assign(fast.w_gate.numpy() * 10.0)
    np.testing.assert_allclose(ref.routing_gates(fast(x), T, N), ref.routing_gates(slow(x), T, N), rtol=1e-5)
    moves = []
    for router in (fast, slow):
        before = router.w_gate.numpy() * router.learning_rate_multiplier
        optimizer = keras.optimizers.Adam(1e-2)
        with tf.GradientTape() as tape:
            routing = router(x)
            loss = tf.reduce_sum(routing.weight * tf.cast(routing.expert_id, tf.float32))
        optimizer.apply_gradients([(tape.gradient(loss, router.w_gate), router.w_gate)])
        moves.append(np.abs(router.w_gate.numpy() * router.learning_rate_multiplier - before).max())
    np.testing.assert_allclose(moves[0], 10 * moves[1], rtol=1e-3)


@pytest.mark.parametrize("multiplier", [1.0, 3.0])
def test_starts_near_zero_with_every_expert_routed(multiplier):
    keras.utils.set_random_seed(0)
    units, experts = 256, 16
    router = tf_moe.TopKGateRouter(experts, K, learning_rate_multiplier=multiplier)
    tokens = np.random.default_rng(1).standard_normal((2048, units)).astype("float32") * 7.0
    load = router(tokens).load.numpy()
    logits = ref.rms_normalize(tokens) @ (multiplier * router.w_gate.numpy())
    assert 0.009 < logits.std() < 0.011
    # From a zero gate every token would take experts 0 and 1 (ties).
    assert load.min() > 0.25 * load.mean()
    paper_start = tf_moe.TopKGateRouter(experts, K, gate_initializer="zeros")
    np.testing.assert_array_equal(paper_start(tokens).load.numpy()[:K], len(tokens))


def test_defaults_and_the_layer_with_it():
    router = tf_moe.routers.get("top_k_gate", N, K)
    assert type(router) is tf_moe.TopKGateRouter and router.learning_rate_multiplier == 1.0
    assert router.normalize_inputs
    layer = tf_moe.MoELayer(N, K, 8, router="top_k_gate")
    layer.build((None, D))
    assert layer.ops_per_token() == D * N + K * (D * 8 + 8 * D)  # the gate and k experts
    assert layer.importance_weight == layer.load_weight == 0.1  # the paper's losses, which it uses


def test_gate_initializer_survives_the_config_and_a_bad_one_is_named():
    router = tf_moe.TopKGateRouter(N, K, gate_initializer=keras.initializers.RandomNormal(stddev=0.5, seed=3))
    router.build((None, D))
    assert np.std(router.w_gate.numpy()) > 0.1
    clone = tf_moe.TopKGateRouter.from_config(router.get_config())
    clone.build((None, D))
    np.testing.assert_array_equal(clone.w_gate.numpy(), router.w_gate.numpy())
    with pytest.raises(ValueError, match="`gate_initializer`"):
        tf_moe.TopKGateRouter(N, K, gate_initializer="not_an_initializer")


def test_bad_normalize_inputs_is_named():
    with pytest.raises(ValueError, match="`normalize_inputs`"):
        tf_moe.TopKGateRouter(N, K, normalize_inputs="yes")


@pytest.mark.parametrize("multiplier", [0, -1.0, float("inf"), "10"])
def test_bad_multiplier_is_named(multiplier):
    with pytest.raises(ValueError, match="`learning_rate_multiplier`"):
        tf_moe.TopKGateRouter(N, K, learning_rate_multiplier=multiplier)


def test_layer_output_equals_the_dense_reference():
    layer = tf_moe.MoELayer(N, K, 7, router="top_k_gate")
    x = np.random.default_rng(6).standard_normal((2, 4, D)).astype("float32")
    layer(x)
    rng = np.random.default_rng(7)
    for variable in layer.weights:
        variable.assign(rng.standard_normal(variable.shape).astype("float32") * 0.3)
    flat = x.reshape(-1, D)
    gates = _reference_gates(flat, layer.router.w_gate.numpy(), layer.router.learning_rate_multiplier)
    e = layer.experts
    want = ref.dense_moe(flat, gates, e.kernel_in.numpy(), e.bias_in.numpy()[:, 0], e.kernel_out.numpy(),
                         e.bias_out.numpy()[:, 0])
    for training in (False, True):
        np.testing.assert_allclose(layer(x, training=training).numpy().reshape(-1, D), want, rtol=1e-4, atol=1e-5)
