"""SwitchRouter (Fedus et al. 2022, section 2.2) against the numpy reference."""

import keras
import numpy as np
import pytest

import tf_moe
from tests import numpy_reference as ref
from tests.layer_test_case import randomise_weights
from tf_moe import routers


def test_is_top_1_with_the_papers_defaults():
    router = tf_moe.SwitchRouter(8)
    assert (router.k, router.normalize, router.balance_weight, router.jitter_epsilon) == (1, False, 1e-2, 1e-2)
    assert not router.uses_balancing_loss
    config = router.get_config()
    assert "k" not in config and "normalize" not in config
    clone = tf_moe.SwitchRouter.from_config(config)
    assert clone.get_config() == config


def test_routing_and_loss_match_the_reference_at_inference_and_without_jitter():
    router = tf_moe.SwitchRouter(6, balance_weight=0.5, jitter_epsilon=0.0, z_loss_weight=0.1)
    router.build((None, 5))
    rng = np.random.default_rng(0)
    router.w_gate.assign(rng.standard_normal((5, 6)).astype("float32"))
    x = rng.standard_normal((40, 5)).astype("float32")
    for training in (False, True):
        routing = router(x, training=training)
        p, gates, choices = ref.top_k_routing(x, router.w_gate.numpy(), 1)
        np.testing.assert_array_equal(np.asarray(routing.expert_id), p.argmax(axis=1))
        np.testing.assert_allclose(np.asarray(routing.weight), p.max(axis=1), rtol=1e-5)
        np.testing.assert_allclose(
            float(routing.losses["load_balancing"]), ref.switch_balance_loss(p, choices, 0.5), rtol=1e-5
        )
        np.testing.assert_allclose(float(routing.losses["z_loss"]), 0.1 * ref.z_loss(x @ router.w_gate.numpy()), rtol=1e-5)
        np.testing.assert_array_equal(routing.load, np.bincount(p.argmax(axis=1), minlength=6))


def test_jitter_is_seeded_and_only_while_training():
    x = np.random.default_rng(1).standard_normal((64, 5)).astype("float32")

    def weights(seed, training):
        router = tf_moe.SwitchRouter(6, jitter_epsilon=0.3, seed=seed)
        router.build((None, 5))
        router.w_gate.assign(np.random.default_rng(2).standard_normal((5, 6)).astype("float32"))
        return np.asarray(router(x, training=training).weight)

    np.testing.assert_array_equal(weights(3, True), weights(3, True))
    assert not np.allclose(weights(3, True), weights(4, True))
    np.testing.assert_array_equal(weights(3, False), weights(4, False))


def test_moe_output_equals_the_dense_reference_with_capacity_drops():
    layer = tf_moe.MoELayer(4, 1, 7, router="switch", capacity_factor=1.0)
    layer.build((None, 5))
    randomise_weights(layer, seed=3)
    x = np.random.default_rng(3).standard_normal((30, 5)).astype("float32")
    p, gates, _ = ref.top_k_routing(x, layer.router.w_gate.numpy(), 1)
    # Capacity ceil(30 / 4) = 8 per expert; the first 8 tokens of each expert stay.
    kept = np.zeros_like(gates)
    for e in range(4):
        for t in np.flatnonzero(p.argmax(axis=1) == e)[:8]:
            kept[t, e] = gates[t, e]
    e = layer.experts
    expected = ref.dense_moe(x, kept, e.kernel_in.numpy(), e.bias_in.numpy()[:, 0], e.kernel_out.numpy(),
                             e.bias_out.numpy()[:, 0])
    np.testing.assert_allclose(layer(x).numpy(), expected, rtol=1e-5, atol=1e-5)
    dropped = (gates > 0).sum() - (kept > 0).sum()
    assert dropped > 0
    assert float(layer.balance.result()[f"{layer.name}_dropped_fraction"]) == pytest.approx(dropped / 30)


def test_by_name_k_must_be_one():
    assert type(routers.get("switch", 8)) is tf_moe.SwitchRouter
    assert routers.get("switch", 8, 1).k == 1
    with pytest.raises(ValueError, match="`k` must be None or 1"):
        routers.get("switch", 8, 2)
    with pytest.raises(ValueError, match="`k`"):
        tf_moe.MoELayer(8, 2, 16, router="switch")


@pytest.mark.slow
def test_the_loss_balances_the_load():
    """A short fit: CV(load) ends far lower with the f . P loss than without."""

    def train(weight):
        keras.utils.set_random_seed(0)
        inputs = keras.Input((16,))
        moe = tf_moe.MoELayer(hidden_units=16, router=tf_moe.SwitchRouter(8, balance_weight=weight, seed=0))
        model = keras.Model(inputs, keras.layers.Dense(1)(moe(inputs)))
        model.compile(keras.optimizers.Adam(1e-2), "mse")
        rng = np.random.default_rng(0)
        # A shared offset in the inputs lets an unbalanced router collapse fast.
        x = rng.standard_normal((2048, 16)).astype("float32") + 1.0
        y = np.sin(x[:, :1] * 2) + x[:, 1:2]
        model.fit(x, y, batch_size=128, epochs=8, verbose=0)
        moe.balance.reset_state()
        model.evaluate(x[:1024], y[:1024], batch_size=1024, verbose=0)
        return float(moe.balance.result()[f"{moe.name}_cv_load"])

    balanced, unbalanced = train(1.0), train(0.0)
    assert balanced < 0.4
    assert unbalanced > 3 * balanced
