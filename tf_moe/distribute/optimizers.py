"""Optimizers that train per-replica expert shards."""

import keras

from tf_moe.distribute.expert_parallel import (
    assign_shards,
    gather_shards,
    is_replica_local,
    replica_local_variables,
)


class _ShardAwareUpdates:
    """Optimizer mixin: replica-local variables keep their local gradients.

    Keras sums every gradient over the replicas before applying it, which
    is right for mirrored variables but would add the gradients of
    different experts together for a shard. A shard's local gradient is
    already that of the global loss (the all-gathers of the exchange sum
    the incoming gradients over replicas), so it is applied as it is, and
    its optimizer slots are per-replica too.
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

    def save_own_variables(self, store):
        # Shard slots are saved whole, like the shards, for any replica count.
        for i, variable in enumerate(self.variables):
            store[str(i)] = gather_shards(variable)

    def load_own_variables(self, store):
        if len(store.keys()) != len(self.variables):
            # Keras's own message and handling (e.g. an unbuilt optimizer).
            return super().load_own_variables(store)
        for i, variable in enumerate(self.variables):
            assign_shards(variable, store[str(i)][...])


_CLASSES = {}


def expert_parallel_optimizer(optimizer):
    """Returns a copy of a Keras optimizer that can train `ExpertParallelMoE`.

    The copy has the same configuration and behaves identically on mirrored
    variables; gradients of per-replica expert shards are applied on their
    own replica without the cross-replica sum. Create it under the
    strategy's scope, like the model.

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
    base = type(optimizer)
    if isinstance(optimizer, _ShardAwareUpdates):
        return optimizer
    if base not in _CLASSES:
        name = f"ExpertParallel{base.__name__}"
        cls = type(name, (_ShardAwareUpdates, base), {"__doc__": _ShardAwareUpdates.__doc__})
        _CLASSES[base] = keras.saving.register_keras_serializable(package="tf_moe", name=name)(cls)
    return _CLASSES[base].from_config(optimizer.get_config())
