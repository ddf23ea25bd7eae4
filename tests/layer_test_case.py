"""One helper that checks the Keras citizenship of every tf_moe layer.

`run_layer_test` builds the layer and gives it random weights (so that an
MoE routes tokens to different experts, not all to experts 0..k-1 as
zero-initialised gates do), then checks output shapes (eager, symbolic and
`compute_output_shape`), that every constructor argument is in the config,
the config and `.keras` round trips (same outputs after loading in safe
mode), masks (even NaN at masked positions must not leak) and both
mixed-precision policies against the float32 outputs.
"""

import inspect
import json
import os
import tempfile

import keras
import numpy as np

# Largest deviation from the float32 outputs, relative to their largest
# magnitude: float16 keeps ~3 decimal digits, bfloat16 ~2.
MIXED_PRECISION_TOLERANCE = {"mixed_float16": 1e-2, "mixed_bfloat16": 5e-2}


def _as_list(shape):
    return [None if d is None else int(d) for d in shape]


def randomise_weights(layer, seed=0, scale=0.5):
    """Gives every float weight of a built layer standard-normal values * `scale`."""
    rng = np.random.default_rng(seed)
    for variable in layer.weights:
        variable.assign(rng.standard_normal(variable.shape).astype("float32") * scale)


def run_layer_test(
    layer_cls,
    init_kwargs,
    input_shape,
    expected_output_shape,
    *,
    supports_masking=True,
    call_kwargs=None,
    mixed_precision=True,
    seed=0,
):
    """Checks build, shapes, config, serialization, masks and mixed precision.

    Args:
        layer_cls: the layer class.
        init_kwargs: constructor arguments.
        input_shape: a concrete input shape, batch first.
        expected_output_shape: the output shape for that input.
        supports_masking: check that a mask passes through and that masked
            positions (1e3 or NaN there) do not affect the outputs at
            unmasked positions.
        call_kwargs: extra call arguments.
        mixed_precision: check `mixed_float16` and `mixed_bfloat16` against
            the float32 outputs with the same weights.
        seed: seed of the random inputs and weights.
    """
    call_kwargs = call_kwargs or {}
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(input_shape).astype("float32")

    # Build, random weights, eager shapes.
    layer = layer_cls(**init_kwargs)
    layer(x, **call_kwargs)
    assert layer.built
    randomise_weights(layer, seed)
    y = np.asarray(layer(x, **call_kwargs))
    assert _as_list(y.shape) == _as_list(expected_output_shape)
    assert _as_list(layer.compute_output_shape(input_shape)) == _as_list(expected_output_shape)
    assert np.all(np.isfinite(y))

    _check_config(layer_cls, layer, x, y, call_kwargs)

    # Functional API with unknown batch (and time) dimensions.
    symbolic_shape = (None,) * (len(input_shape) - 1) + (input_shape[-1],)
    inputs = keras.Input(batch_shape=symbolic_shape)
    functional_layer = layer_cls(**init_kwargs)
    outputs = functional_layer(inputs, **call_kwargs)
    assert _as_list(outputs.shape) == _as_list(
        (None,) * (len(expected_output_shape) - 1) + (expected_output_shape[-1],)
    )
    functional_layer.set_weights(layer.get_weights())

    # .keras round trip through a functional model, loaded in safe mode.
    model = keras.Model(inputs, outputs)
    before = model.predict(x, verbose=0)
    if not call_kwargs:  # `predict` runs at inference
        np.testing.assert_allclose(before, y, rtol=1e-5, atol=1e-5)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.keras")
        model.save(path)
        loaded = keras.models.load_model(path, safe_mode=True)
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), before)

    if supports_masking:
        _check_masking(layer, x, call_kwargs)
    if mixed_precision:
        for policy in MIXED_PRECISION_TOLERANCE:
            _check_mixed_precision(layer_cls, init_kwargs, policy, layer, x, call_kwargs, y)


def _check_config(layer_cls, layer, x, y, call_kwargs):
    """Every constructor argument is in the config; a layer rebuilt from the
    JSON config has the same config and, with the same weights, the same outputs."""
    config = layer.get_config()
    parameters = inspect.signature(layer_cls.__init__).parameters.values()
    arguments = [
        p.name for p in parameters
        if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    missing = [name for name in arguments if name not in config]
    assert not missing, f"constructor arguments missing from get_config: {missing}"
    clone = keras.layers.deserialize(_as_json(keras.layers.serialize(layer)))
    assert type(clone) is layer_cls
    assert _as_json(clone.get_config()) == _as_json(config)
    clone(x, **call_kwargs)
    clone.set_weights(layer.get_weights())
    np.testing.assert_allclose(np.asarray(clone(x, **call_kwargs)), y, rtol=1e-6, atol=1e-6)


def _as_json(config):
    """The config as `.keras` files store it (tuples become lists)."""
    return json.loads(json.dumps(config))


def _check_masking(layer, x, call_kwargs):
    mask = np.ones(x.shape[:-1], bool)
    mask.reshape(-1)[::3] = False
    assert layer.supports_masking
    np.testing.assert_array_equal(np.asarray(layer.compute_mask(x, mask)), mask)
    out = np.asarray(layer(x, mask=mask, **call_kwargs))
    # What stands at masked positions must not leak into unmasked outputs.
    for fill in (1e3, np.nan):
        noisy = x.copy()
        noisy[~mask] = fill
        out_noisy = np.asarray(layer(noisy, mask=mask, **call_kwargs))
        assert np.all(np.isfinite(out_noisy))
        np.testing.assert_allclose(out_noisy[mask], out[mask], rtol=1e-5, atol=1e-5)


def _check_mixed_precision(layer_cls, init_kwargs, policy, reference_layer, x, call_kwargs, reference):
    layer = layer_cls(**init_kwargs, dtype=policy)
    layer(x, **call_kwargs)
    layer.set_weights(reference_layer.get_weights())
    y = layer(x, **call_kwargs)
    compute_dtype = keras.DTypePolicy(policy).compute_dtype
    assert keras.backend.standardize_dtype(y.dtype) == compute_dtype
    assert all(w.dtype == "float32" for w in layer.weights)
    y = np.asarray(keras.ops.cast(y, "float32"))
    assert y.shape == reference.shape
    tolerance = MIXED_PRECISION_TOLERANCE[policy] * np.abs(reference).max()
    np.testing.assert_allclose(y, reference, rtol=0, atol=tolerance)
