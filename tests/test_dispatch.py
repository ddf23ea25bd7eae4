"""Sparse dispatch and combine against dense and loop references."""

import fractions
import math

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


@pytest.mark.parametrize("capacity", [None, 1, 2, 100])
@pytest.mark.parametrize("unrouted", [False, True])
def test_combine_gradient_equals_dense_reference(capacity, unrouted):
    """The written-out gradient of `combine` against the dense sum it computes."""
    rng = np.random.default_rng(2)
    t, o, n = 7, 3, 3
    token_id = np.tile(np.arange(t), 2).astype(np.int32)
    expert_id = np.full(2 * t, n, np.int32) if unrouted else rng.integers(0, n + 1, 2 * t).astype(np.int32)
    weight = rng.random(2 * t).astype(np.float32)
    _, slot, kept, counts = dispatch.dispatch(
        tf.zeros([t, o]), tf.constant(token_id), tf.constant(expert_id), n, capacity
    )
    capacity = int(counts.numpy().max()) if capacity is None else capacity
    outputs = tf.constant(rng.standard_normal((n, capacity, o)).astype(np.float32))
    d_out = rng.standard_normal((t, o)).astype(np.float32)
    weight_t = tf.constant(weight)
    with tf.GradientTape() as tape:
        tape.watch([outputs, weight_t])
        out = dispatch.combine(outputs, slot, kept, tf.constant(token_id), weight_t, t)
    d_outputs, d_weight = tape.gradient(out, [outputs, weight_t], output_gradients=tf.constant(d_out))

    flat = outputs.numpy().reshape(-1, o)
    want_flat, want_weight = np.zeros_like(flat), np.zeros_like(weight)
    for a in np.flatnonzero(kept.numpy()):
        want_flat[slot[a]] += weight[a] * d_out[token_id[a]]
        want_weight[a] = d_out[token_id[a]] @ flat[slot[a]]
    np.testing.assert_allclose(tf.reshape(d_outputs, [-1, o]), want_flat, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(d_weight, want_weight, rtol=1e-5, atol=1e-6)


def test_dispatch_handles_no_tokens():
    empty = tf.zeros([0], tf.int32)
    buffer, slot, kept, counts = dispatch.dispatch(tf.zeros([0, 4]), empty, empty, 3, None)
    assert buffer.shape == (3, 0, 4)
    out = dispatch.combine(buffer, slot, kept, empty, tf.zeros([0]), 0)
    assert out.shape == (0, 4)


def _exact_capacity(capacity_factor, assignments, experts):
    """ceil(cf * A / n) with the factor as the decimal it is written as."""
    ratio = fractions.Fraction(str(capacity_factor)) * assignments / experts
    return math.ceil(ratio)


@pytest.mark.parametrize(
    "capacity_factor, assignments, experts, expected",
    [
        (1.25, 200, 8, 32),
        (1.0, 0, 8, 0),
        (1.0, 10, 4, 3),
        # A float 0.0015 is a hair above 3/2000, and limit_denominator(1000)
        # gave 3/2000 -> 3749 before; the documented ceil is 3750.
        (0.0015, 10_000_000, 4, 3750),
        (0.0004, 100, 8, 1),  # below 1/2000: was 0 slots
        (1e-9, 1, 64, 1),
        (0.1, 30, 3, 1),  # 0.1 * 30 / 3 = 1 exactly, not 2
        (3.0, 7, 7, 3),
    ],
)
def test_static_capacity_is_the_exact_ceil(capacity_factor, assignments, experts, expected):
    assert _exact_capacity(capacity_factor, assignments, experts) == expected
    assert dispatch.static_capacity(capacity_factor, assignments, experts) == expected
    # The tensor path (dynamic batch), integer ops only, also under XLA.
    tensor = dispatch.static_capacity(capacity_factor, tf.constant(assignments), experts)
    assert tensor.dtype == tf.int32 and int(tensor) == expected
    compiled = tf.function(
        lambda a: dispatch.static_capacity(capacity_factor, a, experts), jit_compile=True
    )
    assert int(compiled(tf.constant(assignments))) == expected


def test_static_capacity_tensor_path_matches_exact_integers():
    rng = np.random.default_rng(0)
    factors = [round(rng.uniform(1e-6, 4.0), int(rng.integers(0, 8))) or 0.5 for _ in range(200)]
    experts = rng.integers(1, 4096, 200)
    assignments = rng.integers(0, 2**31 - 1, 200)
    for cf, n, a in zip(factors, experts, assignments):
        expected = _exact_capacity(cf, int(a), int(n))
        if expected >= 2**31:
            continue
        assert int(dispatch.static_capacity(cf, tf.constant(int(a)), int(n))) == expected, (cf, n, a)


@pytest.mark.parametrize(
    "capacity_factor, assignments, experts, expected",
    [
        # Found by the property suite: a factor with a long decimal raised a
        # ValueError on a dynamic batch (any `fit` with an unknown batch size).
        (1.3785516579894752, 40, 8, 7),
        (1 / 3, 300, 4, 25),  # the nearest short fraction is 1/3 itself
        (1 / 3, 2**31 - 1, 4096, 174763),
        (1.2345678901234567e-12, 2**31 - 1, 8, 1),  # below every short fraction: one slot
        # Above num_experts every assignment has a slot already: capped at A,
        # where 1e300 overflowed the int64 maths and a Python int buffer size.
        (1e300, 10, 4, 10),
        (8.0, 5, 2, 5),
    ],
)
def test_static_capacity_of_any_factor_is_the_same_on_a_dynamic_batch(
    capacity_factor, assignments, experts, expected
):
    assert dispatch.static_capacity(capacity_factor, assignments, experts) == expected
    tensor = dispatch.static_capacity(capacity_factor, tf.constant(assignments), experts)
    assert int(tensor) == expected


def test_capacity_fraction_keeps_short_decimals_and_bounds_the_rest():
    assert dispatch.capacity_fraction(0.0015, 4096) == fractions.Fraction(3, 2000)
    assert dispatch.capacity_fraction(1 / 3, 4096) == fractions.Fraction(1, 3)
    assert dispatch.capacity_fraction(1e300, 8) == 8
    rng = np.random.default_rng(1)
    for cf, n in zip(rng.uniform(1e-6, 4.0, 200), rng.integers(1, 4096, 200)):
        ratio = dispatch.capacity_fraction(float(cf), int(n))
        assert ratio.denominator * n < 2**46
        assert abs(float(ratio) - cf) <= n / 2**45  # within 1 / max_denominator


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


@pytest.mark.parametrize("experts", [1, 2, 3, 4, 16, 256])
def test_dropless_capacity_factors_are_few_and_bounded(experts):
    factors = dispatch.dropless_capacity_factors(experts)
    assert factors == sorted(set(factors))
    # The mean load to twice it in eighths, then 4x; up to 4 experts the
    # last holds all assignments, beyond it is the window of the loop.
    assert [f for f in factors if 1 <= f <= 2] == [1 + i / 8 for i in range(9) if 1 + i / 8 <= experts]
    assert factors[-1] == min(experts, 4)
    assert len(factors) <= 11


def _experts_bank(n, d, o, seed):
    """A tiny stacked expert bank: tanh(x W_e), with its variable."""
    kernel = tf.Variable(np.random.default_rng(seed).standard_normal((n, d, o)).astype(np.float32))
    return kernel, lambda buffer: tf.tanh(tf.matmul(buffer, kernel))


@pytest.mark.parametrize(
    "skew, n", [("random", 4), ("one_expert", 4), ("unrouted", 4), ("random", 16), ("one_expert", 16)]
)
def test_dropless_static_equals_dropless_dispatch_with_xla_and_without(skew, n):
    rng = np.random.default_rng(2)
    t, d, k = 24, 5, 2
    tokens = tf.constant(rng.standard_normal((t, d)).astype(np.float32))
    token_id = tf.constant(np.tile(np.arange(t), k).astype(np.int32))
    expert_id = rng.integers(0, n, size=k * t)
    # The largest expert takes every first choice: the top bucket with 4
    # experts, 8x the mean load with 16, which runs window by window.
    if skew == "one_expert":
        expert_id[:t] = 1
    if skew == "unrouted":  # half the assignments go nowhere: a bucket below the mean
        expert_id[::2] = n
    expert_id = tf.constant(expert_id.astype(np.int32))
    weight = tf.constant(rng.random(k * t).astype(np.float32))
    kernel, experts = _experts_bank(n, d, 3, seed=3)
    d_out = tf.constant(rng.standard_normal((t, 3)).astype(np.float32))

    def step(use_static):
        def fn(tokens, weight):
            with tf.GradientTape() as tape:
                tape.watch([tokens, weight])
                if use_static:
                    out = dispatch.dropless_static(tokens, token_id, expert_id, weight, n, t, experts)
                else:
                    buffer, slot, kept, _ = dispatch.dispatch(tokens, token_id, expert_id, n)
                    out = dispatch.combine(experts(buffer), slot, kept, token_id, weight, t)
                loss = tf.reduce_sum(out * d_out)
            return [out] + [tf.convert_to_tensor(g) for g in tape.gradient(loss, [tokens, weight, kernel])]

        return fn

    want = step(False)(tokens, weight)
    runs = [step(True)(tokens, weight)]
    if (skew, n) in (("random", 4), ("one_expert", 16)):  # compiling every branch takes a while: not for all
        runs.append(tf.function(step(True), jit_compile=True)(tokens, weight))
    for got in runs:
        for g, w in zip(got, want):
            np.testing.assert_allclose(g.numpy(), w.numpy(), rtol=1e-5, atol=1e-5)


def _split_rows(counts, first, cost):
    largest = max(counts, default=0)
    overflowing = sum(c > first for c in counts)
    return len(counts) * first + overflowing * (largest - first + cost)


@pytest.mark.parametrize("cost", [0.0, 3.0, 8.0, 100.0])
def test_split_capacity_is_the_cheapest_split(cost):
    rng = np.random.default_rng(int(cost))
    cases = [[0, 0, 0], [5], [4, 4, 4, 4], [0, 9, 1, 1]] + [
        list(rng.poisson(rng.uniform(1, 30), size=rng.integers(1, 40))) for _ in range(60)
    ]
    for counts in cases:
        first, further = (int(v) for v in dispatch.split_capacity(tf.constant(counts, tf.int32), cost))
        largest = max(counts)
        assert 0 <= first <= largest and first + further == largest
        cheapest = min(_split_rows(counts, c, cost) for c in range(largest + 1))
        assert _split_rows(counts, first, cost) == cheapest, counts


@pytest.mark.parametrize("cost", [0.0, 2.0, 1e9])
def test_split_dispatch_gives_every_assignment_its_own_slot_at_its_expert(cost):
    rng = np.random.default_rng(7)
    n, tokens, d = 6, 40, 3
    x = rng.standard_normal((tokens, d)).astype("float32")
    # Skewed: expert 0 takes a third of the assignments; n = not routed.
    expert_id = np.where(rng.random(2 * tokens) < 0.33, 0, rng.integers(1, n + 1, 2 * tokens)).astype(np.int32)
    token_id = np.tile(np.arange(tokens, dtype=np.int32), 2)
    split = dispatch.split_dispatch(tf.constant(x), tf.constant(token_id), tf.constant(expert_id), n, cost)
    first, further = split.buffer.shape[1], split.overflow.shape[1]
    overflow_experts = split.overflow_experts.numpy()
    position, counts = _reference_positions(expert_id, n)
    np.testing.assert_array_equal(split.counts, counts)
    np.testing.assert_array_equal(overflow_experts, np.flatnonzero(counts > first))
    assert further == counts.max() - first
    if cost == 1e9:
        assert len(overflow_experts) == 0 and first == counts.max()
    elif cost == 0.0:
        assert len(overflow_experts) > 0
    flat = np.concatenate([split.buffer.numpy().reshape(-1, d), split.overflow.numpy().reshape(-1, d)])
    slot, kept = split.slot.numpy(), split.kept.numpy()
    np.testing.assert_array_equal(kept, expert_id < n)
    assert len(set(slot[kept])) == kept.sum()
    assert np.all(slot[~kept] == len(flat))
    for a in np.flatnonzero(kept):
        e, p = expert_id[a], position[a]
        want = e * first + p if p < first else n * first + list(overflow_experts).index(e) * further + p - first
        assert slot[a] == want
        np.testing.assert_array_equal(flat[slot[a]], x[token_id[a]])
    empty = np.setdiff1d(np.arange(len(flat)), slot[kept])
    assert not flat[empty].any()
