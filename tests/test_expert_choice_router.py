"""ExpertChoiceRouter (Zhou et al. 2022, section 3) against the numpy reference."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_moe
from tests import numpy_reference as ref
from tests.layer_test_case import randomise_weights
from tf_moe import routers
from tf_moe.layers.expert_choice_router import expert_capacity


def _randomised(n=4, d=5, seed=0, **kwargs):
    router = tf_moe.ExpertChoiceRouter(n, **kwargs)
    router.build((None, d))
    router.w_gate.assign(np.random.default_rng(seed).standard_normal((d, n)).astype("float32"))
    return router


def _dense(routing, num_tokens, n):
    dense = np.zeros((num_tokens, n + 1))
    np.add.at(dense, (np.asarray(routing.token_id), np.asarray(routing.expert_id)), np.asarray(routing.weight))
    return dense[:, :n]


@pytest.mark.parametrize("capacity_factor", [0.5, 1.0, 2.0, 3.0])
def test_each_expert_takes_its_top_c_tokens(capacity_factor):
    router = _randomised(capacity_factor=capacity_factor)
    x = np.random.default_rng(1).standard_normal((22, 5)).astype("float32")
    routing = router(x, training=True)
    scores, gates, capacity = ref.expert_choice(x, router.w_gate.numpy(), capacity_factor)
    assert capacity == math.ceil(22 * capacity_factor / 4)
    assert routing.token_id.shape == (4 * capacity,)
    np.testing.assert_allclose(_dense(routing, 22, 4), gates, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(routing.load, np.full(4, capacity))
    np.testing.assert_allclose(routing.importance, gates.sum(axis=0), rtol=1e-5)
    assert routing.losses == {} and float(routing.dropped) == 0.0
    taken = (gates > 0).sum(axis=1)
    if capacity_factor >= 2.0:
        assert taken.max() > 1  # a token may be taken by several experts
    if capacity_factor <= 1.0:
        assert taken.min() == 0  # or by none
    # The same at inference, on the inference batch.
    np.testing.assert_allclose(_dense(router(x, training=False), 22, 4), gates, rtol=1e-5, atol=1e-6)


def test_masked_tokens_are_never_taken():
    router = _randomised(capacity_factor=2.0)
    x = np.random.default_rng(2).standard_normal((20, 5)).astype("float32")
    valid = np.arange(20) % 3 != 0
    poisoned = x.copy()
    poisoned[~valid] = np.nan
    routing = router(poisoned, mask=valid)
    dense = _dense(routing, 20, 4)
    assert np.all(dense[~valid] == 0) and np.all(np.isfinite(dense))
    # Each expert takes C = ceil(20 * 2 / 4) = 10 of the 13 valid tokens (padding counts in T).
    scores, _, _ = ref.expert_choice(np.where(valid[:, None], x, 0.0), router.w_gate.numpy(), 2.0)
    expected = np.zeros_like(scores)
    for i in range(4):
        order = [t for t in np.argsort(-scores[:, i], kind="stable") if valid[t]][:10]
        expected[order, i] = scores[order, i]
    np.testing.assert_allclose(dense, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(routing.load, np.full(4, 10))
    # Fewer valid tokens than C: the rest of each expert's slots stay empty.
    few = router(x, mask=np.arange(20) < 3)
    np.testing.assert_array_equal(few.load, np.full(4, 3))
    assert np.sum(np.asarray(few.expert_id) < 4) == 12


def test_an_empty_batch_trains():
    """C = 0: no assignment, zero outputs and gradients (top_k's own gradient fails there)."""
    moe = tf_moe.MoELayer(4, None, 8, router="expert_choice")
    x = tf.zeros((0, 5, 4))
    with tf.GradientTape() as tape:
        y = moe(x, training=True)
        objective = tf.reduce_sum(y) + tf.add_n(moe.losses)
    assert y.shape == (0, 5, 4)
    gradients = tape.gradient(objective, moe.trainable_weights)
    assert all(np.all(np.asarray(g) == 0) for g in gradients if g is not None)
    inputs = keras.Input((5, 4))
    model = keras.Model(inputs, tf_moe.MoELayer(4, None, 8, router="expert_choice")(inputs))
    model.compile(keras.optimizers.SGD(0.1), "mse")
    before = [w.numpy() for w in model.weights]
    model.train_on_batch(np.zeros((0, 5, 4), "float32"), np.zeros((0, 5, 4), "float32"))
    for weight, value in zip(model.weights, before):
        np.testing.assert_array_equal(weight.numpy(), value)


def test_expert_capacity_is_exact_and_capped():
    assert expert_capacity(2.0, 22, 4) == 11
    assert expert_capacity(1.25, 10, 4) == 4  # ceil(3.125)
    assert expert_capacity(8.0, 5, 2) == 5  # at most every token
    assert expert_capacity(2.0, 0, 4) == 0
    assert int(expert_capacity(1.25, tf.constant(10), 4)) == 4
    assert tf_moe.ExpertChoiceRouter(4, 1.5).k == 2 and tf_moe.ExpertChoiceRouter(4, 9.0).k == 4


def test_moe_output_and_unrouted_fraction_equal_the_reference():
    layer = tf_moe.MoELayer(hidden_units=7, router=tf_moe.ExpertChoiceRouter(4, capacity_factor=1.0))
    layer.build((None, 5))
    randomise_weights(layer, seed=4)
    x = np.random.default_rng(4).standard_normal((30, 5)).astype("float32")
    _, gates, _ = ref.expert_choice(x, layer.router.w_gate.numpy(), 1.0)
    e = layer.experts
    expected = ref.dense_moe(x, gates, e.kernel_in.numpy(), e.bias_in.numpy()[:, 0], e.kernel_out.numpy(),
                             e.bias_out.numpy()[:, 0])
    np.testing.assert_allclose(layer(x, training=True).numpy(), expected, rtol=1e-5, atol=1e-5)
    result = {key.removeprefix(f"{layer.name}_"): float(v) for key, v in layer.balance.result().items()}
    unrouted = (gates.sum(axis=1) == 0).mean()
    assert unrouted > 0
    assert result["unrouted_fraction"] == pytest.approx(unrouted)
    assert result["cv_load"] == 0.0 and result["max_over_mean_load"] == pytest.approx(1.0)
    assert result["dropped_fraction"] == 0.0 and result["aux_loss"] == 0.0


def test_xla_with_a_batch_size_known_only_when_the_graph_runs():
    layer = tf_moe.MoELayer(hidden_units=7, router="expert_choice", num_experts=4, capacity_factor=1.0)
    layer.build((None, 5))
    randomise_weights(layer, seed=5)
    step = tf.function(
        lambda t: layer(t, training=True), jit_compile=True,
        input_signature=[tf.TensorSpec([None, 5], tf.float32)],
    )
    e = layer.experts
    for tokens in (40, 23):
        x = np.random.default_rng(tokens).standard_normal((tokens, 5)).astype("float32")
        _, gates, _ = ref.expert_choice(x, layer.router.w_gate.numpy(), 2.0)
        expected = ref.dense_moe(x, gates, e.kernel_in.numpy(), e.bias_in.numpy()[:, 0], e.kernel_out.numpy(),
                                 e.bias_out.numpy()[:, 0])
        np.testing.assert_allclose(step(x).numpy(), expected, rtol=1e-5, atol=1e-5)


def test_by_name_k_is_the_capacity_factor():
    assert routers.get("expert_choice", 8, 2).capacity_factor == 2.0
    assert routers.get("expert_choice", 8).capacity_factor == 2.0
    layer = tf_moe.MoELayer(8, 3, 16, router="expert_choice")
    assert (layer.router.capacity_factor, layer.k) == (3.0, 3)
    assert not layer.router.causal


def test_lstm_lm_warns_that_the_router_is_not_causal():
    with pytest.warns(UserWarning, match="not causal"):
        tf_moe.models.lstm_lm(50, units=8, num_experts=4, k=2, expert_hidden_units=8, router="expert_choice")


@pytest.mark.parametrize(
    "kwargs,arg",
    [
        (dict(num_experts=4, capacity_factor=0.0), "`capacity_factor`"),
        (dict(num_experts=4, capacity_factor=float("inf")), "`capacity_factor`"),
        (dict(num_experts=0), "`num_experts`"),
    ],
)
def test_bad_configurations(kwargs, arg):
    with pytest.raises(ValueError, match=arg):
        tf_moe.ExpertChoiceRouter(**kwargs)


def test_config_round_trip_and_ops():
    router = tf_moe.ExpertChoiceRouter(6, capacity_factor=1.5, seed=3, z_loss_weight=0.01, name="r")
    clone = keras.layers.deserialize(keras.layers.serialize(router))
    assert clone.get_config() == router.get_config()
    assert router.ops_per_token(10) == 60
