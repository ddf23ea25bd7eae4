"""The gating maths against the numpy transcription of the paper (sections 2.1, 4, appendix A)."""

import numpy as np
import pytest
import tensorflow as tf

from tests import numpy_reference as ref
from tf_moe.ops import gating


def test_cv_squared_matches_definition():
    v = np.array([1.0, 2.0, 7.0, 0.5], np.float32)
    np.testing.assert_allclose(gating.cv_squared(v), ref.cv_squared(v), rtol=1e-6)
    assert float(gating.cv_squared([3.0, 3.0, 3.0])) == 0.0
    assert float(gating.cv_squared([0.0, 0.0])) == 0.0  # empty batch: no NaN
    assert float(gating.cv_squared([5.0])) == 0.0


@pytest.mark.parametrize("k", [1, 2, 3])
def test_top_k_gates_and_smooth_load_match_reference(k):
    rng = np.random.default_rng(k)
    t, d, n = 12, 6, 5
    x = rng.standard_normal((t, d)).astype(np.float32)
    w_gate = rng.standard_normal((d, n)).astype(np.float32)
    w_noise = rng.standard_normal((d, n)).astype(np.float32) * 0.3
    noise = rng.standard_normal((t, n)).astype(np.float32)
    h_ref, gates_ref, std_ref = ref.noisy_top_k(x, w_gate, w_noise, noise, k, 1e-2)

    clean = x @ w_gate
    stddev = gating.noise_stddev(x @ w_noise, 1e-2)
    h = clean + noise * stddev
    index, weight, _ = gating.top_k_gates(h, k)
    dense = np.zeros((t, n), np.float32)
    np.put_along_axis(dense, index.numpy(), weight.numpy(), axis=1)
    np.testing.assert_allclose(dense, gates_ref, rtol=1e-5, atol=1e-6)

    load = gating.smooth_load(clean, h, stddev, k)
    np.testing.assert_allclose(load, ref.smooth_load(x, w_gate, h_ref, std_ref, k), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(
        gating.importance(index, weight, n), gates_ref.sum(0), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_array_equal(gating.hard_load(index, n), (gates_ref > 0).sum(0))


def test_ids_past_num_experts_are_ignored():
    index = tf.constant([[0, 1], [3, 3]])
    weight = tf.constant([[0.6, 0.4], [0.5, 0.5]])
    np.testing.assert_allclose(gating.importance(index, weight, 3), [0.6, 0.4, 0.0])
    np.testing.assert_allclose(gating.hard_load(index, 3), [1.0, 1.0, 0.0])


def test_smooth_load_is_finite_with_zero_noise_scale():
    clean = tf.constant([[1.0, 2.0, 3.0]])
    load = gating.smooth_load(clean, clean, tf.zeros_like(clean) + gating.noise_stddev(-1e4, 0.0), 1)
    assert np.all(np.isfinite(load))
    np.testing.assert_allclose(load, [0.0, 0.0, 1.0], atol=1e-6)


def test_smooth_load_has_the_expectation_of_the_hard_load():
    """Monte Carlo: E[hard count] over noise draws equals E[smooth estimate]."""
    rng = np.random.default_rng(0)
    t, d, n, k, draws = 64, 8, 6, 2, 400
    x = tf.constant(rng.standard_normal((t, d)), tf.float32)
    w_gate = tf.constant(rng.standard_normal((d, n)) * 0.3, tf.float32)
    w_noise = tf.constant(rng.standard_normal((d, n)) * 0.3, tf.float32)
    clean = x @ w_gate
    stddev = gating.noise_stddev(x @ w_noise, 1e-2)
    noise = tf.random.stateless_normal((draws, t, n), seed=[1, 2])
    h = clean[None] + noise * stddev[None]
    hard = tf.reduce_mean(
        tf.map_fn(lambda v: gating.hard_load(gating.top_k_gates(v, k)[0], n), h), 0
    )
    smooth = tf.reduce_mean(
        tf.map_fn(lambda v: gating.smooth_load(clean, v, stddev, k), h), 0
    )
    # Each expert's expected load is ~t*k/n ≈ 21 tokens; 400 draws bring the
    # Monte Carlo error of the hard count to a few tenths.
    np.testing.assert_allclose(smooth, hard, rtol=0.05)
    assert not np.allclose(hard, hard[0])  # the routing is genuinely unequal


def test_masked_tokens_leave_smooth_load_and_importance_untouched_even_when_nan():
    rng = np.random.default_rng(3)
    clean = rng.standard_normal((6, 4)).astype(np.float32)
    noisy = clean + rng.standard_normal((6, 4)).astype(np.float32)
    stddev = np.ones((6, 4), np.float32)
    valid = np.array([True, False, True, True, False, True])
    for array in (clean, noisy):
        array[~valid] = np.nan
    np.testing.assert_allclose(
        gating.smooth_load(clean, noisy, stddev, 2, valid),
        gating.smooth_load(clean[valid], noisy[valid], stddev[valid], 2),
        rtol=1e-6,
    )
    index = tf.constant([[0, 1], [4, 4], [2, 3]])  # 4 = not routed
    weight = tf.constant([[0.6, 0.4], [np.nan, np.inf], [0.5, 0.5]])
    np.testing.assert_allclose(gating.importance(index, weight, 4), [0.6, 0.4, 0.5, 0.5])


def test_routing_diagnostics_match_the_reference():
    rng = np.random.default_rng(4)
    t, n, k = 30, 6, 2
    clean = rng.standard_normal((t, n)).astype(np.float32)
    stddev = np.abs(rng.standard_normal((t, n))).astype(np.float32) + 0.1
    noisy = clean + rng.standard_normal((t, n)).astype(np.float32) * stddev
    valid = rng.random(t) > 0.2
    noisy_index, _, _ = gating.top_k_gates(noisy, k)
    np.testing.assert_allclose(
        gating.topk_agreement(noisy_index, clean, valid), ref.topk_agreement(noisy, clean, k, valid), rtol=1e-6
    )
    np.testing.assert_allclose(
        gating.noise_to_signal(stddev, clean, valid), ref.noise_to_signal(stddev, clean, valid), rtol=1e-5
    )
    # Identical sets agree fully; no spread in the clean logits means no signal.
    clean_index, _, _ = gating.top_k_gates(clean, k)
    assert float(gating.topk_agreement(clean_index, clean)) == 1.0
    assert np.isinf(float(gating.noise_to_signal(stddev, np.zeros_like(clean))))
    assert float(gating.noise_to_signal(stddev, clean, np.zeros(t, bool))) == 0.0


@pytest.mark.parametrize("k", [1, 2])
def test_load_balancing_loss_matches_the_switch_formula(k):
    rng = np.random.default_rng(10 + k)
    logits = rng.standard_normal((20, 5))
    p = ref.softmax(logits)
    choices = np.argsort(-p, axis=1, kind="stable")[:, :k]
    counts = np.array([np.sum(choices == i) for i in range(5)], np.float32)
    loss = gating.load_balancing_loss(tf.constant(counts), tf.constant(p.sum(0), tf.float32), 20.0, k)
    np.testing.assert_allclose(float(loss), ref.switch_balance_loss(p, choices, 1.0), rtol=1e-5)
    # 1 under perfect balance whatever k; 0 for an empty batch; per leading axis.
    assert float(gating.load_balancing_loss(tf.fill([4], 0.75 * k), tf.fill([4], 0.75), 3.0, k)) == pytest.approx(1.0)
    assert float(gating.load_balancing_loss(tf.zeros([4]), tf.zeros([4]), 0.0, k)) == 0.0
    batched = gating.load_balancing_loss(tf.fill([3, 4], 0.5 * k), tf.fill([3, 4], 0.5), tf.fill([3], 2.0), k)
    np.testing.assert_allclose(batched, [1.0, 1.0, 1.0], rtol=1e-6)


def test_router_z_loss_matches_the_st_moe_formula():
    rng = np.random.default_rng(12)
    logits = (rng.standard_normal((3, 7, 5)) * 4).astype(np.float32)
    valid = rng.random((3, 7)) > 0.3
    rows = logits[valid]
    np.testing.assert_allclose(float(gating.router_z_loss(logits, valid)), ref.z_loss(rows), rtol=1e-5)
    np.testing.assert_allclose(float(gating.router_z_loss(logits[0])), ref.z_loss(logits[0]), rtol=1e-5)
    # NaN in invalid rows reaches neither the value nor the gradient.
    poisoned = tf.Variable(np.where(valid[..., None], logits, np.nan).astype(np.float32))
    with tf.GradientTape() as tape:
        z = gating.router_z_loss(poisoned, valid)
    grad = tape.gradient(z, poisoned).numpy()
    assert np.isfinite(float(z)) and np.all(np.isfinite(grad)) and np.all(grad[~valid] == 0)
    assert float(gating.router_z_loss(logits, np.zeros((3, 7), bool))) == 0.0


def test_one_top_k_serves_the_gates_and_the_smooth_load():
    rng = np.random.default_rng(5)
    clean = tf.constant(rng.standard_normal((7, 6)).astype(np.float32))
    noisy = clean + tf.constant(rng.standard_normal((7, 6)).astype(np.float32))
    stddev = tf.fill([7, 6], 0.7)
    index, weight, top = gating.top_k_gates(noisy, 2, keep=3)
    want_index, want_weight, _ = gating.top_k_gates(noisy, 2)
    np.testing.assert_array_equal(index, want_index)
    np.testing.assert_allclose(weight, want_weight)
    np.testing.assert_allclose(top, np.sort(noisy.numpy(), axis=-1)[:, ::-1][:, :3])
    np.testing.assert_allclose(
        gating.smooth_load(clean, noisy, stddev, 2, top_values=top), gating.smooth_load(clean, noisy, stddev, 2)
    )
