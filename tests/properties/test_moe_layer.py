"""Properties of every MoE layer (`MoELayer` with each router, `MoE`, `HierarchicalMoE`).

For any rank, token count (zero included), mask, masked contents, dtype,
policy, capacity and training flag: the layer either raises a ValueError
naming an argument or gives finite outputs, losses and gradients; masked
outputs are exactly zero and what masked positions hold changes nothing;
the output is the dense numpy MoE of the routing it used, less exactly
the assignments its capacity drops.
"""

import numpy as np
import pytest

from tests.properties.cases import (
    LAYERS,
    PROFILES,
    TOLERANCE,
    as_seen,
    build_layer,
    cases,
    documented_error,
    make_inputs,
    reference_outputs,
    run_layer,
    run_property,
    snapshot,
)


def _finite(values, what):
    for i, value in enumerate(values):
        assert np.all(np.isfinite(value)), f"{what}[{i}] is not finite: {value}"


def check_finite_and_masked_positions_reach_nothing(case):
    layer = None
    try:
        layer = build_layer(case)
        inputs = make_inputs(case, layer.compute_output_shape((None, case.units))[-1])
        restore = snapshot(layer)
        clean = run_layer(layer, case, inputs.clean, inputs)
        restore()
        poisoned = run_layer(layer, case, inputs.poisoned, inputs)
    except ValueError as error:
        documented_error(error, *([] if layer is None else [layer, layer.router]))
        return
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
    layer = None
    try:
        layer = build_layer(case)
        inputs = make_inputs(case, layer.compute_output_shape((None, case.units))[-1])
        run = run_layer(layer, case, inputs.poisoned, inputs, gradients=False)
    except ValueError as error:
        documented_error(error, *([] if layer is None else [layer, layer.router]))
        return
    want, dropped, routed = reference_outputs(
        layer, case, as_seen(inputs.clean, case, layer), run.routing, layer.capacity_factor
    )
    got = run.outputs.reshape(want.shape)
    atol = TOLERANCE[case.policy] * np.abs(want).max(initial=0.0) + 1e-6
    np.testing.assert_allclose(got, want, rtol=TOLERANCE[case.policy], atol=atol)
    fraction = run.balance[f"{layer.name}_dropped_fraction"]
    assert fraction == pytest.approx(dropped / max(routed, 1.0), rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_finite_and_masked_positions_reach_nothing(layer, profile):
    run_property(profile, cases(LAYERS[layer]), check_finite_and_masked_positions_reach_nothing)


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_output_equals_the_dense_reference(layer, profile):
    run_property(profile, cases(LAYERS[layer]), check_output_equals_the_dense_reference)
