"""Properties of every MoE layer (`MoELayer` with each router, `MoE`, `HierarchicalMoE`).

For any rank, token count (zero included), mask, masked contents, dtype,
policy, capacity and training flag: the layer raises a ValueError naming
the argument exactly in the cases `predicted_error` says are invalid, and
otherwise gives finite outputs, losses and gradients; masked outputs are
exactly zero and what masked positions hold changes nothing; the output
is the dense numpy MoE of the routing it used, less exactly the
assignments its capacity drops, within rounding of what it sums.
"""

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import assume
from hypothesis import strategies as st

from tests.properties.cases import (
    LAYERS,
    PROFILES,
    TOLERANCE,
    as_input,
    as_seen,
    build_layer,
    cases,
    documented_error,
    make_inputs,
    predicted_error,
    reference_outputs,
    require_predicted_error,
    run_layer,
    run_property,
    snapshot,
)


def _finite(values, what):
    for i, value in enumerate(values):
        assert np.all(np.isfinite(value)), f"{what}[{i}] is not finite: {value}"


def _prepared(case):
    """The case's layer, its inputs and the error the call must raise (if any)."""
    layer = build_layer(case)
    inputs = make_inputs(case, layer.compute_output_shape((None, case.units))[-1], layer.router)
    return layer, inputs, predicted_error(layer.router, case.num_tokens, case.training)


def check_finite_and_masked_positions_reach_nothing(case):
    layer, inputs, predicted = _prepared(case)
    try:
        restore = snapshot(layer)
        clean = run_layer(layer, case, inputs.clean, inputs)
        restore()
        poisoned = run_layer(layer, case, inputs.poisoned, inputs, poisoned=True)
    except ValueError as error:
        documented_error(error, predicted)
        return
    require_predicted_error(predicted)
    _finite([clean.outputs], "outputs")
    _finite(clean.losses, "losses")
    _finite(clean.gradients, "gradients")
    _finite(list(clean.balance.values()), "balance metrics")
    assert len(clean.losses) == (1 if case.training else 0)
    valid = inputs.valid
    np.testing.assert_array_equal(clean.outputs.reshape(len(valid), clean.outputs.shape[-1])[~valid], 0.0)
    # Masked tokens get no assignment.
    assert np.all(clean.routing.expert_id[~valid[clean.routing.token_id]] == layer.num_experts)
    # Whatever masked positions hold (NaN, inf, garbage) changes nothing at all.
    np.testing.assert_array_equal(poisoned.outputs, clean.outputs)
    assert poisoned.losses == clean.losses
    for got, want in zip(poisoned.gradients, clean.gradients):
        np.testing.assert_array_equal(got, want)
    for field in ("token_id", "expert_id", "weight", "importance", "load", "dropped"):
        np.testing.assert_array_equal(getattr(poisoned.routing, field), getattr(clean.routing, field), err_msg=field)
    assert poisoned.balance == clean.balance


def check_output_equals_the_dense_reference(case):
    layer, inputs, predicted = _prepared(case)
    try:
        run = run_layer(layer, case, inputs.poisoned, inputs, gradients=False, poisoned=True)
    except ValueError as error:
        documented_error(error, predicted)
        return
    require_predicted_error(predicted)
    want, magnitude, dropped, routed = reference_outputs(
        layer, case, as_seen(inputs.clean, case, layer), run.routing, layer.capacity_factor, inputs.valid
    )
    got = run.outputs.reshape(want.shape)
    allowed = TOLERANCE[case.policy] * magnitude + 1e-6
    assert np.all(np.abs(got - want) <= allowed), (
        f"deviation/allowed up to {np.max(np.abs(got - want) / allowed, initial=0.0):.3g}:\n{got}\n{want}"
    )
    fraction = run.balance[f"{layer.name}_dropped_fraction"]
    assert fraction == pytest.approx(dropped / max(routed, 1.0), rel=1e-6, abs=1e-9)


def _is_random(layer, case, inputs, run, draws=16):
    """Whether another call (the noise seeds moved on) gives other outputs or losses than `run`.

    Up to `draws` more calls: with one token and two experts a second draw
    routes the same way half the time, and with one expert the jitter
    changes only the z-loss.
    """
    for _ in range(draws):
        again = run_layer(layer, case, inputs.poisoned, inputs, gradients=False, poisoned=True)
        if not (np.array_equal(again.outputs, run.outputs) and again.losses == run.losses):
            return True
    return False


def check_graph_with_unknown_shapes_equals_eager(case, jit_compile):
    """One trace per case (unknown leading axes: the dynamic capacity path), optionally under XLA."""
    layer, inputs, predicted = _prepared(case)
    try:
        restore = snapshot(layer)
        eager = run_layer(layer, case, inputs.poisoned, inputs, gradients=False, poisoned=True)
    except ValueError as error:
        documented_error(error, predicted)
        return
    require_predicted_error(predicted)
    # XLA compiles only layers that say they can (Keras's `jit_compile="auto"`
    # asks the same); every one that says so must.
    assume(layer.supports_jit or not jit_compile)
    restore()
    layer.balance.reset_state()
    unknown = [None] * len(case.leading)
    router_inputs = {name: tf.constant(value) for name, value in inputs.poisoned_router_inputs.items()}
    signature = [
        tf.TensorSpec(unknown + [case.units], case.input_dtype),
        {name: tf.TensorSpec(unknown, value.dtype) for name, value in router_inputs.items()},
    ]
    arguments = [as_input(inputs.poisoned, case), router_inputs]
    if inputs.mask is not None:
        signature.append(tf.TensorSpec(unknown, inputs.mask.dtype))
        arguments.append(tf.constant(inputs.mask))

    @tf.function(input_signature=signature, jit_compile=jit_compile, autograph=False)
    def call(x, router_inputs, mask=None):
        outputs = layer(x, mask=mask, training=case.training, **router_inputs)
        return tf.cast(outputs, tf.float32), layer.losses

    outputs, losses = call(*arguments)
    outputs, losses = outputs.numpy(), [float(loss) for loss in losses]
    graph_balance = {key: float(value) for key, value in layer.balance.result().items()}
    valid = inputs.valid
    np.testing.assert_array_equal(outputs.reshape(len(valid), outputs.shape[-1])[~valid], 0.0)
    # Layers draw random numbers only while training (the gates' noise).
    if jit_compile and case.training and _is_random(layer, case, inputs, eager):
        # XLA draws other random numbers than the CPU kernels for the same seed.
        assert np.all(np.isfinite(outputs)) and np.all(np.isfinite(losses))
        return
    # Graph and eager run the same kernels, except where TensorFlow's graph
    # optimizer (grappler) rewrites a chain of elementwise ops, such as a
    # gated expert's activation, which then rounds once in float16 or bfloat16
    # where eager rounds after each op (equal with grappler off).
    exact = case.policy == "float32" and not jit_compile
    tolerance = 1e-6 if exact else TOLERANCE[case.policy]
    np.testing.assert_allclose(outputs, eager.outputs, rtol=tolerance, atol=tolerance)
    np.testing.assert_allclose(losses, eager.losses, rtol=1e-5, atol=1e-6)
    assert graph_balance == pytest.approx(eager.balance, rel=1e-5, abs=1e-6)


# Eleven layer kinds: 15 cases of each per property in the default run
# (CI's budget), the slow profile's full count in the slow twins.
def _share(profile):
    return 0.6 if profile is None else 1.0


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_finite_and_masked_positions_reach_nothing(layer, profile):
    run_property(profile, cases(LAYERS[layer]), check_finite_and_masked_positions_reach_nothing, _share(profile))


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_output_equals_the_dense_reference(layer, profile):
    run_property(profile, cases(LAYERS[layer]), check_output_equals_the_dense_reference, _share(profile))


@pytest.mark.parametrize("profile", PROFILES)
# XLA compiles every generated case (about a minute on two cores): slow.
@pytest.mark.parametrize("jit_compile", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["graph", "xla"])
def test_graph_with_unknown_shapes_equals_eager(jit_compile, profile):
    """Every layer kind in one run: a trace per case costs about a second."""
    layers = st.one_of(*[LAYERS[name] for name in sorted(LAYERS)])
    run_property(
        profile,
        cases(layers),
        lambda case: check_graph_with_unknown_shapes_equals_eager(case, jit_compile),
        share=0.4,
    )
