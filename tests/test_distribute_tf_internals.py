"""Pins the private TensorFlow internals that tf_moe/distribute/tf_internals.py uses.

A TensorFlow release that renames or changes any of them fails here, with
the name of what moved, before the expert-parallel tests fail less clearly.
"""

import inspect

import numpy as np
import tensorflow as tf
from tensorflow.python.distribute import collective_all_reduce_strategy, cross_device_ops, cross_device_utils

from tf_moe.distribute import get_strategy, tf_internals


def _mirrored(count):
    return get_strategy("mirrored", devices=[d.name for d in tf.config.list_logical_devices("CPU")[:count]])


def test_mirrored_strategy_launches_collectives_through_one_launcher_per_device():
    strategy = _mirrored(2)
    assert tf_internals.has_collective_launchers(strategy)
    assert isinstance(strategy.extended._collective_ops, cross_device_ops.CollectiveAllReduce)
    launchers = strategy.extended._collective_ops._launchers
    assert [launcher._device for launcher in launchers] == [
        tf.DeviceSpec.from_string(d).to_string() for d in strategy.extended.worker_devices
    ]
    for replica, launcher in enumerate(launchers):
        assert tf_internals.collective_launcher(strategy, replica) is launcher
        assert isinstance(launcher, cross_device_utils.CollectiveReplicaLauncher)
        assert launcher._group_size == 2 and isinstance(launcher._group_key, int)
        for name in ("_next_instance_key", "_get_ordering_token", "_options"):
            assert hasattr(launcher, name), name
    assert strategy.extended._get_local_replica_id(1) == 1


def test_the_default_strategy_has_no_launchers():
    assert not tf_internals.has_collective_launchers(tf.distribute.get_strategy())


def test_launched_all_to_all_sends_row_i_to_replica_i():
    strategy = _mirrored(4)
    rows = np.arange(4 * 4 * 2, dtype="float32").reshape(4, 4, 2)  # [replica, row, 2]

    def step():
        context = tf.distribute.get_replica_context()
        replica = int(tf.get_static_value(context.replica_id_in_sync_group))
        launcher = tf_internals.collective_launcher(strategy, replica)
        return tf_internals.launch_all_to_all(launcher, tf.constant(rows[replica]))

    got = strategy.experimental_local_results(tf.function(lambda: strategy.run(step))())
    for replica, received in enumerate(got):
        np.testing.assert_array_equal(received.numpy(), rows[:, replica])


def test_multi_worker_extended_takes_its_local_devices_from_one_method():
    extended = collective_all_reduce_strategy.CollectiveAllReduceExtended
    assert list(inspect.signature(extended._initialize_local_devices).parameters) == [
        "self", "cluster_resolver", "worker_device",
    ]
    assert list(inspect.signature(extended.__init__).parameters)[:4] == [
        "self", "container_strategy", "cluster_resolver", "communication_options",
    ]
    assert list(inspect.signature(extended._get_local_replica_id).parameters) == [
        "self", "replica_id_in_sync_group",
    ]
