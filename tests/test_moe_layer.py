"""Tests of MoELayer against dense numpy references, with every router."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_moe
from tests import numpy_reference as ref
from tests.layer_test_case import randomise_weights, run_layer_test
from tf_moe.distribute import get_strategy
from tf_moe.ops import dispatch as dispatch_ops

EPS = 1e-2


def _randomised(d=6, n=5, k=2, h=7, seed=0, router=None, **kwargs):
    """An MoELayer with random (non-zero) router and expert weights; seeded noise."""
    router = router or tf_moe.NoisyTopKRouter(n, k, seed=seed)
    layer = tf_moe.MoELayer(hidden_units=h, router=router, **kwargs)
    layer.build((None, d))
    randomise_weights(layer, seed)
    return layer


def _routers(n=4, k=2, seed=0):
    """One router of each kind with n experts (the hierarchical one: 2 groups)."""
    return {
        "noisy_top_k": tf_moe.NoisyTopKRouter(n, k, seed=seed),
        "softmax": tf_moe.SoftmaxRouter(n),
        "batchwise": tf_moe.BatchwiseRouter(n, k),
        "hierarchical": tf_moe.HierarchicalRouter(2, n // 2, 1, 2, seed=seed),
        "switch": tf_moe.SwitchRouter(n, seed=seed, z_loss_weight=1e-3),
        "top_k": tf_moe.TopKRouter(n, k, normalize=True, jitter_epsilon=0.1, seed=seed, z_loss_weight=1e-3),
        "expert_choice": tf_moe.ExpertChoiceRouter(n, capacity_factor=k, z_loss_weight=1e-3),
        "loss_free": tf_moe.LossFreeRouter(n, k, balance_weight=1e-2, z_loss_weight=1e-3),
        "hash": tf_moe.HashRouter(n, seed=seed),
    }


ROUTER_KINDS = (
    "noisy_top_k", "softmax", "batchwise", "hierarchical", "switch", "top_k", "expert_choice", "loss_free", "hash",
)


def _router_inputs(kind, leading_shape, seed=0):
    """The per-token inputs a router kind needs: token ids for the hash router."""
    if kind != "hash":
        return {}
    return {"token_ids": np.random.default_rng(seed).integers(0, 1000, leading_shape)}


def _expert_weights(layer):
    e = layer.experts
    return (
        e.kernel_in.numpy(),
        e.bias_in.numpy()[:, 0],
        e.kernel_out.numpy(),
        e.bias_out.numpy()[:, 0],
    )


def _router_weights(layer):
    return layer.router.w_gate.numpy(), layer.router.w_noise.numpy()


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
        tf_moe.MoELayer,
        dict(num_experts=4, k=2, hidden_units=8, output_units=6, capacity_factor=capacity_factor),
        input_shape=(3, 5, 10),
        expected_output_shape=(3, 5, 6),
        # With capacity, a masked token changes T and hence capacity; the
        # dropless layer must not leak masked tokens into others.
        supports_masking=capacity_factor is None,
    )


@pytest.mark.parametrize("kind", ["softmax", "hierarchical"])
def test_layer_citizenship_with_a_router_config(kind):
    # A serialized router, so that every layer the helper builds gets its own.
    router = keras.layers.serialize(_routers(n=4)[kind])
    run_layer_test(
        tf_moe.MoELayer,
        dict(hidden_units=8, router=router),
        input_shape=(3, 5, 10),
        expected_output_shape=(3, 5, 10),
    )


def test_dropless_output_equals_dense_reference():
    layer = _randomised()
    x = np.random.default_rng(1).standard_normal((4, 8, 6)).astype("float32")
    y = layer(x, training=False).numpy()
    flat = x.reshape(-1, 6)
    _, gates, _ = ref.noisy_top_k(flat, *_router_weights(layer), 0, 2, EPS, train=False)
    want = ref.dense_moe(flat, gates, *_expert_weights(layer)).reshape(4, 8, 6)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)


def test_training_output_and_loss_with_given_noise_equal_the_reference():
    """Noise passed through the layer reaches the router flattened per token."""
    layer = _randomised(importance_weight=0.3, load_weight=0.7)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((4, 8, 6)).astype("float32")
    noise = rng.standard_normal((4, 8, 5)).astype("float32")
    y = layer(x, training=True, noise=noise).numpy()
    flat, flat_noise = x.reshape(-1, 6), noise.reshape(-1, 5)
    w_gate, w_noise = _router_weights(layer)
    h, gates, stddev = ref.noisy_top_k(flat, w_gate, w_noise, flat_noise, 2, EPS)
    np.testing.assert_allclose(
        y.reshape(-1, 6), ref.dense_moe(flat, gates, *_expert_weights(layer)), rtol=1e-5, atol=1e-5
    )
    load = ref.smooth_load(flat, w_gate, h, stddev, 2)
    expected = 0.3 * ref.cv_squared(gates.sum(axis=0)) + 0.7 * ref.cv_squared(load)
    np.testing.assert_allclose(float(layer.losses[0]), expected, rtol=1e-4)


# Noise-free routers: the NaN and the clean run must route alike.
_NAN_POLICY_ROUTERS = {
    "noisy_top_k": lambda: tf_moe.NoisyTopKRouter(4, 2, noisy=False),
    "softmax": lambda: tf_moe.SoftmaxRouter(4),
    "top_k": lambda: tf_moe.TopKRouter(4, 2),
    "switch": lambda: tf_moe.SwitchRouter(4, jitter_epsilon=0.0),
    "loss_free": lambda: tf_moe.LossFreeRouter(4, 2),
    "hash": lambda: tf_moe.HashRouter(4),
    "hierarchical": lambda: tf_moe.HierarchicalRouter(2, 2, k_primary=1, noisy=False),
    "expert_choice": lambda: tf_moe.ExpertChoiceRouter(4),
    "batchwise": lambda: tf_moe.BatchwiseRouter(4, 2),
}


@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("name", sorted(_NAN_POLICY_ROUTERS))
def test_a_non_finite_unmasked_token_gets_nan_and_changes_no_other_token(name, training):
    """The documented policy: that token's output is NaN; the others are those of
    the clean batch, or, for routers that rank the batch, of the batch with that
    token masked. (NaN at inference, inf while training.)"""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 8, 4)).astype("float32")
    bad = x.copy()
    bad[0, 3, 1] = np.inf if training else np.nan
    others = np.ones((2, 8), bool)
    others[0, 3] = False
    kwargs = {"token_ids": rng.integers(0, 50, (2, 8))} if name == "hash" else {}

    def fresh():  # the same initial state for each run (routers update state while training)
        layer = tf_moe.MoELayer(hidden_units=8, router=_NAN_POLICY_ROUTERS[name]())
        layer.build((None, None, 4))
        randomise_weights(layer, seed=1)
        return layer

    got = fresh()(bad, training=training, **kwargs).numpy()
    ranks_the_batch = name == "expert_choice" or (name == "batchwise" and training)
    mask = others if ranks_the_batch else None
    want = fresh()(x, training=training, mask=mask, **kwargs).numpy()
    assert np.all(np.isnan(got[0, 3]))
    np.testing.assert_allclose(got[others], want[others], rtol=1e-6, atol=1e-6)


def test_router_inputs_must_be_per_token():
    layer = _randomised()
    x = np.zeros((4, 8, 6), "float32")
    for bad in (np.zeros((4, 7, 5), "float32"), np.zeros((32, 5), "float32"), np.zeros((4,), "float32")):
        with pytest.raises(ValueError, match="`noise` must have the shape of `inputs` without its last axis"):
            layer(x, training=True, noise=bad)
    # None is no input: the router draws its own noise.
    assert layer(x, training=True, noise=None).shape == (4, 8, 6)


def test_loss_is_the_papers_balancing_loss():
    """`w_imp CV(Importance)^2 + w_load CV(Load)^2` of the reference gates and
    smooth load (section 4, appendix A), and the metrics their square roots."""
    layer = _randomised(importance_weight=0.3, load_weight=0.7)
    rng = np.random.default_rng(4)
    x = rng.standard_normal((32, 6)).astype("float32")
    noise = rng.standard_normal((32, 5)).astype("float32")
    layer(x, training=False)
    assert layer.losses == []  # no loss at inference
    layer.balance.reset_state()
    layer(x, training=True, noise=noise)
    (loss,) = layer.losses
    w_gate, w_noise = _router_weights(layer)
    h, gates, stddev = ref.noisy_top_k(x, w_gate, w_noise, noise, 2, EPS)
    importance, load = gates.sum(axis=0), ref.smooth_load(x, w_gate, h, stddev, 2)
    expected = 0.3 * ref.cv_squared(importance) + 0.7 * ref.cv_squared(load)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-4)
    result = {key.removeprefix(f"{layer.name}_"): float(v) for key, v in layer.balance.result().items()}
    np.testing.assert_allclose(result["cv_importance"], math.sqrt(ref.cv_squared(importance)), rtol=1e-4)
    np.testing.assert_allclose(result["cv_load"], math.sqrt(ref.cv_squared(load)), rtol=1e-4)
    np.testing.assert_allclose(result["max_over_mean_load"], load.max() / load.mean(), rtol=1e-4)
    np.testing.assert_allclose(result["aux_loss"], expected, rtol=1e-4)


def test_router_losses_are_added_beside_the_balancing_loss():
    layer = _randomised(n=4, router=tf_moe.BatchwiseRouter(4, 2), importance_weight=0.2, load_weight=0.0)
    x = np.random.default_rng(5).standard_normal((16, 6)).astype("float32")
    layer(x, training=True)
    routing = layer.router(x, training=True)
    importance = np.asarray(routing.importance)
    expected = 0.2 * ref.cv_squared(importance) + float(routing.losses["batchwise_threshold"])
    assert float(routing.losses["batchwise_threshold"]) != 0.0
    np.testing.assert_allclose(float(layer.losses[0]), expected, rtol=1e-5)


@pytest.mark.parametrize("capacity_factor", [0.5, 1.0, 1.5])
def test_capacity_output_equals_dense_reference_with_drops(capacity_factor):
    layer = _randomised(capacity_factor=capacity_factor)
    x = np.random.default_rng(2).standard_normal((40, 6)).astype("float32")
    y = layer(x, training=False).numpy()
    _, gates, _ = ref.noisy_top_k(x, *_router_weights(layer), 0, 2, EPS, train=False)
    capacity = math.ceil(capacity_factor * 2 * 40 / 5)
    kept = _capacity_kept_gates(gates, 2, capacity)
    np.testing.assert_allclose(y, ref.dense_moe(x, kept, *_expert_weights(layer)), rtol=1e-5, atol=1e-5)
    dropped = (gates > 0).sum() - (kept > 0).sum()
    result = layer.balance.result()
    np.testing.assert_allclose(result[f"{layer.name}_dropped_fraction"], dropped / 80, rtol=1e-6)
    if capacity_factor == 0.5:
        assert dropped > 0


def test_drops_are_counted_exactly_on_the_xla_dynamic_batch_path():
    """Static capacity from a batch size only known when the graph runs, under XLA."""
    layer = _randomised(capacity_factor=0.5)
    step = tf.function(
        lambda t: layer(t, training=False),
        jit_compile=True,
        input_signature=[tf.TensorSpec([None, 6], tf.float32)],
    )
    for tokens in (40, 23):
        layer.balance.reset_state()
        x = np.random.default_rng(tokens).standard_normal((tokens, 6)).astype("float32")
        y = step(x).numpy()
        _, gates, _ = ref.noisy_top_k(x, *_router_weights(layer), 0, 2, EPS, train=False)
        kept = _capacity_kept_gates(gates, 2, math.ceil(0.5 * 2 * tokens / 5))
        np.testing.assert_allclose(y, ref.dense_moe(x, kept, *_expert_weights(layer)), rtol=1e-5, atol=1e-5)
        dropped = (gates > 0).sum() - (kept > 0).sum()
        assert dropped > 0
        assert float(layer.balance.result()[f"{layer.name}_dropped_fraction"]) == pytest.approx(
            dropped / (2 * tokens), rel=1e-6
        )


def test_masked_tokens_are_not_routed_and_give_zeros():
    layer = _randomised()
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


@pytest.mark.parametrize("kind", ROUTER_KINDS)
@pytest.mark.parametrize("fill", [np.nan, np.inf])
def test_non_finite_values_at_masked_positions_reach_nothing(kind, fill):
    """NaN or inf where the mask is False (as attention gives on padded rows)
    changes no output, loss, gradient or metric: all equal the run with zeros there."""
    rng = np.random.default_rng(6)
    x = rng.standard_normal((3, 8, 6)).astype("float32")
    mask = rng.random((3, 8)) > 0.3
    poisoned = x.copy()
    poisoned[~mask] = fill
    x[~mask] = 0.0

    def run(inputs):
        layer = _randomised(n=4, router=_routers(n=4, seed=1)[kind], capacity_factor=1.5, num_shared_experts=1)
        inputs = tf.constant(inputs)
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(inputs)
            y = layer(inputs, mask=mask, training=True, **_router_inputs(kind, mask.shape))
            loss = tf.add_n(layer.losses)
            objective = tf.reduce_sum(tf.square(y)) + loss
        grads = tape.gradient(objective, layer.trainable_weights + [inputs])
        metrics = [float(v) for v in layer.balance.result().values()]
        return [np.asarray(y), float(loss)] + [np.asarray(g) for g in grads] + [np.array(metrics)]

    clean, dirty = run(x), run(poisoned)
    for want, got in zip(clean, dirty):
        assert np.all(np.isfinite(got))
        np.testing.assert_array_equal(got, want)


def test_keras_mask_flows_through_functional_model():
    inputs = keras.Input((None,), dtype="int32")
    h = keras.layers.Embedding(20, 8, mask_zero=True)(inputs)
    h = tf_moe.MoELayer(4, 2, 16)(h)
    outputs = keras.layers.LSTM(5)(h)
    model = keras.Model(inputs, outputs)
    ids = np.array([[3, 4, 5, 0, 0], [6, 7, 8, 9, 1]])
    padded_more = np.concatenate([ids, np.zeros((2, 3), int)], axis=1)
    np.testing.assert_allclose(model(ids), model(padded_more), rtol=1e-5, atol=1e-6)


def test_gradients_reach_router_noise_and_used_experts():
    layer = tf_moe.MoELayer(hidden_units=8, router=tf_moe.NoisyTopKRouter(4, 2, seed=0))
    x = tf.random.stateless_normal((64, 6), seed=[0, 1])
    with tf.GradientTape() as tape:
        y = layer(x, training=True)
        loss = tf.reduce_sum(tf.square(y - 1.0)) + tf.add_n(layer.losses)
    grads = dict(zip([v.path for v in layer.trainable_weights], tape.gradient(loss, layer.trainable_weights)))
    for path, grad in grads.items():
        assert grad is not None, path
        assert np.all(np.isfinite(grad)), path
        assert np.any(grad != 0), path
    used = np.unique(layer.router(x, training=False).expert_id)
    kernel_grad = grads[layer.experts.kernel_in.path].numpy()
    for e in used:
        assert np.any(kernel_grad[e] != 0)


def test_balancing_losses_balance_the_load():
    """A few hundred steps: CV(load) ends far lower with the losses than without."""

    def train(weight):
        keras.utils.set_random_seed(0)
        inputs = keras.Input((16,))
        moe = tf_moe.MoELayer(
            hidden_units=16, router=tf_moe.NoisyTopKRouter(8, 2, seed=0),
            importance_weight=weight, load_weight=weight,
        )
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


@pytest.mark.parametrize(
    "kwargs,arg",
    [
        (dict(num_experts=4, k=0), "`k`"),
        (dict(num_experts=4, k=5), "`k`"),
        (dict(num_experts=0, k=1), "`num_experts`"),
        (dict(num_experts=4, k=1, capacity_factor=0.0), "`capacity_factor`"),
        (dict(num_experts=4, k=1, capacity_factor=-1.0), "`capacity_factor`"),
        (dict(num_experts=4, k=1, capacity_factor=float("inf")), "`capacity_factor`"),
        (dict(num_experts=4, k=1, capacity_factor=float("nan")), "`capacity_factor`"),
        (dict(num_experts=4, k=1, router="noisy_top_k", importance_weight=-0.1), "`importance_weight`"),
        (dict(num_experts=4, k=1, router="noisy_top_k", importance_weight=float("inf")), "`importance_weight`"),
        (dict(num_experts=4, k=1, router="noisy_top_k", load_weight=float("nan")), "`load_weight`"),
        (dict(num_experts=4, k=1, importance_weight=0.1), "`importance_weight`.*TopKRouter balances itself"),
        (dict(num_experts=4, k=1, router="switch", load_weight=0.0), "`load_weight`.*SwitchRouter"),
        (dict(num_experts=4, k=1, router="top_p"), "`router`"),
        (dict(num_experts=4, k=1, router="hierarchical"), "HierarchicalRouter"),
        (dict(num_experts=4, k=2, router="softmax"), "`k`"),
        (dict(num_experts=8, router=tf_moe.NoisyTopKRouter(4, 2)), "`num_experts`"),
        (dict(k=1, router=tf_moe.NoisyTopKRouter(4, 2)), "`k`"),
        (dict(router="noisy_top_k"), "`num_experts`"),
        (dict(num_experts=4.0, k=1), "`num_experts`"),
        (dict(num_experts=4, k=True), "`k`"),
        (dict(num_experts=4, k=1, output_units="8"), "`output_units`"),
        (dict(num_experts=4, k=1, num_shared_experts=np.int64(-1)), "`num_shared_experts`"),
        (dict(num_experts=4, k=1, use_bias="no"), "`use_bias`"),
        (dict(num_experts=4, k=1, activation="foo"), "`activation`"),
        (dict(num_experts=4, k=1, kernel_initializer="foo"), "`kernel_initializer`"),
        (dict(num_experts=4, k=1, bias_initializer="foo"), "`bias_initializer`"),
        (dict(num_experts=4, k=1, kernel_regularizer="foo"), "`kernel_regularizer`"),
        (dict(num_experts=4, k=1, bias_regularizer=3), "`bias_regularizer`"),
    ],
)
def test_invalid_arguments_get_clear_errors(kwargs, arg):
    with pytest.raises(ValueError, match=arg):
        tf_moe.MoELayer(**{"hidden_units": 8, **kwargs})


@pytest.mark.parametrize("router", ["noisy_top_k", "top_k_gate", "top_k", "switch"])
def test_balancing_weights_belong_to_the_routers_that_use_them(router):
    layer = tf_moe.MoELayer(4, 1, 8, router=router)
    expected = 0.1 if layer.router.uses_balancing_loss else None
    assert (layer.importance_weight, layer.load_weight) == (expected, expected)
    config = layer.get_config()
    assert tf_moe.MoELayer.from_config(config).importance_weight == expected
    # Files saved before the weights could be None hold 0.1 for every router, and still load.
    legacy = tf_moe.MoELayer.from_config({**config, "importance_weight": 0.1, "load_weight": 0.1})
    assert (legacy.importance_weight, legacy.load_weight) == (expected, expected)
    if not layer.router.uses_balancing_loss:
        with pytest.raises((TypeError, ValueError), match="`importance_weight`"):  # Keras wraps it
            tf_moe.MoELayer.from_config({**config, "importance_weight": 0.3})


def test_numpy_integers_are_taken_as_ints():
    layer = tf_moe.MoELayer(
        np.int64(4), np.int32(2), np.int64(8), output_units=np.int16(3), num_shared_experts=np.uint8(1)
    )
    config = layer.get_config()
    assert [type(config[key]) for key in ("num_experts", "k", "hidden_units", "output_units", "num_shared_experts")] == [int] * 5
    assert layer(np.zeros((2, 5), "float32")).shape == (2, 3)
    router = tf_moe.HierarchicalRouter(np.int64(2), np.int64(3), k_primary=np.int32(1))
    assert (router.num_experts, router.k) == (6, 2) and type(router.get_config()["num_groups"]) is int


def test_invalid_inputs_get_clear_errors():
    with pytest.raises(ValueError, match="`hidden_units`"):
        tf_moe.MoELayer(4, 2)
    with pytest.raises(ValueError, match="rank >= 2"):
        tf_moe.MoELayer(num_experts=4, k=1, hidden_units=8)(np.zeros(5, "float32"))
    layer = tf_moe.MoELayer(num_experts=4, k=1, hidden_units=8)
    layer(np.zeros((2, 5), "float32"))
    with pytest.raises(ValueError, match="axis -1"):
        layer(np.zeros((2, 6), "float32"))


def test_mask_shape_is_checked_statically_and_when_the_graph_runs():
    layer = tf_moe.MoELayer(num_experts=4, k=2, hidden_units=8)
    x = np.zeros((2, 3, 5), "float32")
    for bad in (np.ones((2, 4), bool), np.ones((3, 2), bool), np.ones((2, 3, 1), bool)):
        with pytest.raises(ValueError, match="`mask` must have the shape of `inputs`"):
            layer(x, mask=bad)
    step = tf.function(
        lambda t, m: layer(t, mask=m),
        input_signature=[tf.TensorSpec([None, None, 5]), tf.TensorSpec([None, None], tf.bool)],
    )
    assert step(x, np.ones((2, 3), bool)).shape == (2, 3, 5)
    with pytest.raises(tf.errors.InvalidArgumentError, match="`mask` must have the shape of `inputs`"):
        step(x, np.ones((2, 4), bool))


@pytest.mark.parametrize("capacity_factor", [1e-9, 0.0015])
def test_tiny_capacity_factors_keep_one_slot(capacity_factor):
    """ceil of any positive amount is >= 1: every expert keeps one token."""
    layer = _randomised(capacity_factor=capacity_factor)
    x = np.random.default_rng(7).standard_normal((20, 6)).astype("float32")
    y = layer(x, training=False).numpy()
    _, gates, _ = ref.noisy_top_k(x, *_router_weights(layer), 0, 2, EPS, train=False)
    kept = _capacity_kept_gates(gates, 2, 1)
    np.testing.assert_allclose(y, ref.dense_moe(x, kept, *_expert_weights(layer)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "layer, jittable",
    [
        # Dropless: XLA runs the static-capacity branches of `dropless_static`.
        (lambda: tf_moe.MoELayer(4, 2, 8), True),
        (lambda: tf_moe.MoELayer(4, 2, 8, capacity_factor=1.0), True),
        (lambda: tf_moe.MoE(4, 2, 8, gate="batchwise", capacity_factor=1.0), True),
        (lambda: tf_moe.HierarchicalMoE(2, 2, hidden_units=8), False),
        (lambda: tf_moe.HierarchicalMoE(2, 2, hidden_units=8, capacity_factor=1.0), True),
        # The MoE has a capacity, its router's group buffers do not.
        (lambda: tf_moe.MoELayer(hidden_units=8, router=tf_moe.HierarchicalRouter(2, 2), capacity_factor=1.0), False),
    ],
)
def test_supports_jit_only_with_static_shapes(layer, jittable):
    """Found by the property suite: layers whose buffers are sized by the
    routing kept Keras's default `supports_jit=True`, so
    `compile(jit_compile="auto")` on a GPU would compile them with XLA, which
    fails inside TensorFlow ("Input 0 to node Fill must be a compile-time
    constant"). The dropless MoELayer compiles through static branches."""
    layer = layer()
    assert layer.supports_jit is jittable
    layer.build((None, 4, 5))
    x = np.random.default_rng(12).standard_normal((3, 4, 5)).astype("float32")
    step = tf.function(lambda t: layer(t), jit_compile=True)
    if jittable:
        np.testing.assert_allclose(step(x), layer(x), rtol=1e-5, atol=1e-6)
    else:
        with pytest.raises(tf.errors.InvalidArgumentError, match="compile-time constant"):
            step(x)


@pytest.mark.parametrize("capacity_factor", [1.3785516579894752, 1 / 3, 1e300])
def test_any_capacity_factor_works_on_a_dynamic_batch(capacity_factor):
    """Found by the property suite: a factor with a long decimal raised a
    ValueError when traced with an unknown batch size (as `fit` does), and
    1e300 overflowed the capacity arithmetic."""
    layer = _randomised(capacity_factor=capacity_factor)
    step = tf.function(lambda t: layer(t, training=False), input_signature=[tf.TensorSpec([None, 6])])
    x = np.random.default_rng(13).standard_normal((7, 6)).astype("float32")
    _, gates, _ = ref.noisy_top_k(x, *_router_weights(layer), 0, 2, EPS, train=False)
    kept = _capacity_kept_gates(gates, 2, ref.capacity_slots(capacity_factor, 2 * 7, 5))
    want = ref.dense_moe(x, kept, *_expert_weights(layer))
    np.testing.assert_allclose(step(x), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(layer(x, training=False), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("capacity_factor", [None, 1.25])
def test_empty_batch_and_single_token(capacity_factor):
    layer = tf_moe.MoELayer(
        hidden_units=8, output_units=3, capacity_factor=capacity_factor,
        router=tf_moe.NoisyTopKRouter(4, 2, seed=0),
    )
    for training in (False, True):
        empty = layer(np.zeros((0, 5), "float32"), training=training)
        assert empty.shape == (0, 3)
        one = layer(np.ones((1, 5), "float32"), training=training)
        assert one.shape == (1, 3) and np.all(np.isfinite(one))
        assert all(np.isfinite(float(loss)) for loss in layer.losses)


def test_no_nan_with_zero_noise_scale():
    layer = tf_moe.MoELayer(hidden_units=8, router=tf_moe.NoisyTopKRouter(4, 2, noise_epsilon=0.0, seed=0))
    layer.build((None, 5))
    layer.router.w_noise.assign(np.full((5, 4), -1e4, "float32"))  # softplus -> 0
    x = np.random.default_rng(5).standard_normal((16, 5)).astype("float32")
    for training in (False, True):
        assert np.all(np.isfinite(layer(x, training=training)))
        assert np.all(np.isfinite(list(layer.balance.result().values())))


# Dropless under XLA is also tests/test_dispatch.py's dropless_static check.
@pytest.mark.parametrize("capacity_factor", [1.0, pytest.param(None, marks=pytest.mark.slow)])
def test_trains_under_xla_as_without(capacity_factor):
    """The same fit with and without XLA: equal losses, balance and weights.

    Dropless (None), XLA runs `dispatch.dropless_static`: static buffers and
    a backward pass that recomputes the experts.
    """

    def model_fn(jit):
        keras.utils.set_random_seed(1)
        inputs = keras.Input((6, 8), batch_size=16)
        # A random noise-free gate: the routing and its drops are deterministic.
        router = tf_moe.NoisyTopKRouter(4, 2, noisy=False)
        moe = tf_moe.MoELayer(hidden_units=16, capacity_factor=capacity_factor, router=router, name="moe")
        model = keras.Model(inputs, moe(inputs))
        router.w_gate.assign(np.random.default_rng(0).standard_normal((8, 4)).astype("float32"))
        model.compile(keras.optimizers.SGD(0.1), "mse", jit_compile=jit)
        return model

    x = np.random.default_rng(6).standard_normal((64, 6, 8)).astype("float32")
    xla, plain = model_fn(True), model_fn(False)
    np.testing.assert_array_equal(np.concatenate([w.ravel() for w in xla.get_weights()]),
                                  np.concatenate([w.ravel() for w in plain.get_weights()]))
    np.testing.assert_allclose(xla.predict(x, batch_size=16, verbose=0), plain.predict(x, batch_size=16, verbose=0), rtol=1e-4, atol=1e-5)
    got = xla.fit(x, x, batch_size=16, epochs=2, shuffle=False, verbose=0).history
    want = plain.fit(x, x, batch_size=16, epochs=2, shuffle=False, verbose=0).history
    assert (want["moe_dropped_fraction"][0] > 0) == (capacity_factor is not None)
    for key in ("loss", "moe_cv_load", "moe_cv_importance", "moe_dropped_fraction", "moe_aux_loss"):
        np.testing.assert_allclose(got[key], want[key], rtol=1e-4, atol=1e-6)
    for a, b in zip(xla.get_weights(), plain.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_mirrored_strategy_matches_one_device():
    """2 logical CPUs with a global batch of 32 = one device with 32."""
    devices = [d.name for d in tf.config.list_logical_devices("CPU")[:2]]
    x = np.random.default_rng(7).standard_normal((96, 8)).astype("float32")
    y = np.tanh(x[:, :4])

    def train(strategy):
        with strategy.scope():
            keras.utils.set_random_seed(2)
            inputs = keras.Input((8,))
            router = tf_moe.NoisyTopKRouter(4, 2, noisy=False)
            outputs = keras.layers.Dense(4)(tf_moe.MoELayer(hidden_units=16, router=router, name="moe")(inputs))
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
        layer = tf_moe.MoELayer(num_experts=n, k=2, hidden_units=8)
        layer.build((None, 6))
        fn = tf.function(lambda x: layer(x, training=True))
        graph = fn.get_concrete_function(tf.TensorSpec([None, 6])).graph
        return len(graph.get_operations())

    assert num_ops(4) == num_ops(64)


def test_mixed_precision_keeps_router_and_loss_in_float32():
    layer = tf_moe.MoELayer(hidden_units=8, router=tf_moe.NoisyTopKRouter(4, 2, seed=0), dtype="mixed_float16")
    x = np.random.default_rng(8).standard_normal((16, 6)).astype("float32")
    y = layer(x, training=True)
    assert y.dtype == "float16"
    assert layer.router.compute_dtype == "float32"
    assert layer.losses[0].dtype == "float32"
    assert layer.router(x, training=True).weight.dtype == "float32"


def test_sequential_and_fit_logs_report_load_balance_and_routing_diagnostics():
    moe = tf_moe.MoELayer(hidden_units=8, router=tf_moe.NoisyTopKRouter(4, 2, seed=0), name="experts_layer")
    model = keras.Sequential([keras.Input((4, 6)), moe, keras.layers.Dense(1)])
    model.compile("adam", "mse")
    x = np.random.default_rng(9).standard_normal((32, 4, 6)).astype("float32")
    history = model.fit(x, x[..., :1], epochs=1, verbose=0).history
    for key in (
        "cv_importance", "cv_load", "max_over_mean_load", "dropped_fraction", "unrouted_fraction",
        "aux_loss", "topk_agreement", "noise_to_signal",
    ):
        assert f"experts_layer_{key}" in history
    logs = model.evaluate(x, x[..., :1], verbose=0, return_dict=True)
    assert logs["experts_layer_dropped_fraction"] == 0.0
    assert logs["experts_layer_topk_agreement"] == 1.0  # no noise at inference


def test_validation_logs_report_the_noise_free_routing():
    """`val_<layer>_*` come from the inference routing at the final weights."""
    rng = np.random.default_rng(10)
    x, x_valid = rng.standard_normal((64, 6)).astype("float32"), rng.standard_normal((48, 6)).astype("float32")
    inputs = keras.Input((6,))
    moe = tf_moe.MoELayer(hidden_units=8, router=tf_moe.NoisyTopKRouter(5, 2, seed=1), name="moe")
    model = keras.Model(inputs, keras.layers.Dense(1)(moe(inputs)))
    model.compile(keras.optimizers.SGD(0.01), "mse")
    randomise_weights(moe, seed=2)
    history = model.fit(
        x, x[:, :1], batch_size=16, epochs=1, verbose=0,
        validation_data=(x_valid, x_valid[:, :1]), validation_batch_size=len(x_valid),
    ).history
    w_gate, w_noise = _router_weights(moe)
    _, gates, stddev = ref.noisy_top_k(x_valid, w_gate, w_noise, 0, 2, EPS, train=False)
    importance, load = gates.sum(axis=0), (gates > 0).sum(axis=0)
    val = {key.removeprefix("val_moe_"): value[-1] for key, value in history.items() if key.startswith("val_moe_")}
    np.testing.assert_allclose(val["cv_importance"], math.sqrt(ref.cv_squared(importance)), rtol=1e-4)
    np.testing.assert_allclose(val["cv_load"], math.sqrt(ref.cv_squared(load)), rtol=1e-4)
    np.testing.assert_allclose(val["max_over_mean_load"], load.max() / load.mean(), rtol=1e-4)
    assert val["topk_agreement"] == 1.0
    np.testing.assert_allclose(
        val["noise_to_signal"],
        ref.noise_to_signal(stddev, x_valid @ w_gate, np.ones(len(x_valid), bool)),
        rtol=1e-4,
    )
    # While training the noisy routing differs from the noise-free one.
    assert history["moe_topk_agreement"][-1] < 1.0


@pytest.mark.parametrize("kind", ROUTER_KINDS)
@pytest.mark.parametrize("capacity_factor", [None, 1.5])
def test_all_masked_or_empty_batch_gives_zeros(kind, capacity_factor):
    # Every expert is empty: combine must still find its zero padding row.
    layer = _randomised(d=4, n=4, router=_routers(n=4)[kind], capacity_factor=capacity_factor, num_shared_experts=1)
    x = np.ones((2, 3, 4), "float32")
    for training in (False, True):
        y = layer(x, mask=np.zeros((2, 3), bool), training=training, **_router_inputs(kind, (2, 3)))
        np.testing.assert_array_equal(np.asarray(y), np.zeros((2, 3, 4), "float32"))
        assert all(np.isfinite(float(loss)) for loss in layer.losses)
    assert layer(np.ones((0, 3, 4), "float32"), **_router_inputs(kind, (0, 3))).shape == (0, 3, 4)


def test_router_by_name_instance_or_config_is_the_same_layer():
    x = np.random.default_rng(11).standard_normal((10, 6)).astype("float32")
    by_name = tf_moe.MoELayer(5, 2, 7, router="noisy_top_k")
    by_name(x)
    randomise_weights(by_name, seed=3)
    by_instance = tf_moe.MoELayer(hidden_units=7, router=tf_moe.NoisyTopKRouter(5, 2))
    by_config = tf_moe.MoELayer(hidden_units=7, router=keras.layers.serialize(tf_moe.NoisyTopKRouter(5, 2)))
    for layer in (by_instance, by_config):
        layer(x)
        layer.set_weights(by_name.get_weights())
        assert (layer.num_experts, layer.k) == (5, 2)
        np.testing.assert_array_equal(np.asarray(layer(x)), np.asarray(by_name(x)))
    assert tf_moe.MoELayer(4, None, 7, router="softmax").k == 4


def _shared_weights(layer):
    s = layer.shared_experts
    return s.kernel_in.numpy(), s.bias_in.numpy()[:, 0], s.kernel_out.numpy(), s.bias_out.numpy()[:, 0]


def test_shared_experts_run_on_every_unmasked_token():
    """DeepSeekMoE: y = sum_j S_j(x) + sum_i G(x)_i E_i(x), a dense numpy computation."""
    layer = _randomised(num_shared_experts=2)
    x = np.random.default_rng(12).standard_normal((3, 8, 6)).astype("float32")
    mask = np.random.default_rng(13).random((3, 8)) > 0.3
    poisoned = np.where(mask[..., None], x, np.nan).astype("float32")
    y = layer(poisoned, mask=mask, training=False).numpy()
    flat = x[mask]
    _, gates, _ = ref.noisy_top_k(flat, *_router_weights(layer), 0, 2, EPS, train=False)
    w_in, b_in, w_out, b_out = _shared_weights(layer)
    shared = sum(ref.expert(flat, w_in[j], b_in[j], w_out[j], b_out[j]) for j in range(2))
    expected = ref.dense_moe(flat, gates, *_expert_weights(layer)) + shared
    np.testing.assert_allclose(y[mask], expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(y[~mask], 0.0)
    assert layer.shared_experts.num_experts == 2
    # Ops: the gate, k routed experts and the 2 shared ones, each d*h + h*o.
    assert layer.ops_per_token() == 6 * 5 + (2 + 2) * (6 * 7 + 7 * 6)
    assert tf_moe.MoELayer(5, 2, 7).get_config()["num_shared_experts"] == 0


@pytest.mark.parametrize("num_shared", [1, 2, 3])
def test_shared_experts_gradients_against_the_chain_rule(num_shared):
    """Every shared expert sees every token: their input gradients add up, each weight gets its own."""
    layer = _randomised(num_shared_experts=num_shared)
    routed = tf_moe.MoELayer(hidden_units=7, router=tf_moe.NoisyTopKRouter(5, 2, seed=0))
    routed.build((None, 6))
    routed.router.set_weights(layer.router.get_weights())
    routed.experts.set_weights(layer.experts.get_weights())
    rng = np.random.default_rng(14)
    x = tf.constant(rng.standard_normal((9, 6)).astype("float32"))
    d_out = rng.standard_normal((9, 6)).astype("float32")

    def gradients(moe, variables):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(moe(x, training=False) * d_out)
        return tape.gradient(loss, [x] + variables)

    d_x, *d_shared = gradients(layer, list(layer.shared_experts.trainable_variables))
    (d_x_routed,) = gradients(routed, [])
    w_in, b_in, w_out, b_out = _shared_weights(layer)
    reference = [ref.expert_gradients(x.numpy(), w_in[j], b_in[j], w_out[j], b_out[j], d_out, ref.relu,
                                      lambda pre: (pre > 0).astype("float32")) for j in range(num_shared)]
    assert d_x.shape == x.shape
    np.testing.assert_allclose(d_x, d_x_routed + sum(r[0] for r in reference), rtol=1e-4, atol=1e-4)
    by_name = {v.path.split("/")[-1]: g for v, g in zip(layer.shared_experts.trainable_variables, d_shared)}
    np.testing.assert_allclose(by_name["kernel_in"], [r[1] for r in reference], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(by_name["kernel_out"], [r[2] for r in reference], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(by_name["bias_in"])[:, 0], [r[3] for r in reference], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(by_name["bias_out"])[:, 0], [r[4] for r in reference], rtol=1e-4, atol=1e-4)


def test_shared_experts_citizenship():
    run_layer_test(
        tf_moe.MoELayer,
        dict(num_experts=4, k=2, hidden_units=8, output_units=6, num_shared_experts=1),
        input_shape=(3, 5, 10),
        expected_output_shape=(3, 5, 6),
    )


def _drops(gates, k, capacity):
    return (gates > 0).sum() - (_capacity_kept_gates(gates, k, capacity) > 0).sum()


@pytest.mark.parametrize("eval_capacity_factor", [None, 2.0, 0.25])
def test_train_and_eval_capacity_factors(eval_capacity_factor):
    """Training drops what capacity_factor's capacity drops, inference what the eval factor's does."""
    router = tf_moe.NoisyTopKRouter(5, 2, noisy=False)  # the same routing in both modes
    layer = _randomised(router=router, capacity_factor=0.5, eval_capacity_factor=eval_capacity_factor)
    x = np.random.default_rng(14).standard_normal((40, 6)).astype("float32")
    _, gates, _ = ref.noisy_top_k(x, *_router_weights(layer), 0, 2, EPS, train=False)
    for training, factor in ((True, 0.5), (False, eval_capacity_factor or 0.5)):
        layer.balance.reset_state()
        y = layer(x, training=training).numpy()
        capacity = math.ceil(factor * 2 * 40 / 5)
        kept = _capacity_kept_gates(gates, 2, capacity)
        np.testing.assert_allclose(y, ref.dense_moe(x, kept, *_expert_weights(layer)), rtol=1e-5, atol=1e-5)
        dropped = float(layer.balance.result()[f"{layer.name}_dropped_fraction"]) * 80
        assert dropped == pytest.approx(_drops(gates, 2, capacity), abs=1e-4)
    assert _drops(gates, 2, math.ceil(0.5 * 16)) > _drops(gates, 2, math.ceil(2.0 * 16)) == 0
    assert layer.inference_capacity_factor == (eval_capacity_factor or 0.5)


def test_dropless_training_with_a_static_eval_capacity():
    layer = _randomised(router=tf_moe.NoisyTopKRouter(5, 2, noisy=False), eval_capacity_factor=0.5)
    x = np.random.default_rng(15).standard_normal((40, 6)).astype("float32")
    _, gates, _ = ref.noisy_top_k(x, *_router_weights(layer), 0, 2, EPS, train=False)
    np.testing.assert_allclose(layer(x, training=True).numpy(), ref.dense_moe(x, gates, *_expert_weights(layer)),
                               rtol=1e-5, atol=1e-5)
    kept = _capacity_kept_gates(gates, 2, 8)
    np.testing.assert_allclose(layer(x).numpy(), ref.dense_moe(x, kept, *_expert_weights(layer)), rtol=1e-5, atol=1e-5)
    config = layer.get_config()
    assert (config["capacity_factor"], config["eval_capacity_factor"]) == (None, 0.5)
    with pytest.raises(ValueError, match="`eval_capacity_factor`"):
        tf_moe.MoELayer(4, 2, 8, eval_capacity_factor=0.0)
    with pytest.raises(ValueError, match="`num_shared_experts`"):
        tf_moe.MoELayer(4, 2, 8, num_shared_experts=-1)


@pytest.mark.parametrize(
    # The default run takes the loss-free router (a variable update inside
    # the compiled step); each takes about 20 s on two cores.
    "kind", ["loss_free"] + [pytest.param(k, marks=pytest.mark.slow) for k in ("switch", "top_k", "expert_choice", "hash")]
)
def test_new_routers_train_under_xla_on_the_capacity_path_as_without(kind):
    """The same fit with and without XLA (static capacity, eval capacity too;
    the loss-free router's bias updates inside the compiled step)."""

    def model_fn(jit):
        keras.utils.set_random_seed(1)
        inputs = keras.Input((6, 8), batch_size=16)
        ids = keras.Input((6,), batch_size=16, dtype="int32")
        router = {"switch": lambda: tf_moe.SwitchRouter(4, jitter_epsilon=0.0, z_loss_weight=1e-2),
                  "top_k": lambda: tf_moe.TopKRouter(4, 2, z_loss_weight=1e-2),
                  "expert_choice": lambda: tf_moe.ExpertChoiceRouter(4, 1.0),
                  "loss_free": lambda: tf_moe.LossFreeRouter(4, 2, bias_update_rate=0.05, balance_weight=0.1),
                  "hash": lambda: tf_moe.HashRouter(4)}[kind]()
        moe = tf_moe.MoELayer(hidden_units=16, capacity_factor=1.0, eval_capacity_factor=1.5, router=router,
                              num_shared_experts=1, name="moe")
        model = keras.Model([inputs, ids], moe(inputs, **({"token_ids": ids} if kind == "hash" else {})))
        if kind != "hash":
            router.w_gate.assign(np.random.default_rng(0).standard_normal((8, 4)).astype("float32"))
        model.compile(keras.optimizers.SGD(0.1), "mse", jit_compile=jit)
        return model

    x = np.random.default_rng(6).standard_normal((32, 6, 8)).astype("float32")
    ids = np.random.default_rng(7).integers(0, 100, (32, 6)).astype("int32")
    xla, plain = model_fn(True), model_fn(False)
    got = xla.fit([x, ids], x, batch_size=16, epochs=2, shuffle=False, verbose=0).history
    want = plain.fit([x, ids], x, batch_size=16, epochs=2, shuffle=False, verbose=0).history
    for key in ("loss", "moe_cv_load", "moe_dropped_fraction", "moe_aux_loss", "moe_unrouted_fraction"):
        np.testing.assert_allclose(got[key], want[key], rtol=1e-4, atol=1e-6, err_msg=key)
    np.testing.assert_allclose(xla.predict([x, ids], batch_size=16, verbose=0),
                               plain.predict([x, ids], batch_size=16, verbose=0), rtol=1e-4, atol=1e-5)
    if kind == "loss_free":
        bias = xla.get_layer("moe").router.expert_bias.numpy()
        assert np.any(bias != 0)
        np.testing.assert_allclose(bias, plain.get_layer("moe").router.expert_bias.numpy(), atol=1e-6)


@pytest.mark.parametrize("kind", ["switch", pytest.param("top_k", marks=pytest.mark.slow)])
def test_new_routers_under_mirrored_strategy_match_one_device(kind):
    """The f . P loss and the z-loss are of the global batch: 2 replicas = 1 device."""
    devices = [d.name for d in tf.config.list_logical_devices("CPU")[:2]]
    x = np.random.default_rng(7).standard_normal((96, 8)).astype("float32")
    y = np.tanh(x[:, :4])

    def train(strategy):
        with strategy.scope():
            keras.utils.set_random_seed(2)
            inputs = keras.Input((8,))
            router = {"switch": lambda: tf_moe.SwitchRouter(4, balance_weight=0.5, jitter_epsilon=0.0, z_loss_weight=0.1),
                      "top_k": lambda: tf_moe.TopKRouter(4, 2, balance_weight=0.5, z_loss_weight=0.1)}[kind]()
            moe = tf_moe.MoELayer(hidden_units=16, router=router, num_shared_experts=1, name="moe")
            model = keras.Model(inputs, keras.layers.Dense(4)(moe(inputs)))
            model.compile(keras.optimizers.SGD(0.1), "mse")
            rng = np.random.default_rng(3)
            model.set_weights([rng.standard_normal(w.shape).astype("float32") * 0.5 for w in model.get_weights()])
        history = model.fit(x, y, batch_size=32, epochs=3, shuffle=False, verbose=0).history
        return history, model.get_weights()

    single, single_weights = train(tf.distribute.OneDeviceStrategy(devices[0]))
    mirrored, mirrored_weights = train(get_strategy("mirrored", devices=devices))
    assert single["moe_aux_loss"][0] > 0.1
    for key in ("loss", "moe_aux_loss", "moe_cv_load"):
        np.testing.assert_allclose(mirrored[key], single[key], rtol=1e-4, atol=1e-6, err_msg=key)
    for a, b in zip(mirrored_weights, single_weights):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_return_routing_gives_the_calls_routing_and_eager_calls_keep_it():
    layer = tf_moe.MoELayer(4, 2, 8, router=tf_moe.NoisyTopKRouter(4, 2, noisy=False))
    x = np.random.default_rng(0).standard_normal((3, 5, 6)).astype("float32")
    assert layer.last_routing is None
    y, routing = layer(x, return_routing=True)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(layer(x)))
    # Independent count: each token's top-2 experts of x @ W_g.
    top = np.argsort(-(x.reshape(-1, 6) @ layer.router.w_gate.numpy()), axis=-1)[:, :2]
    np.testing.assert_array_equal(routing.load.numpy(), np.bincount(top.reshape(-1), minlength=4))
    np.testing.assert_array_equal(layer.last_routing.load.numpy(), routing.load.numpy())
    # Traced calls keep no routing; symbolic ones return its structure.
    fresh = tf_moe.MoELayer(4, 2, 8)
    traced_y, traced = tf.function(lambda t: fresh(t, return_routing=True))(x)
    assert fresh.last_routing is None and traced.load.shape == (4,) and traced_y.shape == x.shape
    outputs, symbolic = fresh(keras.Input((5, 6)), return_routing=True)
    assert outputs.shape == (None, 5, 6) and isinstance(symbolic, tf_moe.Routing)


@pytest.mark.parametrize("gated", [False, True])
def test_split_dropless_dispatch_equals_padding_every_expert(gated):
    """The default dropless path pads only the fullest experts; outputs and gradients as with full padding."""
    layer = tf_moe.MoELayer(6, 2, 8, gated=gated)
    layer.build((None, 5))
    randomise_weights(layer, seed=3, scale=1.5)  # a sharp gate: skewed loads
    x = tf.constant(np.random.default_rng(4).standard_normal((4, 10, 5)).astype("float32"))
    mask = tf.constant(np.random.default_rng(5).random((4, 10)) < 0.8)
    _, routing = layer(x, mask=mask, training=True, return_routing=True)
    tokens = tf.reshape(x, [-1, 5])
    split = dispatch_ops.split_dispatch(tokens, routing.token_id, routing.expert_id, 6, overflow_cost=0.0)
    assert split.overflow_experts.shape[0] > 0, "the test needs an uneven load"

    def outputs_and_gradients(overflow_cost):
        layer.experts.overflow_cost = overflow_cost
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, mask=mask, training=True)
            loss = tf.reduce_sum(y * tf.sin(y)) + tf.add_n(layer.losses)
        return [y] + tape.gradient(loss, [x] + layer.trainable_variables)

    try:
        split_results = outputs_and_gradients(0.0)
        padded_results = outputs_and_gradients(None)
    finally:
        del layer.experts.overflow_cost
    assert layer.experts.overflow_cost == tf_moe.FeedForwardExperts.overflow_cost
    for got, want in zip(split_results, padded_results):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
