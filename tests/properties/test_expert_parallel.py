"""Properties of `ExpertParallelMoE` under MirroredStrategy on 2 logical CPUs.

For any router with an even number of experts and any case of the
single-device properties (each replica taking half the batch): a ValueError
naming an argument or finite outputs, losses and gradients; masked outputs
exactly zero and masked contents changing nothing; and, at inference, each
replica's outputs equal to `MoELayer` with the same weights on its half.
"""

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import strategies as st

from tests.properties.cases import (
    PROFILES,
    ROUTERS,
    Spec,
    as_input,
    build_layer,
    cases,
    documented_error,
    make_inputs,
    moe_layer_specs,
    run_property,
)
from tf_moe.distribute import ExpertParallelMoE, get_strategy

REPLICAS = 2


def _even_experts(spec):
    return spec.build().num_experts % REPLICAS == 0


# MoELayer specs whose router has a multiple of REPLICAS experts.
LAYERS = moe_layer_specs(st.one_of(*[routers.filter(_even_experts) for routers in ROUTERS.values()]))


def _halves(values):
    return np.split(values, REPLICAS) if values is not None else [None] * REPLICAS


def _run_replicas(strategy, layer, case, values, inputs):
    """One call of the layer on each replica's half; per replica (outputs, losses, gradients)."""
    halves = {
        "x": [as_input(v, case) for v in _halves(values)],
        "mask": _halves(inputs.mask),
        "probe": _halves(inputs.probe),
    }
    per_replica = {
        key: strategy.experimental_distribute_values_from_function(
            lambda context, parts=parts: parts[context.replica_id_in_sync_group]
        )
        for key, parts in halves.items()
        if parts[0] is not None
    }

    def step(x, probe, mask=None):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, mask=mask, training=case.training)
            losses = list(layer.losses)
            objective = tf.reduce_sum(tf.cast(y, tf.float32) * probe) + tf.add_n(losses + [tf.zeros(())])
        grads = tape.gradient(
            objective, [x] + [w.value for w in layer.trainable_weights],
            unconnected_gradients=tf.UnconnectedGradients.ZERO,
        )
        return tf.cast(y, tf.float32), losses, [tf.cast(g, tf.float32) for g in grads]

    results = strategy.run(step, kwargs=per_replica)
    return [tf.nest.map_structure(np.asarray, r) for r in strategy.experimental_local_results(results)]


def check_expert_parallel(case, strategy):
    reference = build_layer(case)
    inputs = make_inputs(case, reference.compute_output_shape((None, case.units))[-1])
    layer = None
    try:
        with strategy.scope():
            layer = Spec(ExpertParallelMoE, case.layer.kwargs).build(dtype=case.policy)
            layer.build((None,) * len(case.leading) + (case.units,))
            layer.router.set_weights(reference.router.get_weights())
            layer.experts.load_own_variables({str(i): w.numpy() for i, w in enumerate(reference.experts.weights)})
        router_state = [v.numpy() for v in layer.router.variables]
        clean = _run_replicas(strategy, layer, case, inputs.clean, inputs)
        for variable, value in zip(layer.router.variables, router_state):
            variable.assign(value)
        poisoned = _run_replicas(strategy, layer, case, inputs.poisoned, inputs)
    except ValueError as error:
        documented_error(error, *([] if layer is None else [layer, layer.router]))
        return
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
            want = np.asarray(tf.cast(reference(as_input(x, case), mask=mask, training=False), tf.float32))
            np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)


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
