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
from tf_moe.layers import router_registry


@keras.saving.register_keras_serializable(package="tf_moe_tests")
class TokenIdRouter(tf_moe.Router):
    """Token t goes to expert `token_ids[t] % n` with weight 1 (a fixed hash)."""

    metric_names = ("routed_tokens",)
    loss_names = ("scale",)
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
        return 0  # no gate matmul


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


def test_moe_layer_rejects_losses_other_than_declared():
    class Undeclared(TokenIdRouter):
        loss_names = ("z_loss",)

    layer = tf_moe.MoELayer(hidden_units=5, router=Undeclared(3))
    with pytest.raises(ValueError, match="not among its `loss_names`"):
        layer(np.zeros((2, 4), "float32"), token_ids=np.zeros(2, "int32"))


def test_routers_register_themselves_by_name():
    assert routers.NAMES == tuple(sorted(
        ("noisy_top_k", "softmax", "batchwise", "switch", "top_k", "top_k_gate", "expert_choice", "loss_free", "hash")))
    assert routers.ONE_EXPERT == ("hash", "switch")

    @router_registry.register_router("test_token_id", k=router_registry.K_ONE)
    class Registered(TokenIdRouter):
        pass

    try:
        assert type(routers.get("test_token_id", 5)) is Registered
        layer = tf_moe.MoELayer(num_experts=5, hidden_units=3, router="test_token_id")
        assert type(layer.router) is Registered and layer.k == 1
        with pytest.raises(ValueError, match="already registered"):
            router_registry.register_router("test_token_id")(TokenIdRouter)
    finally:
        router_registry._ROUTERS.pop("test_token_id")


def test_base_router_requires_call_and_counts_a_gate_matmul():
    router = tf_moe.Router(4, 2)
    with pytest.raises(NotImplementedError, match="Routing"):
        router.call(tf.zeros((2, 3)))
    assert router.ops_per_token(3) == 3 * 4


@keras.saving.register_keras_serializable(package="tf_moe_tests")
class RoundRobinRouter(tf_moe.Router):
    """The least a router can be: only `call`. Token t's choice j is expert (t + j) % n, weight 1/k."""

    uses_balancing_loss = False
    has_logits = False

    def call(self, inputs, training=None, mask=None):
        _, valid = self.masked_tokens(inputs, mask)
        tokens = tf.shape(inputs)[0]
        token_id = tf.tile(tf.range(tokens), [self.k])
        expert_id = (token_id + tf.repeat(tf.range(self.k), tokens)) % self.num_experts
        if valid is not None:
            expert_id = tf.where(tf.gather(valid, token_id), expert_id, self.num_experts)
        weight = tf.where(expert_id < self.num_experts, 1.0 / self.k, 0.0)
        load = tf.math.unsorted_segment_sum(tf.ones_like(weight), expert_id, self.num_experts + 1)
        return tf_moe.Routing(
            token_id=token_id, expert_id=expert_id, weight=weight,
            importance=load[:-1] / self.k, load=load[:-1], dropped=tf.zeros(()), losses={}, metrics={},
        )


def test_a_minimal_router_subclass_saves_and_reloads(tmp_path):
    router = RoundRobinRouter(5, 2, name="round_robin")
    assert {"num_experts": 5, "k": 2}.items() <= router.get_config().items()
    clone = RoundRobinRouter.from_config(router.get_config())
    assert (clone.num_experts, clone.k) == (5, 2)
    inputs = keras.Input((3, 4))
    model = keras.Model(inputs, tf_moe.MoELayer(hidden_units=6, router=router, name="moe")(inputs))
    randomise_weights(model.get_layer("moe"), seed=3)
    x = np.random.default_rng(0).standard_normal((2, 3, 4)).astype("float32")
    path = os.path.join(tmp_path, "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path, safe_mode=True)
    assert (loaded.get_layer("moe").router.num_experts, loaded.get_layer("moe").router.k) == (5, 2)
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))


def test_router_configs_hold_num_experts_and_k_where_the_constructor_takes_them():
    """Each config is exactly what the constructor takes: it rebuilds the router."""
    made = [
        (tf_moe.NoisyTopKRouter(6, 2), {"num_experts": 6, "k": 2}),
        (tf_moe.TopKRouter(6, 3), {"num_experts": 6, "k": 3}),
        (tf_moe.BatchwiseRouter(6, 2), {"num_experts": 6, "k": 2}),
        (tf_moe.LossFreeRouter(6, 2), {"num_experts": 6, "k": 2}),
        (tf_moe.SoftmaxRouter(6), {"num_experts": 6}),
        (tf_moe.SwitchRouter(6), {"num_experts": 6}),
        (tf_moe.HashRouter(6), {"num_experts": 6}),
        (tf_moe.ExpertChoiceRouter(6, 1.5), {"num_experts": 6}),
        (tf_moe.HierarchicalRouter(2, 3), {}),
        (TokenIdRouter(6), {"num_experts": 6}),
    ]
    for router, expected in made:
        config = router.get_config()
        assert {key: config[key] for key in ("num_experts", "k") if key in config} == expected, type(router)
        clone = type(router).from_config(config)
        assert (clone.num_experts, clone.k) == (router.num_experts, router.k)
        assert clone.get_config() == config


@pytest.mark.parametrize(
    "name, cls, k",
    [("noisy_top_k", tf_moe.NoisyTopKRouter, 2), ("softmax", tf_moe.SoftmaxRouter, 6),
     ("batchwise", tf_moe.BatchwiseRouter, 2), ("switch", tf_moe.SwitchRouter, 1),
     ("top_k", tf_moe.TopKRouter, 2), ("expert_choice", tf_moe.ExpertChoiceRouter, 2),
     ("loss_free", tf_moe.LossFreeRouter, 2), ("hash", tf_moe.HashRouter, 1)],
)
def test_routers_by_name(name, cls, k):
    assert name in routers.NAMES
    router = routers.get(name, num_experts=6, k=None if name in ("softmax", "switch", "hash") else 2)
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


_WITH_LOGITS = {
    "noisy_top_k": lambda w: tf_moe.NoisyTopKRouter(4, 2, seed=0, z_loss_weight=w),
    "softmax": lambda w: tf_moe.SoftmaxRouter(4, z_loss_weight=w),
    "batchwise": lambda w: tf_moe.BatchwiseRouter(4, 2, z_loss_weight=w),
    # Without jitter: while training the logits are those of the jittered input.
    "switch": lambda w: tf_moe.SwitchRouter(4, jitter_epsilon=0.0, z_loss_weight=w),
    "top_k": lambda w: tf_moe.TopKRouter(4, 2, z_loss_weight=w),
    "expert_choice": lambda w: tf_moe.ExpertChoiceRouter(4, z_loss_weight=w),
    "loss_free": lambda w: tf_moe.LossFreeRouter(4, 2, z_loss_weight=w),
}


@pytest.mark.parametrize("kind", sorted(_WITH_LOGITS))
@pytest.mark.parametrize("training", [False, True])
def test_every_router_with_logits_takes_a_z_loss_on_x_w_g(kind, training):
    """ST-MoE's z-loss (Zoph et al. 2022, section 3.1) on the router's clean
    logits `x W_g`, over the unmasked tokens only; absent with weight 0."""
    router = _WITH_LOGITS[kind](0.3)
    router.build((None, 5))
    randomise_weights(router, seed=1, scale=1.0)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((16, 5)).astype("float32")
    valid = np.arange(16) % 4 != 0
    poisoned = x.copy()
    poisoned[~valid] = np.nan
    routing = router(poisoned, mask=valid, training=training)
    expected = 0.3 * ref.z_loss(x[valid] @ router.w_gate.numpy())
    np.testing.assert_allclose(float(routing.losses["z_loss"]), expected, rtol=1e-5)
    assert router.get_config()["z_loss_weight"] == 0.3
    off = _WITH_LOGITS[kind](0.0)
    off.build((None, 5))
    assert "z_loss" not in off(x, training=training).losses


def test_hierarchical_z_loss_is_the_sum_of_both_levels():
    router = tf_moe.HierarchicalRouter(2, 3, 1, 2, noisy=False, z_loss_weight=0.5)
    router.build((None, 5))
    randomise_weights(router, seed=3, scale=1.0)
    x = np.random.default_rng(4).standard_normal((12, 5)).astype("float32")
    routing = router(x, training=True)
    primary = x @ router.primary.w_gate.numpy()
    group = primary.argmax(axis=1)
    secondary = np.stack([x[t] @ router.w_gate.numpy()[group[t]] for t in range(12)])
    expected = 0.5 * (ref.z_loss(primary) + ref.z_loss(secondary))
    np.testing.assert_allclose(float(routing.losses["z_loss"]), expected, rtol=1e-5)


def test_the_z_loss_reaches_moe_layer_and_shrinks_the_logits():
    layer = tf_moe.MoELayer(hidden_units=4, router=tf_moe.TopKRouter(4, 2, balance_weight=0.0, z_loss_weight=1.0))
    layer.build((None, 5))
    randomise_weights(layer.router, seed=5, scale=3.0)
    x = tf.constant(np.random.default_rng(5).standard_normal((32, 5)).astype("float32"))
    before = float(tf.reduce_mean(tf.abs(tf.matmul(x, layer.router.w_gate))))
    optimizer = keras.optimizers.SGD(0.05)
    for _ in range(20):
        with tf.GradientTape() as tape:
            layer(x, training=True)
            loss = tf.add_n(layer.losses)
        optimizer.apply_gradients([(tape.gradient(loss, layer.router.w_gate), layer.router.w_gate)])
    after = float(tf.reduce_mean(tf.abs(tf.matmul(x, layer.router.w_gate))))
    assert after < 0.7 * before
