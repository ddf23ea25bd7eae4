"""`expert_parallel_optimizer` with the Keras optimizers' variants, on logical CPUs.

Each trains `ExpertParallelMoE` on 2 replicas and must reach the weights and
optimizer state (moments, momentum, EMA averages, loss scale) of the same
optimizer training `MoELayer` on one device on the same global batches.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests.test_distribute_expert_parallel import _copy_weights, _data, _model, _reference, _strategy
from tf_moe.distribute import ExpertParallelLossScaleOptimizer, ExpertParallelMoE, expert_parallel_optimizer
from tf_moe.distribute.expert_parallel import gather_shards

OPTIMIZERS = {
    "adamw": lambda: keras.optimizers.AdamW(0.05, weight_decay=0.1),
    "momentum": lambda: keras.optimizers.SGD(0.1, momentum=0.9, nesterov=True),
    # Overwritten with the averages at the end of `fit`.
    "ema": lambda: keras.optimizers.Adam(0.05, use_ema=True, ema_momentum=0.5),
    # Under mixed_float16 a scale of 2**20 overflows the first step's
    # gradients: that step is skipped and the scale halved, then it trains.
    "loss_scale": lambda: keras.optimizers.LossScaleOptimizer(
        keras.optimizers.Adam(0.05), initial_scale=2.0**20, dynamic_growth_steps=1000
    ),
}


# The default run takes loss scaling (mixed precision, a skipped step);
# the others take about 20 s each on two shared cores.
@pytest.mark.parametrize(
    "name", ["loss_scale"] + [pytest.param(n, marks=pytest.mark.slow) for n in ("adamw", "momentum", "ema")]
)
def test_variant_equals_single_device_training(name):
    policy = keras.config.dtype_policy()
    if name == "loss_scale":
        keras.config.set_dtype_policy("mixed_float16")
    try:
        x, y = _data(32)
        reference = _reference(None, OPTIMIZERS[name]())
        with _strategy(2).scope():
            model = _model(ExpertParallelMoE, None, expert_parallel_optimizer(OPTIMIZERS[name]()))
            _copy_weights(reference, model)
        expected = reference.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0).history
        got = model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0).history
    finally:
        keras.config.set_dtype_policy(policy)
    tolerance = dict(rtol=1e-3, atol=1e-4) if name == "loss_scale" else dict(rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got["loss"], expected["loss"], **tolerance)
    for weight, ref_weight in zip(model.get_layer("moe").weights, reference.get_layer("moe").weights):
        np.testing.assert_allclose(gather_shards(weight), ref_weight.numpy(), err_msg=ref_weight.path, **tolerance)
    assert len(model.optimizer.variables) == len(reference.optimizer.variables)
    for slot, ref_slot in zip(model.optimizer.variables, reference.optimizer.variables):
        np.testing.assert_allclose(gather_shards(slot), np.asarray(ref_slot), err_msg=ref_slot.path, **tolerance)
    if name == "loss_scale":
        assert int(model.optimizer.iterations.numpy()) == 3  # one of 4 steps skipped, as on one device
        assert float(model.optimizer.dynamic_scale.numpy()) == 2.0**19


def test_loss_scale_optimizer_wraps_its_inner_optimizer():
    base = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.2, momentum=0.5), initial_scale=64.0)
    wrapped = expert_parallel_optimizer(base)
    assert isinstance(wrapped, ExpertParallelLossScaleOptimizer)
    assert type(wrapped.inner_optimizer).__name__ == "ExpertParallelSGD"
    assert wrapped.inner_optimizer.get_config() == base.inner_optimizer.get_config()
    assert wrapped.initial_scale == 64.0
    assert expert_parallel_optimizer(wrapped) is wrapped
    restored = keras.optimizers.deserialize(keras.optimizers.serialize(wrapped))
    assert type(restored) is ExpertParallelLossScaleOptimizer
    assert type(restored.inner_optimizer) is type(wrapped.inner_optimizer)


def test_loss_scale_skips_the_step_on_every_replica_when_one_overflows():
    """Shard gradients are not summed: one replica's inf must stop all replicas."""
    strategy = _strategy(2)
    with strategy.scope():
        optimizer = expert_parallel_optimizer(keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD()))
    grads = strategy.experimental_distribute_values_from_function(
        lambda context: tf.constant([1.0, np.inf][context.replica_id_in_sync_group])[None]
    )
    finite = strategy.run(tf.function(lambda g: optimizer.check_finite([g])), args=(grads,))
    assert [bool(f) for f in strategy.experimental_local_results(finite)] == [False, False]
