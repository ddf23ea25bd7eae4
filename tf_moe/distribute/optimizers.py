"""Optimizers that train per-replica expert shards."""

import keras
import tensorflow as tf

from tf_moe.distribute.expert_parallel import (
    assign_shards,
    gather_all_shards,
    is_replica_local,
    replica_local_variables,
)


class _ShardAwareSaving:
    """Optimizer mixin: per-replica slots are saved whole, like the shards.

    So an optimizer's state restores onto any number of replicas and
    workers.
    """

    def save_own_variables(self, store):
        for i, value in enumerate(gather_all_shards(self.variables)):
            store[str(i)] = value

    def load_own_variables(self, store):
        if len(store.keys()) != len(self.variables):
            # Keras's own message and handling (e.g. an unbuilt optimizer).
            return super().load_own_variables(store)
        for i, variable in enumerate(self.variables):
            assign_shards(variable, store[str(i)][...])


class _ShardAwareUpdates(_ShardAwareSaving):
    """Optimizer mixin: replica-local variables keep their local gradients.

    Keras sums every gradient over the replicas before applying it, which
    is right for mirrored variables but would add the gradients of
    different experts together for a shard. A shard's local gradient is
    already that of the global loss (the exchange's backward pass brings
    each replica the gradients of its experts' slots from every replica),
    so it is applied as it is, and its optimizer slots are per-replica too.
    """

    def _all_reduce_sum_gradients(self, grads_and_vars):
        grads_and_vars = list(grads_and_vars)
        shared = [pair for pair in grads_and_vars if not is_replica_local(pair[1])]
        reduced = iter(super()._all_reduce_sum_gradients(shared))
        return [pair if is_replica_local(pair[1]) else next(reduced) for pair in grads_and_vars]

    def add_variable_from_reference(self, reference_variable, name=None, initializer="zeros"):
        if not is_replica_local(reference_variable):
            return super().add_variable_from_reference(reference_variable, name, initializer)
        with replica_local_variables():
            return super().add_variable_from_reference(reference_variable, name, initializer)


@keras.saving.register_keras_serializable(package="tf_moe")
class ExpertParallelLossScaleOptimizer(_ShardAwareSaving, keras.optimizers.LossScaleOptimizer):
    """`LossScaleOptimizer` whose inner optimizer trains expert shards.

    Keras decides whether a step's gradients are finite on one replica and
    assumes the others agree, since it sums them over replicas first. A
    shard's gradients are never summed, so one replica's shard can overflow
    alone: here every replica skips the step (and halves the scale) when any
    replica's gradients are not finite.
    """

    def check_finite(self, grads):
        finite = super().check_finite(grads)
        context = tf.distribute.get_replica_context()
        if context is None or context.num_replicas_in_sync == 1:
            return finite
        not_finite = context.all_reduce(tf.distribute.ReduceOp.SUM, 1.0 - tf.cast(finite, tf.float32))
        return tf.equal(not_finite, 0.0)


_CLASSES = {}


def expert_parallel_optimizer(optimizer):
    """Returns a copy of a Keras optimizer that can train `ExpertParallelMoE`.

    The copy has the same configuration and behaves identically on mirrored
    variables; gradients of per-replica expert shards are applied on their
    own replica without the cross-replica sum, and their slots (moments,
    momentum, EMA averages) are per replica too. A
    `keras.optimizers.LossScaleOptimizer` comes back as an
    `ExpertParallelLossScaleOptimizer` around the copy of its inner
    optimizer. Create it under the strategy's scope, like the model.

    Args:
        optimizer: a `keras.optimizers.Optimizer` instance (not yet used).

    Returns:
        An optimizer of class `ExpertParallel<Class>`, a subclass of
        `type(optimizer)`.

    Example:

    >>> optimizer = expert_parallel_optimizer(keras.optimizers.Adam(1e-3))
    >>> type(optimizer).__name__
    'ExpertParallelAdam'
    """
    if not isinstance(optimizer, keras.optimizers.Optimizer):
        raise TypeError(f"`optimizer` must be a keras.optimizers.Optimizer, got {optimizer!r}.")
    if isinstance(optimizer, (_ShardAwareUpdates, ExpertParallelLossScaleOptimizer)):
        return optimizer
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        config = optimizer.get_config()
        del config["inner_optimizer"]
        return ExpertParallelLossScaleOptimizer(expert_parallel_optimizer(optimizer.inner_optimizer), **config)
    base = type(optimizer)
    if base not in _CLASSES:
        name = f"ExpertParallel{base.__name__}"
        cls = type(name, (_ShardAwareUpdates, base), {"__doc__": _ShardAwareUpdates.__doc__})
        _CLASSES[base] = keras.saving.register_keras_serializable(package="tf_moe", name=name)(cls)
    return _CLASSES[base].from_config(optimizer.get_config())
