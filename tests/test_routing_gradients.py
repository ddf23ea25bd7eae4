"""Gradients of the routing maths against finite differences of the numpy references.

Each router's TensorFlow gradient (of its gates, its load estimate or its
loss, weighted by a random probe) with respect to its weights must equal
central differences of the float64 numpy transcription of the paper's
equations (tests/numpy_reference.py): the smooth load and the noisy
gating of Shazeer et al. 2017 (section 2.1, appendix A), the hierarchical
gates and load (appendix B), expert choice (Zhou et al. 2022), DeepSeek-V3's
sequence-wise balance loss and the Switch `f . P` loss with the router
z-loss (Fedus et al. 2022; Zoph et al. 2022). Noise draws are given, so
both sides see the same H(x).
"""

import numpy as np
import pytest
import tensorflow as tf

import tf_moe
from tests import numpy_reference as ref

T, D = 6, 3


def _inputs(seed, *shapes):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape) for shape in shapes]


def _weights(variables, seed):
    """Gives `variables` random values; returns them as float64 arrays."""
    rng = np.random.default_rng(seed)
    values = []
    for weight in variables:
        value = rng.standard_normal(weight.shape)
        weight.assign(value.astype("float32"))
        values.append(value)
    return values


def _tf_gradient(variables, objective):
    with tf.GradientTape() as tape:
        value = objective()
    return [np.asarray(g, np.float64) for g in tape.gradient(value, [v.value for v in variables])]


def _dense(routing, num_experts):
    """[T, n] gates of a Routing, differentiable (unrouted assignments add nothing)."""
    expert = tf.minimum(routing.expert_id, num_experts - 1)
    weight = tf.where(routing.expert_id < num_experts, routing.weight, 0.0)
    return tf.scatter_nd(tf.stack([routing.token_id, expert], axis=1), weight, [T, num_experts])


def _assert_gradients_equal(got, want):
    for g, w in zip(got, want):
        assert np.abs(w).max() > 1e-3, "a gradient that is all (near) zero checks nothing"
        np.testing.assert_allclose(g, w, rtol=2e-3, atol=2e-4 * np.abs(w).max())


@pytest.mark.parametrize("part", ["gates", "smooth_load"])
def test_noisy_top_k_gates_and_smooth_load(part):
    n, k, eps = 5, 2, 1e-2
    router = tf_moe.NoisyTopKRouter(n, k, noise_epsilon=eps)
    router.build((None, D))
    variables = [router.w_gate, router.w_noise]
    w_gate, w_noise = _weights(variables, seed=1)
    x, noise, probe = _inputs(2, (T, D), (T, n), (T, n) if part == "gates" else (n,))

    def reference(w_gate, w_noise):
        h, gates, stddev = ref.noisy_top_k(x, w_gate, w_noise, noise, k, eps)
        if part == "gates":
            return np.sum(probe * gates)
        return np.sum(probe * ref.smooth_load(x, w_gate, h, stddev, k))

    def objective():
        routing = router(tf.constant(x, tf.float32), training=True, noise=tf.constant(noise, tf.float32))
        if part == "gates":
            return tf.reduce_sum(probe * _dense(routing, n))
        return tf.reduce_sum(probe * routing.load)

    _assert_gradients_equal(_tf_gradient(variables, objective), ref.numeric_gradient(reference, [w_gate, w_noise]))


@pytest.mark.parametrize("part", ["gates", "load"])
def test_hierarchical_gates_and_load(part):
    a, b, k_primary, k_secondary, eps = 3, 3, 2, 2, 1e-2
    router = tf_moe.HierarchicalRouter(a, b, k_primary=k_primary, k_secondary=k_secondary, noise_epsilon=eps)
    router.build((None, D))
    variables = [router.primary.w_gate, router.primary.w_noise, router.w_gate, router.w_noise]
    weights = _weights(variables, seed=3)
    x, primary_noise, secondary_noise = _inputs(4, (T, D), (T, a), (T, a, b))
    probe = _inputs(5, (T, a * b) if part == "gates" else (a * b,))[0]

    def reference(*weights):
        gates, _, load, _ = ref.hierarchical_top_k(
            x, weights, (primary_noise, secondary_noise), k_primary, k_secondary, eps
        )
        return np.sum(probe * (gates if part == "gates" else load))

    def objective():
        noise = (tf.constant(primary_noise, tf.float32), tf.constant(secondary_noise, tf.float32))
        routing = router(tf.constant(x, tf.float32), training=True, noise=noise)
        return tf.reduce_sum(probe * (_dense(routing, a * b) if part == "gates" else routing.load))

    _assert_gradients_equal(_tf_gradient(variables, objective), ref.numeric_gradient(reference, weights))


def test_expert_choice_gates():
    n, capacity_factor = 4, 1.5
    router = tf_moe.ExpertChoiceRouter(n, capacity_factor)
    router.build((None, D))
    (w_gate,) = _weights([router.w_gate], seed=6)
    x, probe = _inputs(7, (T, D), (T, n))

    def reference(w_gate):
        return np.sum(probe * ref.expert_choice(x, w_gate, capacity_factor)[1])

    def objective():
        return tf.reduce_sum(probe * _dense(router(tf.constant(x, tf.float32)), n))

    _assert_gradients_equal(_tf_gradient([router.w_gate], objective), ref.numeric_gradient(reference, [w_gate]))


@pytest.mark.parametrize("affinity", ["sigmoid", "softmax"])
def test_sequence_wise_balance_loss(affinity):
    n, k, alpha = 4, 2, 0.5
    router = tf_moe.LossFreeRouter(n, k, affinity=affinity, bias_update_rate=0.0, balance_weight=alpha)
    router.build((None, D))
    (w_gate,) = _weights([router.w_gate], seed=8)
    # The bias only selects: a random one, so the choices are not those of s alone.
    bias = np.random.default_rng(9).standard_normal(n) * 0.1
    router.expert_bias.assign(bias.astype("float32"))
    (x,) = _inputs(10, (T, D))
    sequence_ids = np.array([0, 0, 0, 3, 3, 3])

    def reference(w_gate):
        s, _, choices = ref.loss_free_routing(x, w_gate, bias, k, affinity)
        return ref.sequence_balance_loss(s, choices, sequence_ids, alpha)

    def objective():
        routing = router(tf.constant(x, tf.float32), training=True, sequence_ids=tf.constant(sequence_ids))
        return routing.losses["sequence_balance"]

    _assert_gradients_equal(_tf_gradient([router.w_gate], objective), ref.numeric_gradient(reference, [w_gate]))


def test_switch_balance_and_z_losses():
    n, k, alpha, z_weight = 4, 2, 0.3, 0.1
    router = tf_moe.TopKRouter(n, k, balance_weight=alpha, z_loss_weight=z_weight)
    router.build((None, D))
    (w_gate,) = _weights([router.w_gate], seed=11)
    (x,) = _inputs(12, (T, D))

    def reference(w_gate):
        probabilities, _, choices = ref.top_k_routing(x, w_gate, k)
        return ref.switch_balance_loss(probabilities, choices, alpha) + z_weight * ref.z_loss(x @ w_gate)

    def objective():
        return tf.add_n(list(router(tf.constant(x, tf.float32), training=True).losses.values()))

    _assert_gradients_equal(_tf_gradient([router.w_gate], objective), ref.numeric_gradient(reference, [w_gate]))
