"""`expert_parallel_optimizer` with the Keras optimizers' variants, on logical CPUs.

Each trains `ExpertParallelMoE` on 2 replicas and must reach the weights and
optimizer state (moments, momentum, EMA averages, loss scale) of the same
optimizer training `MoELayer` on one device on the same global batches. A
plain Keras optimizer, which would sum different experts' gradients over
the replicas, must stop before its first step; every class the wrapper
makes must load in a fresh process.
"""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests.test_distribute_expert_parallel import _copy_weights, _data, _model, _reference, _strategy
from tf_moe.distribute import ExpertParallelLossScaleOptimizer, ExpertParallelMoE, expert_parallel_optimizer
from tf_moe.distribute.expert_parallel import gather_shards
from tf_moe.distribute.optimizers import _EXPERT_PARALLEL_CLASSES, ShardAwareUpdates

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

OPTIMIZERS = {
    # Plain SGD over 4 steps: its update is proportional to the gradient,
    # so a gradient summed over the wrong replicas shows (Adam's first step
    # would hide it).
    "sgd": lambda: keras.optimizers.SGD(0.5),
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


# The default run takes plain SGD and loss scaling (mixed precision, a
# skipped step); the others take about 20 s each on two shared cores.
@pytest.mark.parametrize(
    "name", ["sgd", "loss_scale"] + [pytest.param(n, marks=pytest.mark.slow) for n in ("adamw", "momentum", "ema")]
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


def _expert_parallel_model(strategy, optimizer=None):
    """ExpertParallelMoE on the strategy's replicas with the reference's weights, and the reference."""
    reference = _reference(None, keras.optimizers.SGD(0.5))
    with strategy.scope():
        model = _model(ExpertParallelMoE, None, optimizer)
        _copy_weights(reference, model)
    return model, reference


def _full_weights(model):
    return [gather_shards(w) for w in model.get_layer("moe").weights]


@pytest.mark.parametrize(
    "optimizer",
    [lambda: keras.optimizers.SGD(0.5), lambda: keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam())],
    ids=["sgd", "loss_scale_adam"],
)
def test_a_plain_optimizer_stops_before_its_first_step(optimizer):
    """It would add the gradients of different experts' shards together."""
    strategy = _strategy(2)
    with strategy.scope():
        plain = optimizer()
    model, _ = _expert_parallel_model(strategy, plain)
    before = _full_weights(model)
    x, y = _data(16)
    with pytest.raises(ValueError, match="expert_parallel_optimizer"):
        model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    assert int(model.optimizer.iterations.numpy()) == 0
    for weight, value in zip(_full_weights(model), before):
        np.testing.assert_array_equal(weight, value)


def _custom_loop(strategy, model, optimizer, x, y, batch):
    """Steps of a `tf.function` training loop (the optimizer built lazily, at its first step)."""
    dataset = strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensor_slices((x, y)).batch(batch))

    def replica_step(inputs, targets):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.square(model(inputs, training=True) - targets)) / (batch * 3 * x.shape[-1])
            loss += tf.add_n(model.losses) / strategy.num_replicas_in_sync
        optimizer.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables))

    step = tf.function(lambda inputs, targets: strategy.run(replica_step, args=(inputs, targets)))
    for inputs, targets in dataset:
        step(inputs, targets)


def test_a_custom_training_loop_trains_with_the_wrapper_and_stops_without():
    strategy = _strategy(2)
    x, y = _data(32)
    with strategy.scope():
        wrapped = expert_parallel_optimizer(keras.optimizers.SGD(0.5))
    model, reference = _expert_parallel_model(strategy)
    _custom_loop(strategy, model, wrapped, x, y, batch=16)
    reference.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    for weight, expected in zip(_full_weights(model), reference.get_layer("moe").weights):
        np.testing.assert_allclose(weight, expected.numpy(), rtol=1e-4, atol=1e-6, err_msg=expected.path)

    with strategy.scope():
        plain = keras.optimizers.SGD(0.5)
    model, _ = _expert_parallel_model(strategy)
    before = _full_weights(model)
    with pytest.raises(ValueError, match="expert_parallel_optimizer"):
        _custom_loop(strategy, model, plain, x, y, batch=16)
    for weight, value in zip(_full_weights(model), before):
        np.testing.assert_array_equal(weight, value)


_LOAD_IN_A_FRESH_PROCESS = """
import copy, json, sys
import keras, numpy as np
import tf_moe  # registers every optimizer class expert_parallel_optimizer makes

model_path, optimizers_path = sys.argv[1:]
model = keras.saving.load_model(model_path)
with open(optimizers_path) as f:
    serialized = json.load(f)
# (deserialize consumes parts of the config it is given)
restored = {name: keras.optimizers.deserialize(copy.deepcopy(config)) for name, config in serialized.items()}
print(json.dumps({
    "optimizer": type(model.optimizer).__name__,
    "slots": [np.asarray(v).tolist() for v in model.optimizer.variables],
    "outputs": model.predict(np.load(model_path + ".x.npy"), verbose=0).tolist(),
    "classes": {name: type(o).__name__ for name, o in restored.items()},
    "same": {name: keras.optimizers.serialize(o) == serialized[name] for name, o in restored.items()},
}))
"""


def test_every_optimizer_class_the_wrapper_makes_loads_in_a_fresh_process(tmp_path):
    model = _model(ExpertParallelMoE, None, expert_parallel_optimizer(keras.optimizers.SGD(0.1, momentum=0.9)))
    x, y = _data(8)
    model.fit(x, y, epochs=2, verbose=0)  # momentum slots that are not zero
    model_path = str(tmp_path / "model.keras")
    model.save(model_path)
    np.save(model_path + ".x.npy", x)
    serialized = {
        base.__name__: keras.optimizers.serialize(expert_parallel_optimizer(base()))
        for base in _EXPERT_PARALLEL_CLASSES
    }
    serialized["LossScaleOptimizer"] = keras.optimizers.serialize(
        expert_parallel_optimizer(keras.optimizers.LossScaleOptimizer(keras.optimizers.Lion()))
    )
    with open(tmp_path / "optimizers.json", "w") as f:
        json.dump(serialized, f)
    done = subprocess.run(
        [sys.executable, "-c", _LOAD_IN_A_FRESH_PROCESS, model_path, str(tmp_path / "optimizers.json")],
        env=dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="3"), cwd=ROOT, capture_output=True,
        text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["optimizer"] == "ExpertParallelSGD"
    for slot, expected in zip(got["slots"], model.optimizer.variables):
        np.testing.assert_array_equal(np.asarray(slot, dtype=expected.dtype), np.asarray(expected))
    np.testing.assert_array_equal(np.asarray(got["outputs"], "float32"), model.predict(x, verbose=0))
    assert got["classes"] == {
        **{name: f"ExpertParallel{name}" for name in serialized if name != "LossScaleOptimizer"},
        "LossScaleOptimizer": "ExpertParallelLossScaleOptimizer",
    }
    assert all(got["same"].values()), got["same"]


def test_other_optimizer_classes_need_their_own_subclass():
    class Custom(keras.optimizers.SGD):
        pass

    with pytest.raises(TypeError, match="`optimizer`.*ShardAwareUpdates, Custom"):
        expert_parallel_optimizer(Custom())

    class ExpertParallelCustom(ShardAwareUpdates, Custom):
        pass

    own = ExpertParallelCustom(0.1)
    assert expert_parallel_optimizer(own) is own
