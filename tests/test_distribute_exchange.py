"""The exchange of dispatch buffers between replicas, on logical CPU devices.

The reference is numpy: replica j receives row j of every replica's tensor,
and the gradient of what replica i sent is what replica i's rows received
upstream on their destination replicas. Traffic is counted from the tensors
sent: the all-to-all moves 1/replicas of the all-gather exchange's bytes.
"""

import numpy as np
import pytest
import tensorflow as tf

from tf_moe.distribute import get_strategy
from tf_moe.distribute.exchange import EXCHANGES, Traffic, TrafficRecorder, exchange, resolve_exchange


def _strategy(replicas):
    return get_strategy("mirrored", devices=[d.name for d in tf.config.list_logical_devices("CPU")[:replicas]])


def _run(strategy, fn, *values):
    """`fn(*per-replica values)` on every replica; results stacked by replica."""
    per_replica = [
        strategy.experimental_distribute_values_from_function(lambda c, v=v: tf.constant(v[c.replica_id_in_sync_group]))
        for v in values
    ]
    outputs = tf.function(lambda *args: strategy.run(fn, args=args))(*per_replica)
    return tf.nest.map_structure(lambda *parts: np.stack([p.numpy() for p in parts]), *[
        tf.nest.map_structure(lambda o, i=i: strategy.experimental_local_results(o)[i], outputs,)
        for i in range(strategy.num_replicas_in_sync)
    ])


@pytest.mark.parametrize("method", ["all_to_all", "all_gather"])
@pytest.mark.parametrize("replicas", [2, 4])
def test_exchange_and_its_gradient_equal_the_numpy_transpose(method, replicas):
    rng = np.random.default_rng(replicas)
    sent = rng.standard_normal((replicas, replicas, 3, 2)).astype("float32")  # [replica, row, ...]
    upstream = rng.standard_normal(sent.shape).astype("float32")

    def step(x, dy):
        with tf.GradientTape() as tape:
            tape.watch(x)
            received = exchange(x, method)
            loss = tf.reduce_sum(received * dy)
        return received, tape.gradient(loss, x)

    received, gradient = _run(_strategy(replicas), step, sent, upstream)
    # Replica j's row i came from replica i's row j, both ways.
    np.testing.assert_array_equal(received, sent.transpose(1, 0, 2, 3))
    np.testing.assert_array_equal(gradient, upstream.transpose(1, 0, 2, 3))


@pytest.mark.parametrize("replicas", [2, 4])
def test_all_to_all_traffic_is_one_over_replicas_of_the_all_gather_exchange(replicas):
    strategy = _strategy(replicas)
    sent = np.ones((replicas, replicas, 5, 3), "float32")
    row_bytes = 5 * 3 * 4
    totals = {}
    for method in ("all_to_all", "all_gather"):
        traffic = TrafficRecorder()

        def step(x):
            with tf.GradientTape() as tape:
                tape.watch(x)
                loss = tf.reduce_sum(exchange(x, method, traffic))
            return tape.gradient(loss, x)

        _run(strategy, step, sent)
        assert sorted(t.replica for t in traffic) == sorted(list(range(replicas)) * 2)
        assert {t.direction for t in traffic} == {"forward", "backward"}
        totals[method] = sum(t.bytes_sent for t in traffic if t.replica == 0)
    # Each replica keeps its own row and sends one row to each other replica;
    # the all-gather exchange sends its whole buffer to each other replica.
    assert totals["all_to_all"] == 2 * (replicas - 1) * row_bytes
    assert totals["all_gather"] == 2 * (replicas - 1) * replicas * row_bytes
    assert totals["all_to_all"] * replicas == totals["all_gather"]


def test_traffic_of_a_dynamic_shape_is_unknown_when_traced():
    strategy = _strategy(2)
    traffic = TrafficRecorder()
    step = tf.function(
        lambda x: strategy.run(lambda t: exchange(t, "all_to_all", traffic), args=(x,)),
        input_signature=[tf.TensorSpec([2, None], tf.float32)],
    )
    step.get_concrete_function()
    assert traffic and all(t == Traffic("all_to_all", t.replica, "forward", None) for t in traffic)


def test_method_is_checked():
    strategy = _strategy(2)
    assert resolve_exchange(strategy, "auto") == "all_to_all"
    assert resolve_exchange(tf.distribute.get_strategy(), "auto") == "all_gather"
    with pytest.raises(ValueError, match="`exchange` must be one of"):
        resolve_exchange(strategy, "ring")
    with pytest.raises(ValueError, match="no all-to-all"):
        resolve_exchange(tf.distribute.get_strategy(), "all_to_all")
    assert EXCHANGES == ("auto", "all_to_all", "all_gather")


def test_rows_must_match_the_replicas():
    strategy = _strategy(2)
    with pytest.raises(ValueError, match="2 rows"):
        tf.function(lambda: strategy.run(lambda: exchange(tf.zeros([3, 1]))))()
