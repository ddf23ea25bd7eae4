"""Keras's SGD, Adam and AdamW with each variable's update in one fused TensorFlow kernel.

Keras writes its updates as chains of tensor operations: SGD's
`w -= lr * g` makes a scaled copy of the gradient before subtracting it,
and Adam's update makes about a dozen full-size temporaries. For an MoE,
whose stacked expert banks hold `num_experts / k` times a dense layer's
weights, that traffic is most of the optimizer's time. The classes here
keep Keras's optimizers whole (configuration, learning-rate schedules,
clipping, weight decay, EMA, gradient accumulation, loss scaling,
saving) and replace only `update_step` for dense gradients with
TensorFlow's fused kernels (`ResourceApplyGradientDescent`,
`ResourceApplyKerasMomentum`, `ResourceApplyAdam`,
`ResourceApplyAdamWithAmsgrad`), which read the gradient and each slot
once and update the variable in place. They compute Keras's formulas in
the same order; only the constants `1 - beta` are rounded in the
variable's dtype instead of in Python (a difference of one unit in the
last place of the moment updates). Sparse gradients (`tf.IndexedSlices`,
e.g. an embedding's) take Keras's own update, and so does every variable
in a step compiled by XLA (`jit_compile=True`), which fuses Keras's
operations itself.
"""

import keras
import tensorflow as tf
from keras import ops

from tf_moe._internals import in_xla_compilation


def _resource(variable):
    """The resource handle of a Keras or TensorFlow variable (the local copy inside a strategy's update)."""
    if isinstance(variable, keras.Variable):
        variable = variable.value
    return variable.handle


def _fusable(gradient, variable):
    """Whether the fused kernels take this update: a dense gradient outside XLA (which lacks some of them)."""
    return not isinstance(gradient, tf.IndexedSlices) and variable.dtype.is_floating and not in_xla_compilation()


class _FusedUpdate:
    """Optimizer mixin: `_fused_update` where `_fusable`, else Keras's `update_step`."""

    def update_step(self, gradient, variable, learning_rate):
        if not _fusable(gradient, variable):
            return super().update_step(gradient, variable, learning_rate)
        dtype = variable.dtype
        self._fused_update(ops.cast(gradient, dtype), variable, ops.cast(learning_rate, dtype))

    def _fused_update(self, gradient, variable, learning_rate):
        raise NotImplementedError


@keras.saving.register_keras_serializable(package="tf_moe")
class FusedSGD(_FusedUpdate, keras.optimizers.SGD):
    """`keras.optimizers.SGD` whose update of each variable is one fused kernel.

    Same arguments, state and results as `keras.optimizers.SGD` (plain,
    momentum or Nesterov): `w -= lr * g` reads the gradient and the
    weight once and writes the weight once, where Keras's update also
    writes and reads back a scaled copy of the gradient.

    Example:

    >>> optimizer = FusedSGD(learning_rate=0.1, momentum=0.9)
    >>> optimizer.get_config()["momentum"]
    0.9
    """

    def _fused_update(self, gradient, variable, learning_rate):
        if self.momentum == 0:
            tf.raw_ops.ResourceApplyGradientDescent(
                var=_resource(variable), alpha=learning_rate, delta=gradient
            )
            return
        momentum = self.momentums[self._get_variable_index(variable)]
        tf.raw_ops.ResourceApplyKerasMomentum(
            var=_resource(variable), accum=_resource(momentum), lr=learning_rate, grad=gradient,
            momentum=ops.cast(self.momentum, variable.dtype), use_nesterov=self.nesterov,
        )


class _FusedAdamUpdate(_FusedUpdate):
    """The Adam update (Keras's `Adam.update_step`) in one kernel per variable."""

    def _fused_update(self, gradient, variable, learning_rate):
        dtype = variable.dtype
        local_step = ops.cast(self.iterations + 1, dtype)
        beta_1, beta_2 = ops.cast(self.beta_1, dtype), ops.cast(self.beta_2, dtype)
        index = self._get_variable_index(variable)
        arguments = dict(
            var=_resource(variable),
            m=_resource(self._momentums[index]),
            v=_resource(self._velocities[index]),
            beta1_power=ops.power(beta_1, local_step),
            beta2_power=ops.power(beta_2, local_step),
            lr=learning_rate,
            beta1=beta_1,
            beta2=beta_2,
            epsilon=ops.cast(self.epsilon, dtype),
            grad=gradient,
        )
        if self.amsgrad:
            tf.raw_ops.ResourceApplyAdamWithAmsgrad(vhat=_resource(self._velocity_hats[index]), **arguments)
        else:
            tf.raw_ops.ResourceApplyAdam(**arguments)


@keras.saving.register_keras_serializable(package="tf_moe")
class FusedAdam(_FusedAdamUpdate, keras.optimizers.Adam):
    """`keras.optimizers.Adam` whose update of each variable is one fused kernel.

    Same arguments, state and results as `keras.optimizers.Adam` (also
    with `amsgrad`): the gradient, both moments and the weight are read
    once and the moments and the weight written once, where Keras's
    update passes over about a dozen full-size temporaries.

    Example:

    >>> optimizer = FusedAdam(learning_rate=1e-3)
    >>> optimizer.get_config()["beta_1"]
    0.9
    """


@keras.saving.register_keras_serializable(package="tf_moe")
class FusedAdamW(_FusedAdamUpdate, keras.optimizers.AdamW):
    """`keras.optimizers.AdamW` whose Adam update of each variable is one fused kernel.

    Same arguments, state and results as `keras.optimizers.AdamW`. The
    decoupled weight decay, `w -= lr * weight_decay * w`, stays Keras's own
    pass before the update.

    Example:

    >>> optimizer = FusedAdamW(learning_rate=1e-3, weight_decay=0.01)
    >>> optimizer.get_config()["weight_decay"]
    0.01
    """


_FUSED = {
    keras.optimizers.SGD: FusedSGD,
    keras.optimizers.Adam: FusedAdam,
    keras.optimizers.AdamW: FusedAdamW,
}


def fused_optimizer(optimizer):
    """The fused twin of a Keras SGD, Adam or AdamW optimizer, with the same configuration.

    A `keras.optimizers.LossScaleOptimizer` comes back around the fused
    twin of its inner optimizer; a fused optimizer comes back as it is. To
    train `tf_moe.ExpertParallelMoE`, fuse first, then make it expert
    parallel: `expert_parallel_optimizer(fused_optimizer(optimizer))`.

    Args:
        optimizer: an unused `keras.optimizers.SGD`, `Adam` or `AdamW`
            (exactly those classes; subclasses may change the update).

    Returns:
        A `FusedSGD`, `FusedAdam` or `FusedAdamW` built from the
        optimizer's config.

    Example:

    >>> optimizer = fused_optimizer(keras.optimizers.Adam(1e-3))
    >>> type(optimizer).__name__
    'FusedAdam'
    """
    if isinstance(optimizer, _FusedUpdate):
        return optimizer
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        config = optimizer.get_config()
        del config["inner_optimizer"]
        return keras.optimizers.LossScaleOptimizer(fused_optimizer(optimizer.inner_optimizer), **config)
    fused = _FUSED.get(type(optimizer))
    if fused is None:
        names = ", ".join(f"keras.optimizers.{cls.__name__}" for cls in _FUSED)
        raise ValueError(f"`optimizer` must be one of {names} (or a LossScaleOptimizer of one), got {optimizer!r}.")
    if optimizer.built:
        raise ValueError(
            "`optimizer` has already been used (it holds training state); fuse a new one before training."
        )
    return fused.from_config(optimizer.get_config())
