"""HashRouter (Roller et al. 2021): a fixed map of token ids, fed through the MoE layer."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_moe
from tests import numpy_reference as ref
from tests.layer_test_case import randomise_weights
from tf_moe import routers
from tf_moe.layers.hash_router import hash_experts


def test_the_map_equals_the_reference_for_any_id():
    ids = np.concatenate([np.arange(500), [2**31 - 1, 2**40 + 3, -1, -12345]]).astype("int64")
    for n, seed in ((8, 0), (5, 7), (64, 2**33)):
        got = hash_experts(ids, n, seed).numpy()
        np.testing.assert_array_equal(got, [ref.hash_expert(int(i), n, seed) for i in ids])
    # int32 ids give the same experts.
    np.testing.assert_array_equal(hash_experts(ids[:500].astype("int32"), 8).numpy(), hash_experts(ids[:500], 8).numpy())


def test_the_map_spreads_a_vocabulary_evenly_and_depends_on_the_seed():
    vocabulary = np.arange(16000)
    counts = np.bincount(hash_experts(vocabulary, 16, 0).numpy(), minlength=16)
    assert counts.min() > 0.9 * 1000 and counts.max() < 1.1 * 1000
    assert np.mean(hash_experts(vocabulary, 16, 0).numpy() == hash_experts(vocabulary, 16, 1).numpy()) < 0.1


def test_routing_gate_one_and_masks():
    router = tf_moe.HashRouter(6, seed=3)
    ids = np.random.default_rng(0).integers(0, 1000, 20)
    valid = np.arange(20) % 4 != 0
    x = np.full((20, 5), np.nan, "float32")  # the hidden states are not used
    routing = router(x, mask=valid, token_ids=ids)
    expected = np.array([ref.hash_expert(int(i), 6, 3) for i in ids])
    np.testing.assert_array_equal(np.asarray(routing.expert_id), np.where(valid, expected, 6))
    np.testing.assert_array_equal(np.asarray(routing.weight), valid.astype("float32"))
    np.testing.assert_array_equal(routing.load, np.bincount(expected[valid], minlength=6))
    np.testing.assert_array_equal(routing.importance, routing.load)
    assert routing.losses == {} and router.ops_per_token(32) == 0 and router.weights == []


def test_the_ids_are_required_and_must_be_integers():
    layer = tf_moe.MoELayer(4, None, 8, router="hash")
    x = np.zeros((2, 3, 5), "float32")
    with pytest.raises(ValueError, match="token_ids"):
        layer(x)
    with pytest.raises(TypeError, match="token_ids"):
        layer(x, token_ids=np.zeros((2, 3), "float32"))
    with pytest.raises(ValueError, match="z_loss_weight"):
        tf_moe.HashRouter(4, z_loss_weight=1e-3)
    with pytest.raises(ValueError, match="`k`"):
        routers.get("hash", 4, 2)
    assert "z_loss_weight" not in tf_moe.HashRouter(4).get_config()


def test_the_ids_must_be_one_per_token():
    """Fewer ids would leave tokens at output 0, more would index past the batch."""
    layer = tf_moe.MoELayer(4, None, 16, router="hash")
    x = np.random.default_rng(0).standard_normal((2, 3, 8)).astype("float32")
    for ids in (np.array([[1, 2], [3, 4]]), np.arange(8).reshape(2, 4), np.arange(6).reshape(3, 2), np.arange(6)):
        with pytest.raises(ValueError, match="`token_ids` must have the shape of `inputs`"):
            layer(x, token_ids=ids)
    with pytest.raises(ValueError, match="`token_ids` must have the shape of `inputs`"):
        layer(x, token_ids=np.zeros((2, 3, 1), "int32"))  # the router's own check: [tokens]
    router = tf_moe.HashRouter(4)
    with pytest.raises(ValueError, match="`token_ids` must have the shape of `inputs`"):
        router(x.reshape(6, 8), token_ids=np.arange(4))
    # Shapes known only when the graph runs: the same message from the graph.
    step = tf.function(
        lambda t, ids: layer(t, token_ids=ids),
        input_signature=[tf.TensorSpec([None, None, 8]), tf.TensorSpec([None, None], tf.int32)],
    )
    assert step(x, np.ones((2, 3), "int32")).shape == (2, 3, 8)
    with pytest.raises(tf.errors.InvalidArgumentError, match="`token_ids` must have the shape of `inputs`"):
        step(x, np.ones((2, 4), "int32"))


def test_ids_passed_as_none_get_the_routers_message():
    layer = tf_moe.MoELayer(4, None, 16, router="hash")
    with pytest.raises(ValueError, match="HashRouter routes by token id: pass `token_ids`"):
        layer(np.zeros((2, 3, 8), "float32"), token_ids=None)


def test_moe_output_equals_the_dense_reference():
    layer = tf_moe.MoELayer(4, 1, 7, router="hash")
    layer.build((None, 5))
    randomise_weights(layer, seed=1)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 8, 5)).astype("float32")
    ids = rng.integers(1, 300, (3, 8))
    gates = np.eye(4)[[ref.hash_expert(int(i), 4) for i in ids.ravel()]]
    e = layer.experts
    expected = ref.dense_moe(x.reshape(-1, 5), gates, e.kernel_in.numpy(), e.bias_in.numpy()[:, 0],
                             e.kernel_out.numpy(), e.bias_out.numpy()[:, 0])
    y = layer(x, token_ids=ids, training=True).numpy()
    np.testing.assert_allclose(y.reshape(-1, 5), expected, rtol=1e-5, atol=1e-5)
    assert [float(loss) for loss in layer.losses] == [0.0]  # nothing to balance


def test_a_keras_model_feeds_the_ids_trains_saves_and_reloads(tmp_path):
    ids_in = keras.Input((None,), dtype="int32", name="ids")
    x = keras.layers.Embedding(100, 8, mask_zero=True)(ids_in)
    moe = tf_moe.MoELayer(4, None, 16, router="hash", name="moe")
    logits = keras.layers.Dense(100)(moe(x, token_ids=ids_in))
    model = keras.Model(ids_in, logits)
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    ids = np.random.default_rng(3).integers(1, 100, (32, 6))
    ids[:, -2:] = 0  # padding: masked, never routed
    history = model.fit(ids, np.roll(ids, -1, axis=1), epochs=2, verbose=0).history
    assert history["moe_unrouted_fraction"] == [0.0, 0.0]
    real = ids[:, :-2].ravel()
    load = np.bincount([ref.hash_expert(int(i), 4) for i in real], minlength=4)
    moe.balance.reset_state()
    model.evaluate(ids, np.roll(ids, -1, axis=1), batch_size=32, verbose=0)
    assert float(moe.balance.result()["moe_max_over_mean_load"]) == pytest.approx(load.max() / load.mean(), rel=1e-5)
    path = os.path.join(tmp_path, "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path, safe_mode=True)
    np.testing.assert_array_equal(loaded.predict(ids, verbose=0), model.predict(ids, verbose=0))
    # The language model of the paper passes its input ids to a hash router.
    lm = tf_moe.models.lstm_lm(100, units=8, num_experts=4, k=1, expert_hidden_units=8, router="hash")
    assert lm(ids).shape == (32, 6, 100)
