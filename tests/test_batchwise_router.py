"""BatchwiseRouter (appendix F) against a numpy transcription of its masks."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_moe
from tests import numpy_reference as ref
from tests.layer_test_case import randomise_weights
from tf_moe.layers.batchwise_router import tokens_per_expert


def _randomised_gate(n=6, k=2, d=5, seed=0, **kwargs):
    gate = tf_moe.BatchwiseRouter(n, k, **kwargs)
    gate.build((None, d))
    rng = np.random.default_rng(seed)
    gate.w_gate.assign(rng.standard_normal((d, n)).astype("float32"))
    return gate


def test_tokens_per_expert():
    assert tokens_per_expert(2, 24, 6) == 8
    assert tokens_per_expert(1, 10, 4) == 2
    with pytest.raises(ValueError, match="num_experts"):
        tokens_per_expert(1, 7, 8)


@pytest.mark.parametrize("masked", [False, True])
def test_training_gives_every_expert_exactly_m_tokens(masked):
    gate = _randomised_gate()
    x = np.random.default_rng(1).standard_normal((24, 5)).astype("float32")
    valid = np.arange(24) % 5 != 0 if masked else np.ones(24, bool)
    if masked:
        x[~valid] = np.nan  # masked rows reach nothing
    routing = gate(x, training=True, mask=valid if masked else None)
    m = 2 * 24 // 6
    token, expert = np.asarray(routing.token_id), np.asarray(routing.expert_id)
    assert token.shape == (6 * m,)
    np.testing.assert_array_equal(np.bincount(expert, minlength=7)[:6], np.full(6, m))
    assert valid[token].all()
    np.testing.assert_array_equal(routing.load, np.full(6, m))
    mask, gates = ref.batchwise_gates(ref.softmax(np.where(valid[:, None], x, 0) @ gate.w_gate.numpy()), m, valid)
    np.testing.assert_array_equal(ref.routing_gates(routing, 24, 6) > 0, mask > 0)
    np.testing.assert_allclose(ref.routing_gates(routing, 24, 6), gates, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(routing.importance, gates.sum(axis=0), rtol=1e-5)
    assert np.isfinite(float(routing.losses["batchwise_threshold"]))


def test_threshold_loss_follows_the_formula_and_trains_only_thresholds():
    gate = _randomised_gate()
    gate.thresholds.assign(np.linspace(0.05, 0.3, 6).astype("float32"))
    x = np.random.default_rng(2).standard_normal((30, 5)).astype("float32")
    with tf.GradientTape() as tape:
        loss = gate(x, training=True).losses["batchwise_threshold"]
    grad_t, grad_w = tape.gradient(loss, [gate.thresholds, gate.w_gate])
    sigma = ref.softmax(x @ gate.w_gate.numpy())
    thresholds = gate.thresholds.numpy()
    batch_mask, _ = ref.batchwise_gates(sigma, 2 * 30 // 6, np.ones(30, bool))
    threshold_mask = (sigma > thresholds).astype(float)
    expected = ((threshold_mask - batch_mask) * (sigma - thresholds)).sum() / 30
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5, atol=1e-7)
    assert float(loss) > 0
    np.testing.assert_allclose(grad_t, -(threshold_mask - batch_mask).sum(axis=0) / 30, atol=1e-6)
    assert grad_w is None or not np.any(np.asarray(grad_w))


@pytest.mark.parametrize("threshold", [0.01, 0.5])
def test_inference_uses_thresholds_within_a_candidate_set(threshold):
    """Low thresholds: more experts pass than the bound of 3 allows; high
    ones: some tokens pass none. Both against the numpy threshold mask."""
    gate = _randomised_gate(max_experts_per_token=3)
    thresholds = threshold * np.linspace(0.8, 1.2, 6).astype("float32")
    gate.thresholds.assign(thresholds)
    x = np.random.default_rng(3).standard_normal((40, 5)).astype("float32")
    routing = gate(x, training=False)
    assert routing.token_id.shape == (40 * 3,)
    assert float(routing.losses["batchwise_threshold"]) == 0.0
    sigma = ref.softmax(x @ gate.w_gate.numpy())
    keep, expected = ref.threshold_gates(sigma, thresholds, 3, np.ones(40, bool))
    np.testing.assert_allclose(ref.routing_gates(routing, 40, 6), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(routing.load, keep.sum(axis=0))
    if threshold < 0.1:
        assert (sigma > thresholds).sum(axis=1).max() > 3
    else:
        assert keep.sum(axis=1).min() == 0


def test_moe_training_output_and_unrouted_metric():
    layer = tf_moe.MoELayer(4, 1, 7, router="batchwise", importance_weight=0.0, load_weight=0.0)
    layer.build((None, 6))
    randomise_weights(layer, seed=4)
    x = np.random.default_rng(4).standard_normal((20, 6)).astype("float32")
    _, gates = ref.batchwise_gates(ref.softmax(x @ layer.router.w_gate.numpy()), 5, np.ones(20, bool))
    e = layer.experts
    expected = ref.dense_moe(
        x, gates, e.kernel_in.numpy(), e.bias_in.numpy()[:, 0], e.kernel_out.numpy(),
        e.bias_out.numpy()[:, 0],
    )
    out = layer(x, training=True).numpy()
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    unrouted = gates.sum(axis=1) == 0
    assert unrouted.any()
    assert np.all(out[unrouted] == 0)
    result = layer.balance.result()
    np.testing.assert_allclose(float(result[f"{layer.name}_unrouted_fraction"]), unrouted.mean())
    assert float(result[f"{layer.name}_dropped_fraction"]) == 0.0


def test_moe_rejects_batches_too_small_for_one_token_per_expert():
    layer = tf_moe.MoELayer(8, 1, 4, router="batchwise")
    with pytest.raises(ValueError, match="k \\* tokens // num_experts"):
        layer(np.zeros((1, 4, 3), "float32"), training=True)


def test_thresholds_learn_to_reproduce_batchwise_routing():
    """After a short fit, the inference threshold mask agrees with the
    batchwise mask of a held-out batch on >= 90% of (token, expert) pairs;
    with untrained thresholds (every candidate kept) it does not."""
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    n, d = 8, 8
    w = rng.standard_normal((d, 4))
    x = rng.standard_normal((2048, d)).astype("float32")
    inputs = keras.Input((d,))
    moe = tf_moe.MoELayer(n, 2, 16, router="batchwise")
    model = keras.Model(inputs, keras.layers.Dense(4)(moe(inputs)))
    model.compile(keras.optimizers.Adam(1e-2), "mse")
    model.fit(x, np.tanh(x @ w), batch_size=64, epochs=4, verbose=0)

    held_out = rng.standard_normal((512, d)).astype("float32")
    batchwise = ref.routing_gates(moe.router(held_out, training=True), 512, n) > 0
    thresholded = ref.routing_gates(moe.router(held_out), 512, n) > 0
    assert (batchwise == thresholded).mean() >= 0.9
    moe.router.thresholds.assign(np.zeros(n, "float32"))
    untrained = ref.routing_gates(moe.router(held_out), 512, n) > 0
    assert (batchwise == untrained).mean() < 0.85


def test_xla_training_keeps_exactly_m_per_expert():
    """Under XLA: every expert takes exactly m tokens of each batch, nothing is
    dropped, and the fit equals the one without XLA."""
    x = np.random.default_rng(5).standard_normal((64, 8)).astype("float32")

    def fit(jit):
        keras.utils.set_random_seed(0)
        inputs = keras.Input((8,), batch_size=16)
        moe = tf_moe.MoELayer(4, 2, 8, router="batchwise", capacity_factor=1.0, name="bw")
        model = keras.Model(inputs, keras.layers.Dense(2)(moe(inputs)))
        randomise_weights(moe, seed=1)
        model.compile(keras.optimizers.SGD(0.05), "mse", jit_compile=jit)
        return model.fit(x, x[:, :2], batch_size=16, epochs=2, shuffle=False, verbose=0).history

    logs, plain = fit(True), fit(False)
    assert logs["bw_dropped_fraction"] == [0.0, 0.0]
    np.testing.assert_allclose(logs["bw_max_over_mean_load"], 1.0, rtol=1e-6)
    np.testing.assert_allclose(logs["bw_cv_load"], 0.0, atol=1e-6)
    for key in ("loss", "bw_cv_importance", "bw_aux_loss"):
        np.testing.assert_allclose(logs[key], plain[key], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs,arg",
    [
        (dict(num_experts=4, k=5), "k"),
        (dict(num_experts=4, k=2, max_experts_per_token=5), "max_experts_per_token"),
        (dict(num_experts=0, k=1), "num_experts"),
    ],
)
def test_bad_configurations(kwargs, arg):
    with pytest.raises(ValueError, match=arg):
        tf_moe.BatchwiseRouter(**kwargs)


def test_config_round_trip():
    gate = tf_moe.BatchwiseRouter(6, 2, max_experts_per_token=3)
    assert tf_moe.BatchwiseRouter.from_config(gate.get_config()).get_config() == gate.get_config()
