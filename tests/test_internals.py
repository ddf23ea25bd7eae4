"""Pins the private TensorFlow and Keras internals that tf_moe/_internals.py uses.

A TensorFlow or Keras release that renames or changes any of them fails
here, with the name of what moved, before the tests of the layers, the
backups and expert parallelism fail less clearly.
"""

import ast
import inspect
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.python.distribute import collective_all_reduce_strategy, cross_device_ops, cross_device_utils

from tf_moe import _internals
from tf_moe._internals import clear_resume_epoch, in_xla_compilation, set_resume_epoch
from tf_moe.distribute import get_strategy


def test_in_xla_compilation_is_true_only_under_jit_compile():
    seen = {}

    def probe(name):
        def fn(x):
            seen[name] = in_xla_compilation()
            # Nested control flow and functions inherit the context.
            def record(key):
                seen[key] = in_xla_compilation()
                return x

            tf.cond(x > 0, lambda: record(name + "/cond"), lambda: x)
            tf.function(lambda: record(name + "/inner"))()
            return x

        return fn

    x = tf.constant(1.0)
    probe("eager")(x)
    tf.function(probe("graph"))(x)
    tf.function(probe("xla"), jit_compile=True)(x)
    assert seen == {
        "eager": False, "eager/cond": False, "eager/inner": False,
        "graph": False, "graph/cond": False, "graph/inner": False,
        "xla": True, "xla/cond": True, "xla/inner": True,
    }


class _ResumeAt(keras.callbacks.Callback):
    def __init__(self, epoch):
        super().__init__()
        self.epoch, self.begun = epoch, []

    def on_train_begin(self, logs=None):
        if self.epoch is not None:
            set_resume_epoch(self.model, self.epoch)

    def on_epoch_begin(self, epoch, logs=None):
        self.begun.append(epoch)


def test_fit_starts_at_the_epoch_set_in_on_train_begin():
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile("sgd", "mse")
    x, y = np.ones((4, 2), "float32"), np.ones((4, 1), "float32")
    resume = _ResumeAt(3)
    history = model.fit(x, y, epochs=5, verbose=0, callbacks=[resume])
    assert resume.begun == [3, 4] and history.epoch == [3, 4]
    # Still set: a later fit would start there too, until cleared.
    again = _ResumeAt(None)
    model.fit(x, y, epochs=5, verbose=0, callbacks=[again])
    assert again.begun == [3, 4]
    clear_resume_epoch(model)
    model.fit(x, y, epochs=2, verbose=0, callbacks=[again])
    assert again.begun == [3, 4, 0, 1]


def _mirrored(count):
    return get_strategy("mirrored", devices=[d.name for d in tf.config.list_logical_devices("CPU")[:count]])


def test_mirrored_strategy_launches_collectives_through_one_launcher_per_device():
    strategy = _mirrored(2)
    assert _internals.has_collective_launchers(strategy)
    assert isinstance(strategy.extended._collective_ops, cross_device_ops.CollectiveAllReduce)
    launchers = strategy.extended._collective_ops._launchers
    assert [launcher._device for launcher in launchers] == [
        tf.DeviceSpec.from_string(d).to_string() for d in strategy.extended.worker_devices
    ]
    for replica, launcher in enumerate(launchers):
        assert _internals.collective_launcher(strategy, replica) is launcher
        assert isinstance(launcher, cross_device_utils.CollectiveReplicaLauncher)
        assert launcher._group_size == 2 and isinstance(launcher._group_key, int)
        for name in ("_next_instance_key", "_get_ordering_token", "_options"):
            assert hasattr(launcher, name), name
    assert strategy.extended._get_local_replica_id(1) == 1


def test_the_default_strategy_has_no_launchers():
    assert not _internals.has_collective_launchers(tf.distribute.get_strategy())


def test_launched_all_to_all_sends_row_i_to_replica_i():
    strategy = _mirrored(4)
    rows = np.arange(4 * 4 * 2, dtype="float32").reshape(4, 4, 2)  # [replica, row, 2]

    def step():
        context = tf.distribute.get_replica_context()
        replica = int(tf.get_static_value(context.replica_id_in_sync_group))
        launcher = _internals.collective_launcher(strategy, replica)
        return _internals.launch_all_to_all(launcher, tf.constant(rows[replica]))

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


def test_keras_optimizers_sum_gradients_over_replicas_in_one_method():
    """`KeepLocalGradients` overrides it; the update step must still call it."""
    from keras.src.backend.tensorflow.optimizer import TFOptimizer

    assert isinstance(keras.optimizers.SGD(), TFOptimizer)
    assert list(inspect.signature(TFOptimizer._all_reduce_sum_gradients).parameters) == ["self", "grads_and_vars"]
    assert "self._all_reduce_sum_gradients(" in inspect.getsource(TFOptimizer._backend_update_step)


def test_keep_local_gradients_skips_the_sum_for_the_variables_it_names():
    from tf_moe.distribute.expert_parallel import is_replica_local, replica_local_variables

    class KeepShards(_internals.KeepLocalGradients, keras.optimizers.SGD):
        def keeps_local_gradient(self, variable):
            return is_replica_local(variable)

    strategy = _mirrored(2)
    with strategy.scope():
        shared = keras.Variable(0.0, name="shared")
        with replica_local_variables():
            local = keras.Variable(0.0, name="local")
        optimizer = KeepShards(learning_rate=1.0)
        optimizer.build([shared, local])

    def step():
        gradient = tf.cast(tf.distribute.get_replica_context().replica_id_in_sync_group + 1, tf.float32)
        optimizer.apply_gradients([(gradient, shared), (10.0 * gradient, local)])

    tf.function(lambda: strategy.run(step))()
    assert [float(v) for v in strategy.experimental_local_results(shared.value)] == [-3.0, -3.0]  # 1 + 2
    assert [float(v) for v in strategy.experimental_local_results(local.value)] == [-10.0, -20.0]


def test_in_symbolic_scope_only_while_keras_traces_shapes():
    seen = []

    class Probe(keras.layers.Layer):
        def call(self, x):
            seen.append(_internals.in_symbolic_scope())
            return x

    probe = Probe()
    probe(keras.Input((3,)))
    probe(np.zeros((2, 3), "float32"))
    tf.function(probe)(np.zeros((2, 3), "float32"))
    assert seen == [True, False, False]


def test_own_variables_are_those_save_own_variables_stores_and_loading_checks_them():
    class Outer(keras.layers.Layer):
        def build(self, input_shape):
            self.kernel = self.add_weight(name="kernel", shape=(input_shape[-1], 3))
            self.inner = keras.layers.Dense(4)  # a sublayer: its variables are not `outer`'s own
            self.inner.build(input_shape)
            self.steps = self.add_weight(name="steps", shape=(), trainable=False)

    outer = Outer()
    outer.build((None, 2))
    store = {}
    outer.save_own_variables(store)
    own = _internals.own_variables(outer)
    assert [v.path for v in own] == [outer.kernel.path, outer.steps.path]
    assert [tuple(store[str(i)].shape) for i in range(len(store))] == [(2, 3), ()]
    _internals.check_load_own_variables(outer, store)
    del store["1"]
    with pytest.raises(ValueError, match="expected 2 variables"):
        _internals.check_load_own_variables(outer, store)


def test_the_loss_tracker_is_the_loss_that_fit_logs():
    class Halved(keras.Model):
        def train_step(self, data):
            _internals.loss_tracker(self).update_state(0.5)
            return {"loss": _internals.loss_tracker(self).result()}

    inputs = keras.Input((2,))
    model = Halved(inputs, keras.layers.Dense(1)(inputs))
    model.compile("sgd")
    assert isinstance(_internals.loss_tracker(model), keras.metrics.Mean)
    history = model.fit(np.ones((4, 2), "float32"), np.ones((4, 1), "float32"), epochs=1, verbose=0)
    assert history.history["loss"] == [0.5]
    assert _internals.loss_tracker(model) in model.metrics


def test_added_losses_go_to_the_replacement_list_and_each_call_clears_it():
    class Recorded(list):
        pass

    class Adds(keras.layers.Layer):
        def call(self, x):
            self.add_loss(tf.reduce_sum(x))
            return x

    layer, store = Adds(), Recorded()
    _internals.replace_added_losses(layer, store)
    layer(np.ones((2, 3), "float32"))
    assert len(store) == 1 and float(store[0]) == 6.0 and [float(v) for v in layer.losses] == [6.0]
    layer(np.zeros((2, 3), "float32"))
    assert [float(v) for v in store] == [0.0]


def test_no_other_module_imports_keras_or_tensorflow_internals():
    package = os.path.dirname(_internals.__file__)
    private = ("keras.src", "tensorflow.python")
    found = []
    for folder, _, files in os.walk(package):
        for file in sorted(files):
            path = os.path.join(folder, file)
            if not file.endswith(".py") or path == _internals.__file__:
                continue
            for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                    [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                found += [(os.path.relpath(path, package), n) for n in names if n.startswith(private)]
    assert not found
