"""NoisyTopKRouter (section 2.1) and its diagnostics against the numpy reference."""

import math

import numpy as np
import pytest
import tensorflow as tf

import tf_moe
from tests import numpy_reference as ref

EPS = 1e-2


def _randomised(n=6, k=2, d=5, seed=0, **kwargs):
    router = tf_moe.NoisyTopKRouter(n, k, noise_epsilon=EPS, seed=seed, **kwargs)
    router.build((None, d))
    rng = np.random.default_rng(seed)
    router.w_gate.assign(rng.standard_normal((d, n)).astype("float32"))
    router.w_noise.assign(rng.standard_normal((d, n)).astype("float32") * 0.5)
    return router


def _draws(t=24, d=5, n=6, seed=1):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((t, d)).astype("float32"), rng.standard_normal((t, n)).astype("float32")


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("k", [1, 2, 5])
def test_routing_matches_section_2_1_and_appendix_a(train, k):
    router = _randomised(k=k)
    x, noise = _draws()
    routing = router(x, training=train, noise=noise)
    w_gate, w_noise = router.w_gate.numpy(), router.w_noise.numpy()
    h, gates, stddev = ref.noisy_top_k(x, w_gate, w_noise, noise, k, EPS, train=train)
    np.testing.assert_allclose(ref.routing_gates(routing, 24, 6), gates, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(routing.importance, gates.sum(axis=0), rtol=1e-5)
    if train:
        load = ref.smooth_load(x, w_gate, h, stddev, k)
    else:
        load = (gates > 0).sum(axis=0)
    np.testing.assert_allclose(routing.load, load, rtol=1e-4, atol=1e-5)
    # All first choices come first, best first.
    expert_id = np.asarray(routing.expert_id).reshape(k, 24)
    np.testing.assert_array_equal(expert_id[0], h.argmax(axis=1))
    np.testing.assert_array_equal(np.asarray(routing.token_id), np.tile(np.arange(24), k))
    assert float(routing.dropped) == 0.0 and routing.losses == {}


def test_masked_tokens_are_not_routed_and_not_counted():
    router = _randomised()
    x, noise = _draws()
    valid = np.arange(24) % 4 != 0
    poisoned, poisoned_noise = x.copy(), noise.copy()
    poisoned[~valid], poisoned_noise[~valid] = np.nan, np.nan
    routing = router(poisoned, training=True, mask=valid, noise=poisoned_noise)
    alone = router(x[valid], training=True, noise=noise[valid])
    token_id, expert_id = np.asarray(routing.token_id), np.asarray(routing.expert_id)
    assert np.all(expert_id[~valid[token_id]] == 6)
    np.testing.assert_allclose(ref.routing_gates(routing, 24, 6)[valid], ref.routing_gates(alone, valid.sum(), 6), rtol=1e-6)
    for field in ("importance", "load"):
        np.testing.assert_allclose(getattr(routing, field), getattr(alone, field), rtol=1e-5)
    for name in router.metric_names:
        np.testing.assert_allclose(routing.metrics[name], alone.metrics[name], rtol=1e-5)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_topk_agreement_and_noise_to_signal_match_the_reference(k):
    router = _randomised(k=k)
    x, noise = _draws(t=40)
    noise = noise * 3.0  # enough noise to change some top-k sets
    valid = np.arange(40) % 5 != 1
    routing = router(x, training=True, mask=valid, noise=noise)
    w_gate, w_noise = router.w_gate.numpy(), router.w_noise.numpy()
    h, _, stddev = ref.noisy_top_k(x, w_gate, w_noise, noise, k, EPS)
    clean = x @ w_gate
    agreement = ref.topk_agreement(h, clean, k, valid)
    assert 0.0 < agreement < 1.0
    np.testing.assert_allclose(float(routing.metrics["topk_agreement"]), agreement, rtol=1e-6)
    np.testing.assert_allclose(
        float(routing.metrics["noise_to_signal"]), ref.noise_to_signal(stddev, clean, valid), rtol=1e-5
    )
    # At inference nothing is perturbed, but the ratio still says how much
    # noise training would add on these tokens.
    inference = router(x, training=False, mask=valid)
    assert float(inference.metrics["topk_agreement"]) == 1.0
    np.testing.assert_allclose(
        float(inference.metrics["noise_to_signal"]), ref.noise_to_signal(stddev, clean, valid), rtol=1e-5
    )


def test_diagnostics_at_initialisation_and_without_noise():
    x, noise = _draws()
    router = tf_moe.NoisyTopKRouter(6, 2, seed=0)
    routing = router(x, training=True)
    # Zero W_g: every clean logit ties, the noise alone decides.
    assert math.isinf(float(routing.metrics["noise_to_signal"]))
    silent = _randomised(noisy=False)
    for training in (True, False):
        metrics = silent(x, training=training).metrics
        assert float(metrics["topk_agreement"]) == 1.0
        assert float(metrics["noise_to_signal"]) == 0.0
    # A batch with no valid token has nothing to compare.
    empty = _randomised()(x, training=True, mask=np.zeros(24, bool), noise=noise).metrics
    assert float(empty["topk_agreement"]) == 1.0 and float(empty["noise_to_signal"]) == 0.0


def test_moe_logs_average_finite_diagnostics_only():
    """The init batch's inf ratio is left out of the logged average; its
    agreement (clean ties rank experts 0..k-1) is averaged in."""
    layer = tf_moe.MoELayer(hidden_units=4, router=tf_moe.NoisyTopKRouter(6, 2, noise_epsilon=EPS, seed=0))
    x, noise = _draws()
    w_noise = np.zeros((5, 6))
    layer(x, training=True, noise=noise)  # zero W_g: ratio inf
    w_gate = np.random.default_rng(3).standard_normal((5, 6)).astype("float32")
    layer.router.w_gate.assign(w_gate)
    layer(x, training=True, noise=noise)
    all_tokens = np.ones(24, bool)
    h0, _, _ = ref.noisy_top_k(x, np.zeros((5, 6)), w_noise, noise, 2, EPS)
    h1, _, stddev = ref.noisy_top_k(x, w_gate, w_noise, noise, 2, EPS)
    result = layer.balance.result()
    np.testing.assert_allclose(
        float(result[f"{layer.name}_noise_to_signal"]), ref.noise_to_signal(stddev, x @ w_gate, all_tokens), rtol=1e-5
    )
    expected_agreement = np.mean([
        ref.topk_agreement(h0, np.zeros((24, 6)), 2, all_tokens),
        ref.topk_agreement(h1, x @ w_gate, 2, all_tokens),
    ])
    np.testing.assert_allclose(float(result[f"{layer.name}_topk_agreement"]), expected_agreement, rtol=1e-6)


def test_seeded_noise_is_reproducible_and_differs_between_seeds():
    x, _ = _draws()

    def draw(seed):
        router = tf_moe.NoisyTopKRouter(6, 2, seed=seed)
        router.build((None, 5))
        router.w_noise.assign(np.ones((5, 6), "float32"))
        return np.asarray(router(x, training=True).expert_id)

    np.testing.assert_array_equal(draw(5), draw(5))
    assert not np.array_equal(draw(5), draw(6))


def test_gradients_of_the_balancing_quantities_reach_both_weights():
    router = _randomised()
    x, noise = _draws()
    with tf.GradientTape() as tape:
        routing = router(x, training=True, noise=noise)
        loss = tf_moe.cv_squared(routing.importance) + tf_moe.cv_squared(routing.load)
    for grad in tape.gradient(loss, [router.w_gate, router.w_noise]):
        assert grad is not None and np.all(np.isfinite(grad)) and np.any(np.asarray(grad) != 0)


def test_ops_per_token_is_the_gate_matmul():
    assert tf_moe.NoisyTopKRouter(8, 2).ops_per_token(32) == 32 * 8


@pytest.mark.parametrize(
    "kwargs,arg",
    [
        (dict(num_experts=4, k=5), "`k`"),
        (dict(num_experts=0, k=1), "`num_experts`"),
        (dict(num_experts=4, k=2, noise_epsilon=-1.0), "`noise_epsilon`"),
        (dict(num_experts=4, k=2, noise_epsilon=float("inf")), "`noise_epsilon`"),
        (dict(num_experts=4, k=2, learning_rate_multiplier=0.0), "`learning_rate_multiplier`"),
        (dict(num_experts=4, k=2, learning_rate_multiplier=float("nan")), "`learning_rate_multiplier`"),
    ],
)
def test_bad_configurations(kwargs, arg):
    with pytest.raises(ValueError, match=arg):
        tf_moe.NoisyTopKRouter(**kwargs)


def test_config_round_trip():
    router = tf_moe.NoisyTopKRouter(
        6, 3, noisy=False, noise_epsilon=0.2, seed=7, learning_rate_multiplier=4.0, name="r"
    )
    clone = tf_moe.NoisyTopKRouter.from_config(router.get_config())
    assert (clone.num_experts, clone.k, clone.noisy, clone.noise_epsilon, clone.seed) == (6, 3, False, 0.2, 7)
    assert clone.learning_rate_multiplier == 4.0
    assert clone.get_config() == router.get_config()


@pytest.mark.parametrize("multiplier", [0.5, 10.0])
def test_learning_rate_multiplier_keeps_the_function_and_scales_adam_steps(multiplier):
    x, noise = _draws()
    plain = _randomised()
    fast = _randomised(learning_rate_multiplier=multiplier)
    # Stored weights W / m give the same function as W at multiplier 1.
    fast.w_gate.assign(plain.w_gate.numpy() / multiplier)
    fast.w_noise.assign(plain.w_noise.numpy() / multiplier)
    fast_routing, plain_routing = (router(x, training=True, noise=noise) for router in (fast, plain))
    for field in ("expert_id", "weight", "importance", "load"):
        np.testing.assert_allclose(getattr(fast_routing, field), getattr(plain_routing, field), rtol=1e-5, atol=1e-6)

    # One Adam step on the balancing loss moves the effective W m times as far.
    moved = {}
    for router in (plain, fast):
        before = [router.w_gate.numpy() * router.learning_rate_multiplier,
                  router.w_noise.numpy() * router.learning_rate_multiplier]
        optimizer = tf.keras.optimizers.Adam(1e-3, epsilon=1e-12)
        with tf.GradientTape() as tape:
            routing = router(x, training=True, noise=noise)
            loss = tf_moe.cv_squared(routing.importance) + tf_moe.cv_squared(routing.load)
        variables = [router.w_gate, router.w_noise]
        optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
        after = [router.w_gate.numpy() * router.learning_rate_multiplier,
                 router.w_noise.numpy() * router.learning_rate_multiplier]
        moved[router.learning_rate_multiplier] = [a - b for a, b in zip(after, before)]
    for fast_step, plain_step in zip(moved[multiplier], moved[1.0]):
        assert np.abs(plain_step).max() > 1e-4
        np.testing.assert_allclose(fast_step, multiplier * plain_step, rtol=1e-3, atol=1e-9)
