"""LossFreeRouter (Wang et al. 2024; DeepSeek-V3, section 2.1.2) against the numpy reference."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_moe
from tests import numpy_reference as ref
from tests.layer_test_case import randomise_weights
from tf_moe.distribute import get_strategy


def _randomised(n=6, k=2, d=5, seed=0, **kwargs):
    router = tf_moe.LossFreeRouter(n, k, **kwargs)
    router.build((None, d))
    rng = np.random.default_rng(seed)
    router.w_gate.assign(rng.standard_normal((d, n)).astype("float32"))
    router.expert_bias.assign(rng.standard_normal(n).astype("float32") * 0.3)
    return router


def _dense(routing, num_tokens, n):
    dense = np.zeros((num_tokens, n + 1))
    np.add.at(dense, (np.asarray(routing.token_id), np.asarray(routing.expert_id)), np.asarray(routing.weight))
    return dense[:, :n]


@pytest.mark.parametrize("affinity", ["sigmoid", "softmax"])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_biases_select_and_affinities_weigh(affinity, k):
    router = _randomised(k=k, affinity=affinity)
    x = np.random.default_rng(1).standard_normal((24, 5)).astype("float32")
    bias = router.expert_bias.numpy()
    routing = router(x, training=False)
    s, gates, choices = ref.loss_free_routing(x, router.w_gate.numpy(), bias, k, affinity)
    np.testing.assert_allclose(_dense(routing, 24, 6), gates, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(routing.expert_id).reshape(k, 24).T, choices)
    np.testing.assert_array_equal(routing.load, np.bincount(choices.ravel(), minlength=6))
    np.testing.assert_allclose(routing.importance, gates.sum(axis=0), rtol=1e-5)
    # The bias changed the selection (else this test would not test it).
    _, unbiased, _ = ref.loss_free_routing(x, router.w_gate.numpy(), np.zeros(6), k, affinity)
    assert not np.array_equal(gates > 0, unbiased > 0)
    assert routing.losses == {} and routing.metrics == {}
    np.testing.assert_array_equal(router.expert_bias.numpy(), bias)  # no update at inference


def test_training_call_updates_the_bias_once_from_the_load_error():
    router = _randomised(bias_update_rate=0.01)
    x = np.random.default_rng(2).standard_normal((30, 5)).astype("float32")
    valid = np.arange(30) % 5 != 0
    poisoned = x.copy()
    poisoned[~valid] = np.nan
    bias = router.expert_bias.numpy()
    routing = router(poisoned, mask=valid, training=True)
    # Masked tokens are neither routed nor counted.
    _, _, choices = ref.loss_free_routing(x[valid], router.w_gate.numpy(), bias, 2)
    np.testing.assert_array_equal(routing.load, np.bincount(choices.ravel(), minlength=6))
    expected = ref.loss_free_bias_update(bias, choices, 6, 0.01)
    np.testing.assert_allclose(router.expert_bias.numpy(), expected, rtol=0, atol=1e-7)
    assert not np.allclose(expected, bias)
    # The bias is state, not a parameter: no gradient, no optimizer.
    assert not any(w is router.expert_bias for w in router.trainable_weights)
    with tf.GradientTape() as tape:
        tape.watch(router.expert_bias.value)
        out = router(x, training=False)
        objective = tf.reduce_sum(out.weight * out.weight)
    assert tape.gradient(objective, router.expert_bias.value) is None


def test_frozen_biases_and_an_all_masked_batch_leave_the_bias_alone():
    router = _randomised(bias_update_rate=0.0)
    x = np.random.default_rng(3).standard_normal((10, 5)).astype("float32")
    bias = router.expert_bias.numpy()
    router(x, training=True)
    np.testing.assert_array_equal(router.expert_bias.numpy(), bias)
    router = _randomised()
    bias = router.expert_bias.numpy()
    router(x, mask=np.zeros(10, bool), training=True)
    np.testing.assert_array_equal(router.expert_bias.numpy(), bias)  # sign(0) = 0


@pytest.mark.parametrize("with_ids", [True, False])
def test_sequence_wise_balance_loss_matches_deepseek_v3(with_ids):
    router = _randomised(balance_weight=1e-1, bias_update_rate=0.0)
    rng = np.random.default_rng(4)
    x = rng.standard_normal((4, 7, 5)).astype("float32")
    mask = rng.random((4, 7)) > 0.2
    ids = np.broadcast_to(np.arange(4)[:, None], (4, 7)).reshape(-1)
    flat, valid = x.reshape(-1, 5), mask.reshape(-1)
    kwargs = {"sequence_ids": ids} if with_ids else {}
    routing = router(flat, mask=valid, training=True, **kwargs)
    s, _, choices = ref.loss_free_routing(flat[valid], router.w_gate.numpy(), router.expert_bias.numpy(), 2)
    sequences = ids[valid] if with_ids else np.zeros(valid.sum(), int)
    expected = ref.sequence_balance_loss(s, choices, list(sequences), 1e-1)
    np.testing.assert_allclose(float(routing.losses["sequence_balance"]), expected, rtol=1e-5)


def test_sequence_ids_through_the_moe_layer():
    layer = tf_moe.MoELayer(hidden_units=8, router=tf_moe.LossFreeRouter(4, 2, balance_weight=1e-4))
    x = np.random.default_rng(5).standard_normal((3, 6, 5)).astype("float32")
    ids = np.broadcast_to(np.arange(3)[:, None], (3, 6))
    layer(x, training=True, sequence_ids=ids)
    (loss,) = layer.losses
    assert 0 < float(loss) < 1e-3
    with pytest.raises(tf.errors.InvalidArgumentError, match="sequence_ids"):
        layer(x, training=True, sequence_ids=ids + 100)


def test_bias_is_saved_and_restored_with_the_model(tmp_path):
    # Seeded: from some initial weights the four updates cancel out to a
    # zero bias, which would check nothing (the full run hit one).
    keras.utils.set_random_seed(0)
    inputs = keras.Input((5,))
    moe = tf_moe.MoELayer(hidden_units=8, router=tf_moe.LossFreeRouter(4, 2, bias_update_rate=0.05), name="moe")
    model = keras.Model(inputs, moe(inputs))
    model.compile("adam", "mse")
    x = np.random.default_rng(6).standard_normal((64, 5)).astype("float32") + 1.0
    model.fit(x, x[:, :5], batch_size=16, epochs=1, verbose=0)
    bias = moe.router.expert_bias.numpy()
    assert np.any(bias != 0)
    path = os.path.join(tmp_path, "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path, safe_mode=True)
    np.testing.assert_array_equal(loaded.get_layer("moe").router.expert_bias.numpy(), bias)
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))
    checkpoint = tf.train.Checkpoint(model=model)
    saved = checkpoint.save(os.path.join(tmp_path, "ckpt"))
    moe.router.expert_bias.assign(np.zeros(4, "float32"))
    checkpoint.restore(saved)
    np.testing.assert_array_equal(moe.router.expert_bias.numpy(), bias)


def test_the_bias_updates_once_per_fit_step_and_never_in_evaluate():
    """With frozen weights (learning rate 0), `fit` moves the bias exactly as
    the reference does batch after batch; `evaluate` and `predict` not at all."""
    inputs = keras.Input((5,))
    router = tf_moe.LossFreeRouter(4, 1, bias_update_rate=0.05)
    moe = tf_moe.MoELayer(hidden_units=8, router=router, name="moe")
    model = keras.Model(inputs, moe(inputs))
    model.compile(keras.optimizers.SGD(0.0), "mse")
    randomise_weights(router, seed=7)
    router.expert_bias.assign(np.zeros(4, "float32"))
    x = np.random.default_rng(7).standard_normal((48, 5)).astype("float32") + 1.0
    bias = np.zeros(4)
    for batch in np.split(x, 3):
        _, _, choices = ref.loss_free_routing(batch, router.w_gate.numpy(), bias, 1)
        bias = ref.loss_free_bias_update(bias, choices, 4, 0.05)
    model.fit(x, x, batch_size=16, epochs=1, shuffle=False, verbose=0)  # 3 steps
    np.testing.assert_allclose(router.expert_bias.numpy(), bias, atol=1e-6)
    assert np.abs(bias).max() > 0.1
    model.evaluate(x, x, batch_size=16, verbose=0)
    model.predict(x, verbose=0)
    np.testing.assert_allclose(router.expert_bias.numpy(), bias, atol=1e-6)


def test_mirrored_strategy_updates_from_the_global_batch_once_per_step():
    """2 replicas = one device on the global batch: same weights, same biases
    (an update per replica would move them twice as far)."""
    devices = [d.name for d in tf.config.list_logical_devices("CPU")[:2]]
    x = np.random.default_rng(8).standard_normal((96, 8)).astype("float32") + 0.5
    y = np.tanh(x[:, :4])

    def train(strategy):
        with strategy.scope():
            keras.utils.set_random_seed(2)
            inputs = keras.Input((8,))
            router = tf_moe.LossFreeRouter(4, 2, bias_update_rate=0.01, balance_weight=0.1)
            moe = tf_moe.MoELayer(hidden_units=16, router=router, name="moe")
            model = keras.Model(inputs, keras.layers.Dense(4)(moe(inputs)))
            model.compile(keras.optimizers.SGD(0.1), "mse")
            rng = np.random.default_rng(3)
            model.set_weights([rng.standard_normal(w.shape).astype("float32") * 0.5 for w in model.get_weights()])
            router.expert_bias.assign(np.zeros(4, "float32"))
        history = model.fit(x, y, batch_size=32, epochs=3, shuffle=False, verbose=0).history
        return history, model.get_weights(), router.expert_bias.numpy()

    single, single_weights, single_bias = train(tf.distribute.OneDeviceStrategy(devices[0]))
    mirrored, mirrored_weights, mirrored_bias = train(get_strategy("mirrored", devices=devices))
    assert np.abs(single_bias).max() > 0.02
    np.testing.assert_allclose(mirrored_bias, single_bias, atol=1e-6)
    np.testing.assert_allclose(mirrored["loss"], single["loss"], rtol=1e-4)
    np.testing.assert_allclose(mirrored["moe_aux_loss"], single["moe_aux_loss"], rtol=1e-3, atol=1e-6)
    for a, b in zip(mirrored_weights, single_weights):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_bias_updates_balance_the_load():
    """A short fit: CV(load) ends far lower with bias updates than without."""

    def train(rate):
        keras.utils.set_random_seed(0)
        inputs = keras.Input((16,))
        moe = tf_moe.MoELayer(hidden_units=16, router=tf_moe.LossFreeRouter(8, 2, bias_update_rate=rate, seed=0))
        model = keras.Model(inputs, keras.layers.Dense(1)(moe(inputs)))
        model.compile(keras.optimizers.Adam(1e-2), "mse")
        rng = np.random.default_rng(0)
        x = rng.standard_normal((2048, 16)).astype("float32") + 1.0
        y = np.sin(x[:, :1] * 2) + x[:, 1:2]
        model.fit(x, y, batch_size=128, epochs=5, verbose=0)
        moe.balance.reset_state()
        model.evaluate(x[:1024], y[:1024], batch_size=1024, verbose=0)
        return float(moe.balance.result()[f"{moe.name}_cv_load"])

    balanced, unbalanced = train(1e-2), train(0.0)
    assert balanced < 0.3
    assert unbalanced > 3 * balanced


def test_moe_output_equals_the_dense_reference():
    layer = tf_moe.MoELayer(6, 2, 7, router="loss_free")
    layer.build((None, 5))
    randomise_weights(layer, seed=9)
    x = np.random.default_rng(9).standard_normal((30, 5)).astype("float32")
    router = layer.router
    _, gates, _ = ref.loss_free_routing(x, router.w_gate.numpy(), router.expert_bias.numpy(), 2)
    e = layer.experts
    expected = ref.dense_moe(x, gates, e.kernel_in.numpy(), e.bias_in.numpy()[:, 0], e.kernel_out.numpy(),
                             e.bias_out.numpy()[:, 0])
    np.testing.assert_allclose(layer(x, training=True).numpy(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs,arg",
    [
        (dict(num_experts=4, k=2, affinity="tanh"), "`affinity`"),
        (dict(num_experts=4, k=2, bias_update_rate=-1e-3), "`bias_update_rate`"),
        (dict(num_experts=4, k=2, balance_weight=float("inf")), "`balance_weight`"),
        (dict(num_experts=4, k=5), "`k`"),
    ],
)
def test_bad_configurations(kwargs, arg):
    with pytest.raises(ValueError, match=arg):
        tf_moe.LossFreeRouter(**kwargs)


def test_config_round_trip_and_ops():
    router = tf_moe.LossFreeRouter(6, 3, affinity="softmax", bias_update_rate=1e-2, balance_weight=1e-4,
                                   seed=1, z_loss_weight=1e-3, name="r")
    clone = keras.layers.deserialize(keras.layers.serialize(router))
    assert clone.get_config() == router.get_config()
    assert router.ops_per_token(10) == 60
