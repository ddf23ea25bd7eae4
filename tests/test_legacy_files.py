"""`.keras` files saved by tf_moe 0.1 load with the current code, same outputs."""

import os

import keras
import numpy as np
import pytest

import tf_moe  # noqa: F401  (registers the layers)

DATA = os.path.join(os.path.dirname(__file__), "data")


@pytest.mark.parametrize(
    "name",
    [
        "legacy_moe",
        "legacy_moe_softmax",
        "legacy_moe_batchwise",
        "legacy_hierarchical_moe",
        "legacy_expert_parallel_moe",
    ],
)
def test_legacy_file_loads_with_identical_outputs(name):
    model = keras.models.load_model(os.path.join(DATA, f"{name}.keras"), safe_mode=True)
    x = np.load(os.path.join(DATA, "legacy_inputs.npy"))
    expected = np.load(os.path.join(DATA, f"{name}_outputs.npy"))
    np.testing.assert_array_equal(model.predict(x, verbose=0), expected)
