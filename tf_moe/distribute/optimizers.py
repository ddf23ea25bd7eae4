"""Optimizers that train per-replica expert shards."""

import contextlib

import keras
import tensorflow as tf

from tf_moe._internals import KeepLocalGradients
from tf_moe.distribute.expert_parallel import (
    ShardGuard,
    assign_shards,
    gather_all_shards,
    is_replica_local,
    replica_local_variables,
)
from tf_moe.training.fused_optimizers import FusedAdam, FusedAdamW, FusedSGD


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


class ShardAwareUpdates(_ShardAwareSaving, KeepLocalGradients):
    """Optimizer mixin: replica-local variables keep their local gradients.

    Keras sums every gradient over the replicas before applying it, which
    is right for mirrored variables but would add the gradients of
    different experts together for a shard. A shard's local gradient is
    already that of the global loss (the exchange's backward pass brings
    each replica the gradients of its experts' slots from every replica),
    so it is applied as it is, and its optimizer slots are per-replica too.
    `expert_parallel_optimizer` puts it in front of each Keras optimizer;
    for another optimizer class `Opt`, define and register
    `class ExpertParallelOpt(ShardAwareUpdates, Opt)` the same way.
    """

    def keeps_local_gradient(self, variable):
        return is_replica_local(variable)

    def add_variable_from_reference(self, reference_variable, name=None, initializer="zeros"):
        if not is_replica_local(reference_variable):
            return super().add_variable_from_reference(reference_variable, name, initializer)
        with replica_local_variables():
            return super().add_variable_from_reference(reference_variable, name, initializer)

    def build(self, variables):
        super().build(variables)
        # Kept from here: while a step is built, another replica's thread
        # may hold a shard's guard lifted (its constraint None).
        self._shard_guards = tuple(v.constraint for v in variables if isinstance(v.constraint, ShardGuard))

    def apply(self, grads, trainable_variables=None):
        if trainable_variables is not None:
            trainable_variables = list(trainable_variables)
            if not self.built:  # as Keras would inside `apply`, but the guards are needed first
                with keras.name_scope(self.name, caller=self):
                    self.build(trainable_variables)
        with contextlib.ExitStack() as lifted:
            for guard in getattr(self, "_shard_guards", ()):
                lifted.enter_context(guard.lifted())
            return super().apply(grads, trainable_variables)


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


def _expert_parallel_class(base):
    name = f"ExpertParallel{base.__name__}"
    cls = type(name, (ShardAwareUpdates, base), {"__doc__": ShardAwareUpdates.__doc__, "__module__": __name__})
    return keras.saving.register_keras_serializable(package="tf_moe", name=name)(cls)


# Optimizers of other optimizers: wrapped as a whole (or not at all).
_WRAPPERS = ("Optimizer", "LossScaleOptimizer", "MultiOptimizer")
# `ExpertParallel<Class>` of every optimizer of `keras.optimizers` and of
# tf_moe's fused twins, made and registered at import so that a saved
# model's optimizer loads in a fresh process. Never changed afterwards.
_EXPERT_PARALLEL_CLASSES = {
    base: _expert_parallel_class(base)
    for base in [
        *(base for name, base in vars(keras.optimizers).items()
          if isinstance(base, type) and issubclass(base, keras.optimizers.Optimizer) and name not in _WRAPPERS),
        FusedSGD, FusedAdam, FusedAdamW,
    ]
}


def expert_parallel_optimizer(optimizer):
    """Returns a copy of a Keras optimizer that can train `ExpertParallelMoE`.

    The copy has the same configuration and behaves identically on mirrored
    variables; gradients of per-replica expert shards are applied on their
    own replica without the cross-replica sum, and their slots (moments,
    momentum, EMA averages) are per replica too. A
    `keras.optimizers.LossScaleOptimizer` comes back as an
    `ExpertParallelLossScaleOptimizer` around the copy of its inner
    optimizer. Create it under the strategy's scope, like the model. Every
    class it returns is registered for serialization when tf_moe is
    imported, so a model saved with it loads anywhere tf_moe is imported.

    Args:
        optimizer: an instance of one of the optimizers of
            `keras.optimizers` or of `tf_moe.training`'s fused ones (not
            yet used), or of a `LossScaleOptimizer` around one. Another
            optimizer class needs its own `ShardAwareUpdates` subclass
            (see there).

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
    if isinstance(optimizer, (ShardAwareUpdates, ExpertParallelLossScaleOptimizer)):
        return optimizer
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        config = optimizer.get_config()
        del config["inner_optimizer"]
        return ExpertParallelLossScaleOptimizer(expert_parallel_optimizer(optimizer.inner_optimizer), **config)
    if type(optimizer) not in _EXPERT_PARALLEL_CLASSES:
        raise TypeError(
            f"`optimizer`: expert_parallel_optimizer copies the optimizers of keras.optimizers "
            f"({', '.join(sorted(base.__name__ for base in _EXPERT_PARALLEL_CLASSES))}), not "
            f"{type(optimizer).__name__}; define and register `class ExpertParallel"
            f"{type(optimizer).__name__}(tf_moe.distribute.optimizers.ShardAwareUpdates, "
            f"{type(optimizer).__name__})` instead."
        )
    return _EXPERT_PARALLEL_CLASSES[type(optimizer)].from_config(optimizer.get_config())
