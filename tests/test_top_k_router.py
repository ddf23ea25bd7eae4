"""TopKRouter: softmax top-k with the Switch `f . P` loss, against the numpy reference."""

import numpy as np
import pytest
import tensorflow as tf

import tf_moe
from tests import numpy_reference as ref
from tests.layer_test_case import randomise_weights


def _randomised(n=6, k=2, d=5, seed=0, **kwargs):
    router = tf_moe.TopKRouter(n, k, seed=seed, **kwargs)
    router.build((None, d))
    router.w_gate.assign(np.random.default_rng(seed).standard_normal((d, n)).astype("float32"))
    return router


def _dense(routing, num_tokens, n):
    dense = np.zeros((num_tokens, n + 1))
    np.add.at(dense, (np.asarray(routing.token_id), np.asarray(routing.expert_id)), np.asarray(routing.weight))
    return dense[:, :n]


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_routing_and_loss_match_the_reference(k, normalize):
    router = _randomised(k=k, normalize=normalize, balance_weight=0.3)
    x = np.random.default_rng(1).standard_normal((24, 5)).astype("float32")
    routing = router(x, training=True)
    p, gates, choices = ref.top_k_routing(x, router.w_gate.numpy(), k, normalize)
    np.testing.assert_allclose(_dense(routing, 24, 6), gates, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(routing.importance, gates.sum(axis=0), rtol=1e-5)
    np.testing.assert_array_equal(routing.load, (gates > 0).sum(axis=0))
    np.testing.assert_allclose(
        float(routing.losses["load_balancing"]), ref.switch_balance_loss(p, choices, 0.3), rtol=1e-5
    )
    # All first choices first, best first.
    np.testing.assert_array_equal(np.asarray(routing.expert_id).reshape(k, 24).T, choices)
    assert set(routing.losses) == {"load_balancing"} and routing.metrics == {}


def test_only_the_mean_probability_carries_gradient():
    router = _randomised(balance_weight=1.0)
    x = np.random.default_rng(2).standard_normal((32, 5)).astype("float32")
    with tf.GradientTape() as tape:
        loss = router(x, training=True).losses["load_balancing"]
    grad = tape.gradient(loss, router.w_gate)
    _, _, choices = ref.top_k_routing(x, router.w_gate.numpy(), 2)
    f = np.array([np.sum(choices == i) for i in range(6)]) / (2 * 32)
    # d/dW of E * sum_i f_i * mean_t softmax(x W)_t,i with f held constant.
    p = ref.softmax(x @ router.w_gate.numpy())
    dlogits = 6 * p * (f[None, :] - (p * f[None, :]).sum(axis=1, keepdims=True)) / 32
    np.testing.assert_allclose(grad, x.T @ dlogits, rtol=1e-4, atol=1e-7)


def test_masked_tokens_are_not_routed_and_not_counted():
    router = _randomised(balance_weight=0.2)
    x = np.random.default_rng(3).standard_normal((24, 5)).astype("float32")
    valid = np.arange(24) % 4 != 1
    poisoned = x.copy()
    poisoned[~valid] = np.nan
    routing = router(poisoned, mask=valid, training=True)
    alone = router(x[valid], training=True)
    expert_id = np.asarray(routing.expert_id)
    assert np.all(expert_id[~valid[np.asarray(routing.token_id)]] == 6)
    np.testing.assert_allclose(_dense(routing, 24, 6)[valid], _dense(alone, valid.sum(), 6), rtol=1e-6)
    for field in ("importance", "load"):
        np.testing.assert_allclose(getattr(routing, field), getattr(alone, field), rtol=1e-6)
    np.testing.assert_allclose(routing.losses["load_balancing"], alone.losses["load_balancing"], rtol=1e-6)


def test_jitter_multiplies_the_input_by_uniform_noise_while_training():
    """With W = [I | 0], log(p_j / p_last) = x_j u_j recovers each factor u."""
    d, eps = 5, 0.2
    router = tf_moe.TopKRouter(d + 1, d + 1, jitter_epsilon=eps, seed=3)
    router.build((None, d))
    router.w_gate.assign(np.concatenate([np.eye(d), np.zeros((d, 1))], axis=1).astype("float32"))
    x = np.random.default_rng(4).uniform(0.5, 2.0, (400, d)).astype("float32")

    def factors(training):
        p = _dense(router(x, training=training), 400, d + 1)
        return np.log(p[:, :d] / p[:, d:]) / x

    u = factors(True)
    assert np.all(u > 1 - eps - 1e-4) and np.all(u < 1 + eps + 1e-4)
    assert u.std() == pytest.approx(2 * eps / np.sqrt(12), rel=0.1)  # uniform's std
    np.testing.assert_allclose(factors(False), 1.0, atol=1e-4)  # none at inference
    assert not np.allclose(factors(True), u)  # fresh draws each call


def test_moe_output_equals_the_dense_reference():
    layer = tf_moe.MoELayer(6, 2, 7, router="top_k")
    layer.build((None, 5))
    randomise_weights(layer, seed=5)
    x = np.random.default_rng(5).standard_normal((30, 5)).astype("float32")
    _, gates, _ = ref.top_k_routing(x, layer.router.w_gate.numpy(), 2)
    e = layer.experts
    expected = ref.dense_moe(x, gates, e.kernel_in.numpy(), e.bias_in.numpy()[:, 0], e.kernel_out.numpy(),
                             e.bias_out.numpy()[:, 0])
    np.testing.assert_allclose(layer(x, training=True).numpy(), expected, rtol=1e-5, atol=1e-5)
    # Its own loss only, no CV^2 loss: the aux loss is the router's.
    (loss,) = layer.losses
    np.testing.assert_allclose(float(loss), float(layer.router(x).losses["load_balancing"]), rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs,arg",
    [
        (dict(num_experts=4, k=5), "`k`"),
        (dict(num_experts=4, k=2, balance_weight=-1.0), "`balance_weight`"),
        (dict(num_experts=4, k=2, jitter_epsilon=1.0), "`jitter_epsilon`"),
        (dict(num_experts=4, k=2, jitter_epsilon=float("nan")), "`jitter_epsilon`"),
        (dict(num_experts=4, k=2, z_loss_weight=-1.0), "`z_loss_weight`"),
        (dict(num_experts=4, k=2, normalize="yes"), "`normalize`"),
        (dict(num_experts=4, k=2, normalize=1), "`normalize`"),
    ],
)
def test_bad_configurations(kwargs, arg):
    with pytest.raises(ValueError, match=arg):
        tf_moe.TopKRouter(**kwargs)


def test_config_round_trip_and_ops():
    router = tf_moe.TopKRouter(6, 3, normalize=True, balance_weight=0.1, jitter_epsilon=0.05, seed=4,
                               z_loss_weight=1e-3, name="r")
    clone = tf_moe.TopKRouter.from_config(router.get_config())
    assert clone.get_config() == router.get_config()
    assert (clone.k, clone.normalize, clone.jitter_epsilon, clone.z_loss_weight) == (3, True, 0.05, 1e-3)
    assert router.ops_per_token(10) == 60



def test_is_the_layers_default_and_its_loss_the_layers_only_one():
    layer = tf_moe.MoELayer(6, 2, 8)
    router = layer.router
    assert type(router) is tf_moe.TopKRouter and not router.normalize and router.balance_weight == 1e-2
    assert router.jitter_epsilon == 0.0 and router.z_loss_weight == 0.0
    assert layer.importance_weight is None and layer.load_weight is None
    layer.build((None, 5))
    router.w_gate.assign(np.random.default_rng(2).standard_normal((5, 6)).astype("float32"))
    x = np.random.default_rng(3).standard_normal((3, 8, 5)).astype("float32")
    out = layer(x, training=True)
    p, gates, choices = ref.top_k_routing(x.reshape(-1, 5), router.w_gate.numpy(), 2, False)
    # The CV^2 losses of `importance_weight` and `load_weight` are not added on top of it.
    assert len(layer.losses) == 1
    np.testing.assert_allclose(float(layer.losses[0]), ref.switch_balance_loss(p, choices, 1e-2), rtol=1e-5)
    every_expert = np.asarray(layer.experts(np.broadcast_to(x.reshape(1, -1, 5), (6, 24, 5))))
    expected = np.einsum("te,eto->to", gates, every_expert).reshape(3, 8, 5)
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-4, atol=1e-5)
    # The paper's exact gating stays one argument away.
    paper = tf_moe.MoELayer(6, 2, 8, router="noisy_top_k")
    assert type(paper.router) is tf_moe.NoisyTopKRouter and paper.router.noisy and paper.importance_weight == 0.1
