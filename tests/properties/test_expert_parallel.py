"""Properties of `ExpertParallelMoE` under MirroredStrategy on 2 logical CPUs.

For any router with an even number of experts and any case of the
single-device properties (each replica taking half the batch): the
predicted ValueError or finite outputs, losses and gradients; masked
outputs exactly zero and masked contents changing nothing; and, at
inference, each replica's outputs equal to `MoELayer` with the same weights
on its half. Training: several SGD steps of `expert_parallel_optimizer`
on the two halves reach the weights of `MoELayer` trained by SGD on the
whole batch on one device.
"""

import dataclasses

import keras
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import strategies as st

from tests.properties.cases import (
    PROFILES,
    ROUTERS,
    TOLERANCE,
    Spec,
    as_input,
    build_layer,
    cases,
    documented_error,
    make_inputs,
    moe_layer_specs,
    predicted_error,
    require_predicted_error,
    run_property,
)
from tf_moe.distribute import ExpertParallelMoE, expert_parallel_optimizer, get_strategy
from tf_moe.distribute.expert_parallel import gather_shards

REPLICAS = 2


def _even_experts(spec):
    return spec.build().num_experts % REPLICAS == 0


# MoELayer specs whose router has a multiple of REPLICAS experts.
LAYERS = moe_layer_specs(st.one_of(*[routers.filter(_even_experts) for routers in ROUTERS.values()]))


def _halves(values):
    return np.split(values, REPLICAS) if values is not None else [None] * REPLICAS


def _per_replica(strategy, case, values, inputs, router_inputs):
    """Each replica's half of the inputs, mask, probe and router inputs."""
    halves = {
        "x": [as_input(v, case) for v in _halves(values)],
        "mask": _halves(inputs.mask),
        "probe": _halves(inputs.probe),
        **{name: _halves(value) for name, value in router_inputs.items()},
    }
    return {
        key: strategy.experimental_distribute_values_from_function(
            lambda context, parts=parts: parts[context.replica_id_in_sync_group]
        )
        for key, parts in halves.items()
        if parts[0] is not None
    }


def _run_replicas(strategy, layer, case, values, inputs, router_inputs):
    """One call of the layer on each replica's half; per replica (outputs, losses, gradients)."""

    def step(x, probe, mask=None, **router_inputs):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, mask=mask, training=case.training, **router_inputs)
            losses = list(layer.losses)
            objective = tf.reduce_sum(tf.cast(y, tf.float32) * probe) + tf.add_n(losses + [tf.zeros(())])
        grads = tape.gradient(
            objective, [x] + [w.value for w in layer.trainable_weights],
            unconnected_gradients=tf.UnconnectedGradients.ZERO,
        )
        return tf.cast(y, tf.float32), losses, [tf.cast(g, tf.float32) for g in grads]

    results = strategy.run(step, kwargs=_per_replica(strategy, case, values, inputs, router_inputs))
    return [tf.nest.map_structure(np.asarray, r) for r in strategy.experimental_local_results(results)]


def _expert_parallel_copy(strategy, reference, case):
    """`ExpertParallelMoE` built under `strategy` with the weights of the single-device `reference`."""
    with strategy.scope():
        layer = Spec(ExpertParallelMoE, case.layer.kwargs).build(dtype=case.policy)
        layer.build((None,) * len(case.leading) + (case.units,))
        layer.router.set_weights(reference.router.get_weights())
        layer.experts.load_own_variables({str(i): w.numpy() for i, w in enumerate(reference.experts.weights)})
        if reference.shared_experts is not None:
            layer.shared_experts.set_weights(reference.shared_experts.get_weights())
    return layer


def check_expert_parallel(case, strategy):
    reference = build_layer(case)
    inputs = make_inputs(case, reference.compute_output_shape((None, case.units))[-1], reference.router)
    layer = _expert_parallel_copy(strategy, reference, case)
    # Each replica routes its own half.
    predicted = predicted_error(layer.router, case.num_tokens // REPLICAS, case.training)
    try:
        router_state = [v.numpy() for v in layer.router.variables]
        clean = _run_replicas(strategy, layer, case, inputs.clean, inputs, inputs.router_inputs)
        for variable, value in zip(layer.router.variables, router_state):
            variable.assign(value)
        poisoned = _run_replicas(strategy, layer, case, inputs.poisoned, inputs, inputs.poisoned_router_inputs)
    except ValueError as error:
        documented_error(error, predicted)
        return
    require_predicted_error(predicted)
    valid = _halves(inputs.valid.reshape(case.leading))
    for replica, ((y, losses, grads), (y_poisoned, losses_poisoned, grads_poisoned)) in enumerate(zip(clean, poisoned)):
        assert np.all(np.isfinite(y)) and all(np.isfinite(loss) for loss in losses)
        assert all(np.all(np.isfinite(g)) for g in grads)
        assert len(losses) == (1 if case.training else 0)
        np.testing.assert_array_equal(y[~valid[replica]], 0.0)
        np.testing.assert_array_equal(y_poisoned, y)
        np.testing.assert_array_equal(losses_poisoned, losses)
        for got, want in zip(grads_poisoned, grads):
            np.testing.assert_array_equal(got, want)
        if not case.training:
            x = _halves(inputs.poisoned)[replica]
            mask = _halves(inputs.mask)[replica]
            router_inputs = {name: _halves(v)[replica] for name, v in inputs.poisoned_router_inputs.items()}
            outputs = reference(as_input(x, case), mask=mask, training=False, **router_inputs)
            want = np.asarray(tf.cast(outputs, tf.float32))
            # The replicas sum a token's k outputs in another order: in float16 or
            # bfloat16 that rounds differently, by up to a few units of its last place.
            tolerance = 1e-5 if case.policy == "float32" else TOLERANCE[case.policy]
            np.testing.assert_allclose(y, want, rtol=tolerance, atol=tolerance * max(1.0, np.abs(want).max(initial=0.0)))


@pytest.fixture(scope="module")
def strategy():
    devices = [d.name for d in tf.config.list_logical_devices("CPU")[:REPLICAS]]
    return get_strategy("mirrored", devices=devices)


@pytest.mark.parametrize("profile", PROFILES)
def test_expert_parallel_properties(strategy, profile):
    run_property(
        profile,
        cases(LAYERS, batch_multiple=REPLICAS, max_tokens=24),
        lambda case: check_expert_parallel(case, strategy),
        share=0.4,
    )


# Training on each replica's half equals training on the whole batch where
# routing is per token and deterministic: no noise or jitter (the replicas
# draw their own), dropless (a replica's capacity comes from its own
# tokens; so is the hierarchical router's group capacity). Expert choice
# and batchwise gating rank each replica's half on its own, by design, so
# they have no single-device equal.
_STEPS, _LEARNING_RATE = 3, 0.1
_DETERMINISTIC = {"noisy": False, "jitter_epsilon": 0.0, "capacity_factor": None}


def _deterministic(spec):
    router = spec.kwargs["router"]
    router_kwargs = {key: _DETERMINISTIC.get(key, value) for key, value in router.kwargs.items()}
    router = dataclasses.replace(router, kwargs=router_kwargs)
    return dataclasses.replace(spec, kwargs={**spec.kwargs, "router": router, "capacity_factor": None})


TRAINING_LAYERS = moe_layer_specs(
    st.one_of(*[
        ROUTERS[name].filter(_even_experts)
        for name in sorted(ROUTERS) if name not in ("expert_choice", "batchwise")
    ])
).map(_deterministic)


def _objective(layer, x, probe, mask, router_inputs, replicas):
    y = layer(x, mask=mask, training=True, **router_inputs)
    # Each replica adds the (global-batch) losses / replicas: the sum over
    # replicas of the gradients is that of the one-device objective.
    losses = tf.add_n(list(layer.losses) + [tf.zeros(())]) / replicas
    return tf.reduce_sum(tf.cast(y, tf.float32) * probe) + losses


def _train_reference(layer, case, inputs):
    x = as_input(inputs.clean, case)
    for _ in range(_STEPS):
        with tf.GradientTape() as tape:
            objective = _objective(layer, x, inputs.probe, inputs.mask, inputs.router_inputs, 1)
        for weight, gradient in zip(layer.trainable_weights, tape.gradient(objective, layer.trainable_weights)):
            if gradient is not None:
                weight.assign_sub(_LEARNING_RATE * gradient)


def _train_expert_parallel(strategy, layer, case, inputs):
    with strategy.scope():
        optimizer = expert_parallel_optimizer(keras.optimizers.SGD(_LEARNING_RATE))

    def replica_step(x, probe, mask=None, **router_inputs):
        with tf.GradientTape() as tape:
            objective = _objective(layer, x, probe, mask, router_inputs, REPLICAS)
        gradients = tape.gradient(objective, layer.trainable_weights)
        optimizer.apply_gradients(
            [(g, w) for g, w in zip(gradients, layer.trainable_weights) if g is not None]
        )

    step = tf.function(lambda kwargs: strategy.run(replica_step, kwargs=kwargs))
    per_replica = _per_replica(strategy, case, inputs.clean, inputs, inputs.router_inputs)
    for _ in range(_STEPS):
        step(per_replica)


def check_expert_parallel_training(case, strategy):
    reference = build_layer(case)
    inputs = make_inputs(case, reference.compute_output_shape((None, case.units))[-1], reference.router)
    layer = _expert_parallel_copy(strategy, reference, case)
    _train_expert_parallel(strategy, layer, case, inputs)
    _train_reference(reference, case, inputs)
    for weight, want in zip(layer.weights, reference.weights):
        want = want.numpy()
        got = gather_shards(weight)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * max(1.0, np.abs(want).max()), err_msg=weight.path)


@pytest.mark.parametrize("profile", PROFILES)
def test_expert_parallel_training_equals_one_device(strategy, profile):
    training_cases = cases(TRAINING_LAYERS, policies=("float32",), batch_multiple=REPLICAS, max_tokens=24)
    run_property(
        profile,
        training_cases.map(lambda case: dataclasses.replace(case, training=True)),
        lambda case: check_expert_parallel_training(case, strategy),
        share=0.2,
    )
