"""Data parallelism of the MoE with tf.distribute, and TPU-style compilation.

The reference is one device on the same global batch: with importance and
load summed over replicas, the balancing losses are those of the global
batch, and Keras scales every replica's losses by 1/replicas.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_moe
from tf_moe.distribute import get_strategy

N, K = 4, 2


def _model(strategy, capacity_factor=None, noisy_gating=False, **compile_kwargs):
    with strategy.scope():
        keras.utils.set_random_seed(2)
        inputs = keras.Input((3, 8))
        hidden = tf_moe.MoE(
            N, K, 16, noisy_gating=noisy_gating, capacity_factor=capacity_factor, seed=5, name="moe"
        )(inputs)
        model = keras.Model(inputs, keras.layers.Dense(4)(hidden))
        # A random gate: unequal importance, so the auxiliary loss is not 0.
        gate = np.random.default_rng(0).standard_normal((8, N)).astype("float32")
        model.get_layer("moe").gate.w_gate.assign(gate)
        model.compile(keras.optimizers.Adam(0.02), "mse", **compile_kwargs)
    return model


def _data(batch=64):
    x = np.random.default_rng(7).standard_normal((batch, 3, 8)).astype("float32")
    return x, np.tanh(x[..., :4])


def _devices(count):
    return [d.name for d in tf.config.list_logical_devices("CPU")[:count]]


# capacity_factor = N / K makes every expert's capacity the replica's token
# count: the static-shape path, with nothing dropped on either side.
@pytest.mark.parametrize("capacity_factor", [None, N / K])
def test_mirrored_training_matches_one_device(capacity_factor):
    x, y = _data()
    single = _model(tf.distribute.OneDeviceStrategy(_devices(1)[0]), capacity_factor)
    mirrored = _model(get_strategy("mirrored", devices=_devices(2)), capacity_factor)
    expected = single.fit(x, y, batch_size=32, epochs=2, shuffle=False, verbose=0).history
    got = mirrored.fit(x, y, batch_size=32, epochs=2, shuffle=False, verbose=0).history
    assert expected["moe_aux_loss"][0] > 1e-3
    for key in ("loss", "moe_aux_loss", "moe_cv_importance", "moe_cv_load", "moe_max_over_mean_load", "moe_dropped_fraction"):
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-4, atol=1e-6, err_msg=key)
    for a, b in zip(mirrored.get_weights(), single.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    # Loss and metrics of the trained models, evaluated on the global batch.
    np.testing.assert_allclose(
        mirrored.evaluate(x, y, batch_size=32, verbose=0), single.evaluate(x, y, batch_size=32, verbose=0),
        rtol=1e-4, atol=1e-6,
    )


def test_aux_loss_is_the_global_batch_loss_scaled_per_replica():
    """Each replica's share of the aux loss is aux(global batch) / replicas."""
    x, _ = _data(32)
    single = _model(tf.distribute.OneDeviceStrategy(_devices(1)[0]))
    strategy = get_strategy("mirrored", devices=_devices(2))
    mirrored = _model(strategy)
    layer = single.get_layer("moe")
    single(x, training=True)
    global_aux = float(layer.losses[0])

    @tf.function
    def replica_losses(batch):
        def step(inputs):
            mirrored(inputs, training=True)
            # Keras's own scaling of added losses under a strategy.
            return mirrored._aggregate_additional_loss(mirrored.get_layer("moe").losses[-1])

        return strategy.run(step, args=(batch,))

    batch = next(iter(strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensor_slices(x).batch(32))))
    shares = [float(v) for v in strategy.experimental_local_results(replica_losses(batch))]
    np.testing.assert_allclose(shares, [global_aux / 2] * 2, rtol=1e-5)


def test_noisy_gating_trains_under_mirrored_with_independent_noise():
    """The gate's SeedGenerator works in replica context; replicas draw different noise."""
    x, y = _data(32)
    strategy = get_strategy("mirrored", devices=_devices(2))
    model = _model(strategy, noisy_gating=True)
    history = model.fit(x, y, batch_size=32, epochs=2, verbose=0).history
    assert np.all(np.isfinite(history["loss"]))
    assert 0 < history["moe_topk_agreement"][-1] < 1  # the noise did change routes
    router = model.get_layer("moe").router
    same = np.ones((4, 8), "float32")  # equal tokens on both replicas
    batch = next(iter(strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensor_slices(np.concatenate([same, same])).batch(8))))
    load = strategy.experimental_local_results(
        strategy.run(tf.function(lambda t: router(t, training=True).load), args=(batch,))
    )
    assert not np.allclose(load[0], load[1])


def test_hierarchical_secondary_gates_draw_independent_noise_per_replica():
    strategy = get_strategy("mirrored", devices=_devices(2))
    with strategy.scope():
        gate = tf_moe.HierarchicalRouter(num_groups=2, experts_per_group=4, k_primary=1, k_secondary=2, seed=3)
        gate.build((None, 8))
    same = np.ones((4, 8), "float32")  # equal tokens on both replicas
    batch = next(iter(strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensor_slices(np.concatenate([same, same])).batch(8))))
    # No primary noise: every replica picks the same group, so only the secondary draws can differ.
    step = tf.function(lambda t: gate(t, training=True, noise=(tf.zeros([4, 2]), None)).weight)
    weights = strategy.experimental_local_results(strategy.run(step, args=(batch,)))
    assert not np.allclose(weights[0], weights[1])


def test_capacity_path_trains_under_xla_with_steps_per_execution():
    """What TPUStrategy compiles: XLA, static shapes, several steps per call."""
    x, y = _data()
    strategy = tf.distribute.OneDeviceStrategy(_devices(1)[0])
    xla = _model(strategy, capacity_factor=1.0, jit_compile=True, steps_per_execution=2)
    plain = _model(strategy, capacity_factor=1.0)
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(16, drop_remainder=True)
    got = xla.fit(data, epochs=2, verbose=0).history
    expected = plain.fit(data, epochs=2, verbose=0).history
    assert got["moe_dropped_fraction"][0] > 0  # capacity really binds
    np.testing.assert_allclose(got["loss"], expected["loss"], rtol=1e-4)
    for a, b in zip(xla.get_weights(), plain.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)
