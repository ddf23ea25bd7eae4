"""Sparse dispatch and combine against dense and loop references."""

import numpy as np
import pytest
import tensorflow as tf

from tf_moe.ops import dispatch


def _reference_positions(expert_id, n):
    seen = np.zeros(n + 1, int)
    out = []
    for e in expert_id:
        out.append(seen[e])
        seen[e] += 1
    return np.array(out), seen[:n]


def test_positions_follow_arrival_order():
    rng = np.random.default_rng(0)
    expert_id = rng.integers(0, 6, size=50).astype(np.int32)  # 5 = ignored
    position, counts = dispatch.expert_positions(tf.constant(expert_id), 5)
    want_position, want_counts = _reference_positions(expert_id, 5)
    np.testing.assert_array_equal(position, want_position)
    np.testing.assert_array_equal(counts, want_counts)


def test_token_choice_assignments_are_choice_major():
    index = tf.constant([[2, 0], [1, 2], [0, 1]])
    weight = tf.constant([[0.7, 0.3], [0.6, 0.4], [0.9, 0.1]])
    token_id, expert_id, w = dispatch.token_choice_assignments(
        index, weight, valid=tf.constant([True, False, True]), num_experts=3
    )
    np.testing.assert_array_equal(token_id, [0, 1, 2, 0, 1, 2])
    np.testing.assert_array_equal(expert_id, [2, 3, 0, 0, 3, 1])
    np.testing.assert_allclose(w, [0.7, 0.6, 0.9, 0.3, 0.4, 0.1])


@pytest.mark.parametrize("capacity", [None, 1, 2, 3, 100])
def test_dispatch_combine_equals_dense_reference(capacity):
    rng = np.random.default_rng(1)
    t, d, n = 9, 4, 3
    tokens = rng.standard_normal((t, d)).astype(np.float32)
    token_id = np.repeat(np.arange(t), 2).astype(np.int32)
    expert_id = rng.integers(0, n + 1, size=2 * t).astype(np.int32)
    weight = rng.random(2 * t).astype(np.float32)
    scale = rng.standard_normal((n, 1, 1)).astype(np.float32)

    buffer, slot, kept, counts = dispatch.dispatch(
        tf.constant(tokens), tf.constant(token_id), tf.constant(expert_id), n, capacity
    )
    out = dispatch.combine(buffer * scale, slot, kept, tf.constant(token_id), tf.constant(weight), t)

    position, _ = _reference_positions(expert_id, n)
    cap = np.inf if capacity is None else capacity
    want_kept = (expert_id < n) & (position < cap)
    want = np.zeros((t, d), np.float32)
    for a in np.flatnonzero(want_kept):
        want[token_id[a]] += weight[a] * scale[expert_id[a], 0, 0] * tokens[token_id[a]]
    np.testing.assert_array_equal(kept, want_kept)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(counts, np.bincount(expert_id, minlength=n + 1)[:n])
    if capacity is not None:
        assert buffer.shape == (n, capacity, d)
    else:
        assert buffer.shape[1] == counts.numpy().max()


def test_dispatch_handles_no_tokens():
    empty = tf.zeros([0], tf.int32)
    buffer, slot, kept, counts = dispatch.dispatch(tf.zeros([0, 4]), empty, empty, 3, None)
    assert buffer.shape == (3, 0, 4)
    out = dispatch.combine(buffer, slot, kept, empty, tf.zeros([0]), 0)
    assert out.shape == (0, 4)


def test_static_capacity():
    assert dispatch.static_capacity(1.25, 2 * 100, 8) == 32
    assert dispatch.static_capacity(1.0, 0, 8) == 0
    assert int(dispatch.static_capacity(1.0, tf.constant(10), 4)) == 3


def test_capacity_path_compiles_with_xla():
    @tf.function(jit_compile=True)
    def step(tokens, token_id, expert_id):
        buffer, slot, kept, _ = dispatch.dispatch(tokens, token_id, expert_id, 4, 3)
        return dispatch.combine(buffer, slot, kept, token_id, tf.ones_like(token_id, tf.float32), 8)

    tokens = tf.random.normal([8, 5])
    ids = tf.constant([0, 1, 2, 3, 0, 0, 0, 4], tf.int32)
    out = step(tokens, tf.range(8), ids)
    want = tokens.numpy() * np.array([1, 1, 1, 1, 1, 1, 0, 0])[:, None]
    np.testing.assert_allclose(out, want, rtol=1e-6)
