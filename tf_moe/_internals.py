"""The private TensorFlow and Keras internals tf_moe relies on, in one place.

No public API does these; tests/test_internals.py pins every one, so a
TensorFlow or Keras release that changes them fails there first, naming
what moved.

* XLA: whether the ops being built will be compiled by XLA
  (`in_xla_compilation`), so the dropless MoE picks static shapes.
* Keras: `keras.callbacks.BackupAndRestore` makes `fit` resume at the
  restored epoch by setting `model._initial_epoch`, which `fit` reads
  instead of its `initial_epoch` argument (`set_resume_epoch`).
* Keras: whether a layer is being traced for shapes only
  (`in_symbolic_scope`); a layer's own variables, in the order
  `save_own_variables` stores them (`own_variables`), and the check of a
  store's size before loading them (`check_load_own_variables`), for a
  layer that saves its sharded weights whole; the `loss` metric that
  `compile` gives a model (`loss_tracker`), which a custom `train_step`
  updates; and the list a layer's `add_loss` appends to
  (`replace_added_losses`), which `MoELayer` makes per replica thread.
* tf.distribute has no public all-to-all. TensorFlow's collective
  all-to-all kernel (`CollectiveAllToAllV2`, CPU and GPU) needs a group
  key, an instance key that every member of the group agrees on, and, to
  run in the same order as the strategy's own collectives on each device,
  the strategy's ordering token. MirroredStrategy and
  MultiWorkerMirroredStrategy keep all three in one
  `CollectiveReplicaLauncher` per local device, through which they launch
  `ReplicaContext.all_reduce` and `all_gather`; the all-to-all is launched
  through the same launcher, exactly as they launch an all-gather.
* Keras's TensorFlow optimizers sum every gradient over the replicas in
  `_all_reduce_sum_gradients` before applying it; `KeepLocalGradients`
  leaves out the variables a subclass names (expert shards, whose
  gradients belong to different experts on each replica).
* MultiWorkerMirroredStrategy runs one replica per worker on CPUs whatever
  the logical devices; `init_multi_worker_strategy` gives it a list of
  local devices (several logical CPUs per worker, as GPUs would be).
"""

import tensorflow as tf
from keras.src.backend.common.symbolic_scope import in_symbolic_scope as _in_symbolic_scope
from tensorflow.python.distribute import collective_all_reduce_strategy, cross_device_ops
from tensorflow.python.ops import collective_ops, control_flow_util


def in_xla_compilation():
    """Whether the ops being built now will be compiled by XLA.

    True inside `tf.function(jit_compile=True)` (and Keras `jit_compile`),
    also in functions and control flow nested in it; False in eager mode and
    in functions left to TensorFlow's executor. XLA needs every shape known
    at compile time, so data-dependent shapes must be avoided there.
    """
    if tf.executing_eagerly():
        return False
    return control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph())


def set_resume_epoch(model, epoch):
    """Makes the running `fit` (called before `on_train_begin`) start at `epoch`."""
    model._initial_epoch = epoch


def clear_resume_epoch(model):
    """Lets a later `fit` on the same model start at its `initial_epoch` argument again."""
    model._initial_epoch = None


def in_symbolic_scope():
    """Whether Keras is tracing layers for output shapes only (e.g. on `keras.Input`)."""
    return _in_symbolic_scope()


def own_variables(layer):
    """The variables of `layer` itself, not of its sublayers, in `save_own_variables` order."""
    return layer._trainable_variables + layer._non_trainable_variables


def check_load_own_variables(layer, store):
    """Raises Keras's error for a `store` that does not hold `layer`'s own variables."""
    layer._check_load_own_variables(store)


def loss_tracker(model):
    """The `keras.metrics.Mean` behind the `loss` that `fit` logs (set by `compile`)."""
    return model._loss_tracker


def replace_added_losses(layer, losses):
    """Makes `layer.add_loss` append to `losses` (a list), which `layer.losses` reads and each call clears."""
    # Plain attribute assignment would let Keras's tracking copy it into a list.
    object.__setattr__(layer, "_losses", losses)


def _collective_all_reduce(strategy):
    """The strategy's `CollectiveAllReduce`, which holds its launchers, or None."""
    for attribute in ("_cross_device_ops", "_collective_ops"):
        ops = getattr(strategy.extended, attribute, None)
        if isinstance(ops, cross_device_ops.CollectiveAllReduce):
            return ops
    return None


def has_collective_launchers(strategy):
    """Whether `strategy` launches its collectives through `CollectiveReplicaLauncher`s.

    True for MirroredStrategy and MultiWorkerMirroredStrategy; False for
    TPUStrategy and the default strategy.
    """
    return _collective_all_reduce(strategy) is not None


def collective_launcher(strategy, replica_id):
    """The strategy's collective launcher for one of this worker's replicas.

    Args:
        strategy: a strategy for which `has_collective_launchers` is True.
        replica_id: int, the replica's `replica_id_in_sync_group` (global).

    Returns:
        The `CollectiveReplicaLauncher` of the replica's device.
    """
    local = strategy.extended._get_local_replica_id(replica_id)
    return _collective_all_reduce(strategy)._launchers[local]


def launch_all_to_all(launcher, tensor):
    """`CollectiveAllToAllV2` of `tensor` [group, ...] in the launcher's group.

    Row `i` of every member's `tensor` goes to member `i`; row `i` of the
    result came from member `i`. Forward only (the caller defines the
    gradient). The instance key is taken at call time, as the strategy does
    for its own collectives, so workers that trace at different moments
    still agree.
    """
    instance_key = launcher._next_instance_key()
    options = launcher._options
    # All-to-all has one CPU/GPU implementation besides NCCL's: a hint such
    # as "ring" (valid for all-reduce) would name none.
    nccl = options.implementation == tf.distribute.experimental.CommunicationImplementation.NCCL
    with tf.device(launcher._device):
        return collective_ops.all_to_all_v2(
            tensor,
            launcher._group_size,
            launcher._group_key,
            instance_key,
            communication_hint="nccl" if nccl else "auto",
            timeout=options.timeout_seconds or 0,
            ordering_token=launcher._get_ordering_token(),
        )


class KeepLocalGradients:
    """Optimizer mixin: `keeps_local_gradient(variable)` variables skip the sum over replicas.

    Their gradients are applied on each replica as that replica computed
    them; every other gradient is summed as Keras does.
    """

    def keeps_local_gradient(self, variable):
        """Whether `variable`'s gradient is applied without the sum (a tf.Variable here)."""
        return False

    def _all_reduce_sum_gradients(self, grads_and_vars):
        grads_and_vars = list(grads_and_vars)
        shared = [pair for pair in grads_and_vars if not self.keeps_local_gradient(pair[1])]
        reduced = iter(super()._all_reduce_sum_gradients(shared))
        return [pair if self.keeps_local_gradient(pair[1]) else next(reduced) for pair in grads_and_vars]


class _LocalDevicesExtended(collective_all_reduce_strategy.CollectiveAllReduceExtended):
    """MultiWorkerMirroredStrategy's extended with given local devices on every worker."""

    def __init__(self, container_strategy, communication_options, local_devices):
        self._requested_local_devices = local_devices
        super().__init__(container_strategy, None, communication_options)

    def _initialize_local_devices(self, cluster_resolver, worker_device):
        specs = [tf.DeviceSpec.from_string(device) for device in self._requested_local_devices]
        return (
            tuple(f"{worker_device}/device:{s.device_type}:{s.device_index}" for s in specs),
            specs[0].device_type,
        )


def init_multi_worker_strategy(strategy, local_devices, communication_options):
    """Initialises a `MultiWorkerMirroredStrategy` (from TF_CONFIG) over `local_devices`.

    Stands for `MultiWorkerMirroredStrategy.__init__`, which cannot take
    local devices and only adds usage gauges besides creating its extended.
    """
    tf.distribute.Strategy.__init__(
        strategy, _LocalDevicesExtended(strategy, communication_options, local_devices)
    )
