"""The router contract: `Routing`, the `Router` base layer, routers by name.

A router written only against the contract (here one that routes by token
id, an extra call argument, with a loss and a metric of its own and no
balancing loss) must work in `MoELayer` with no change to the layer.
"""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_moe
from tests import numpy_reference as ref
from tests.layer_test_case import randomise_weights
from tf_moe import routers


@keras.saving.register_keras_serializable(package="tf_moe_tests")
class TokenIdRouter(tf_moe.Router):
    """Token t goes to expert `token_ids[t] % n` with weight 1 (a fixed hash)."""

    metric_names = ("routed_tokens",)
    uses_balancing_loss = False

    def __init__(self, num_experts, **kwargs):
        super().__init__(num_experts, 1, **kwargs)

    def build(self, input_shape):
        self.check_input_shape(input_shape)
        self.scale = self.add_weight(name="scale", shape=(), initializer="ones")

    def call(self, inputs, training=None, mask=None, token_ids=None):
        _, valid = self.masked_tokens(inputs, mask)
        expert_id = tf.math.floormod(tf.cast(token_ids, tf.int32), self.num_experts)
        if valid is not None:
            expert_id = tf.where(valid, expert_id, self.num_experts)
        routed = tf.cast(expert_id < self.num_experts, tf.float32)
        load = tf.math.unsorted_segment_sum(routed, expert_id, self.num_experts + 1)[: self.num_experts]
        weight = routed * self.scale
        return tf_moe.Routing(
            token_id=tf.range(tf.shape(expert_id)[0]),
            expert_id=expert_id,
            weight=weight,
            importance=load,
            load=load,
            dropped=tf.zeros(()),
            losses={"scale": tf.square(self.scale - 2.0)},
            metrics={"routed_tokens": tf.reduce_sum(routed)},
        )

    def ops_per_token(self, input_units):
        return 0

    def get_config(self):
        config = super().get_config()
        config["num_experts"] = self.num_experts
        return config


def _layer(seed=0):
    layer = tf_moe.MoELayer(hidden_units=5, router=TokenIdRouter(3), name="hashed")
    layer.build((None, 4))
    randomise_weights(layer, seed)
    layer.router.scale.assign(1.5)
    return layer


def _experts_reference(layer, x, token_ids, scale):
    e = layer.experts
    gates = np.eye(3)[token_ids.reshape(-1) % 3] * scale
    out = ref.dense_moe(
        x.reshape(-1, 4), gates, e.kernel_in.numpy(), e.bias_in.numpy()[:, 0], e.kernel_out.numpy(),
        e.bias_out.numpy()[:, 0],
    )
    return out.reshape(x.shape[:-1] + (-1,))


def test_a_router_written_against_the_contract_works_in_moe_layer():
    layer = _layer()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 5, 4)).astype("float32")
    token_ids = rng.integers(0, 100, (2, 5)).astype("int32")
    y = layer(x, training=True, token_ids=token_ids)  # flattened per token like x
    np.testing.assert_allclose(np.asarray(y), _experts_reference(layer, x, token_ids, 1.5), rtol=1e-5, atol=1e-5)
    # Its own loss only: no balancing loss for this router.
    (loss,) = layer.losses
    assert float(loss) == pytest.approx(0.25)
    result = {key.removeprefix("hashed_"): float(v) for key, v in layer.balance.result().items()}
    assert result["routed_tokens"] == 10.0 and result["aux_loss"] == pytest.approx(0.25)
    assert layer.ops_per_token() == 1 * (4 * 5 + 5 * 4)


def test_the_contract_router_trains_saves_and_reloads(tmp_path):
    x_in = keras.Input((5, 4))
    ids_in = keras.Input((5,), dtype="int32")
    layer = tf_moe.MoELayer(hidden_units=5, router=TokenIdRouter(3), name="hashed")
    model = keras.Model([x_in, ids_in], layer(x_in, token_ids=ids_in))
    rng = np.random.default_rng(1)
    x = rng.standard_normal((8, 5, 4)).astype("float32")
    ids = rng.integers(0, 100, (8, 5)).astype("int32")
    model.compile(keras.optimizers.SGD(0.1), "mse")
    history = model.fit([x, ids], x, epochs=2, verbose=0).history
    assert history["hashed_routed_tokens"] == [40.0, 40.0]
    path = os.path.join(tmp_path, "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path, safe_mode=True)
    np.testing.assert_array_equal(loaded.predict([x, ids], verbose=0), model.predict([x, ids], verbose=0))


def test_routing_is_a_nested_structure():
    router = tf_moe.NoisyTopKRouter(4, 2, seed=0)
    x = tf.random.stateless_normal((6, 3), seed=[1, 2])
    routing = tf.function(lambda t: router(t, training=True))(x)
    assert isinstance(routing, tf_moe.Routing)
    assert len(tf.nest.flatten(routing)) == 6 + len(router.metric_names)
    assert routing.token_id.dtype == tf.int32 and routing.expert_id.dtype == tf.int32
    assert routing.weight.dtype == tf.float32 and routing.dropped.shape == ()


def test_moe_layer_rejects_metrics_other_than_declared():
    class Undeclared(TokenIdRouter):
        metric_names = ("something_else",)

    layer = tf_moe.MoELayer(hidden_units=5, router=Undeclared(3))
    with pytest.raises(ValueError, match="metric_names"):
        layer(np.zeros((2, 4), "float32"), token_ids=np.zeros(2, "int32"))


def test_base_router_requires_call_and_ops():
    router = tf_moe.Router(4, 2)
    with pytest.raises(NotImplementedError, match="Routing"):
        router.call(tf.zeros((2, 3)))
    with pytest.raises(NotImplementedError, match="ops_per_token"):
        router.ops_per_token(3)


@pytest.mark.parametrize(
    "name, cls, k",
    [("noisy_top_k", tf_moe.NoisyTopKRouter, 2), ("softmax", tf_moe.SoftmaxRouter, 6),
     ("batchwise", tf_moe.BatchwiseRouter, 2)],
)
def test_routers_by_name(name, cls, k):
    router = routers.get(name, num_experts=6, k=2 if name != "softmax" else None)
    assert type(router) is cls and (router.num_experts, router.k) == (6, k)
    assert routers.get(router) is router
    clone = routers.get(keras.layers.serialize(router))
    assert type(clone) is cls and clone.get_config() == router.get_config()


def test_bad_router_identifiers():
    with pytest.raises(ValueError, match="HierarchicalRouter\\(num_groups"):
        routers.get("hierarchical", 8, 2)
    with pytest.raises(ValueError, match="one of"):
        routers.get("top_p", 8, 1)
    with pytest.raises(ValueError, match="`num_experts` and `k`"):
        routers.get("noisy_top_k", 8)
    with pytest.raises(TypeError, match="Router"):
        routers.get(keras.layers.serialize(keras.layers.Dense(3)))
