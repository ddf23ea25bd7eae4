"""One helper that checks the Keras citizenship of every tf_moe layer.

`run_layer_test` builds the layer, checks output shapes (eager, symbolic and
`compute_output_shape`), the config and `.keras` round trips (same outputs
after loading in safe mode), masks and both mixed-precision policies.
"""

import os
import tempfile

import keras
import numpy as np


def _as_list(shape):
    return [None if d is None else int(d) for d in shape]


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
    """Checks build, shapes, serialization, masks and mixed precision.

    Args:
        layer_cls: the layer class.
        init_kwargs: constructor arguments.
        input_shape: a concrete input shape, batch first.
        expected_output_shape: the output shape for that input.
        supports_masking: check that a mask passes through and that masked
            positions do not affect the outputs at unmasked positions.
        call_kwargs: extra call arguments.
        mixed_precision: check `mixed_float16` and `mixed_bfloat16`.
        seed: seed of the random inputs.
    """
    call_kwargs = call_kwargs or {}
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(input_shape).astype("float32")

    # Build and eager shapes.
    layer = layer_cls(**init_kwargs)
    y = layer(x, **call_kwargs)
    assert layer.built
    assert _as_list(y.shape) == _as_list(expected_output_shape)
    assert _as_list(layer.compute_output_shape(input_shape)) == _as_list(expected_output_shape)
    assert np.all(np.isfinite(np.asarray(y)))

    # Functional API with unknown batch (and time) dimensions.
    symbolic_shape = (None,) * (len(input_shape) - 1) + (input_shape[-1],)
    inputs = keras.Input(batch_shape=symbolic_shape)
    outputs = layer_cls(**init_kwargs)(inputs, **call_kwargs)
    assert _as_list(outputs.shape) == _as_list(
        (None,) * (len(expected_output_shape) - 1) + (expected_output_shape[-1],)
    )

    # Config round trip.
    config = layer.get_config()
    clone = layer_cls.from_config(config)
    assert clone.get_config() == config

    # .keras round trip through a functional model, loaded in safe mode.
    model = keras.Model(inputs, outputs)
    before = model.predict(x, verbose=0)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.keras")
        model.save(path)
        loaded = keras.models.load_model(path, safe_mode=True)
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), before)

    if supports_masking:
        _check_masking(layer, x, call_kwargs)
    if mixed_precision:
        for policy in ("mixed_float16", "mixed_bfloat16"):
            _check_mixed_precision(layer_cls, init_kwargs, policy, x, call_kwargs, np.asarray(y))


def _check_masking(layer, x, call_kwargs):
    mask = np.ones(x.shape[:-1], bool)
    mask.reshape(-1)[::3] = False
    assert layer.supports_masking
    np.testing.assert_array_equal(np.asarray(layer.compute_mask(x, mask)), mask)
    out = np.asarray(layer(x, mask=mask, **call_kwargs))
    # What stands at masked positions must not leak into unmasked outputs.
    noisy = x.copy()
    noisy[~mask] = 1e3
    out_noisy = np.asarray(layer(noisy, mask=mask, **call_kwargs))
    np.testing.assert_allclose(out_noisy[mask], out[mask], rtol=1e-5, atol=1e-5)


def _check_mixed_precision(layer_cls, init_kwargs, policy, x, call_kwargs, reference):
    layer = layer_cls(**init_kwargs, dtype=policy)
    y = layer(x, **call_kwargs)
    compute_dtype = keras.DTypePolicy(policy).compute_dtype
    assert keras.backend.standardize_dtype(y.dtype) == compute_dtype
    assert all(w.dtype == "float32" for w in layer.weights)
    y = np.asarray(keras.ops.cast(y, "float32"))
    assert np.all(np.isfinite(y))
    assert y.shape == reference.shape
