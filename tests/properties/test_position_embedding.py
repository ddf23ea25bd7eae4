"""Properties of `PositionEmbedding`.

For any batch (empty included), length (zero included), width, input
dtype, policy, and a length known when the layer is built or only when it
runs: the output is the input plus the table's first `length` rows, the
input's mask passes through unchanged, the input's gradient is the
upstream one and the table's is the upstream gradient summed over the
batch in those rows and zero in the rest. An input longer than
`max_length` raises an error naming `max_length`: a ValueError when the
layer is built for it, an InvalidArgumentError when the length is known
only at run time.
"""

from typing import NamedTuple

import hypothesis.strategies as st
import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_moe
from tests.properties.cases import PROFILES, TOLERANCE, run_property


class Case(NamedTuple):
    max_length: int
    batch: int
    length: int
    units: int
    input_dtype: str
    policy: str
    static: bool  # the length is in the shape the layer is built for
    seed: int


@st.composite
def position_cases(draw):
    max_length = draw(st.integers(1, 6))
    return Case(
        max_length=max_length,
        batch=draw(st.integers(0, 3)),
        length=draw(st.integers(0, max_length + 2)),
        units=draw(st.integers(1, 5)),
        input_dtype=draw(st.sampled_from(["float16", "float32", "float64"])),
        policy=draw(st.sampled_from(sorted(TOLERANCE))),
        static=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


def _traced_call(layer, case):
    """A `tf.function` returning the outputs and the gradients of `sum(outputs * upstream)`."""
    length = case.length if case.static else None

    @tf.function(
        input_signature=[
            tf.TensorSpec([None, length, case.units], case.input_dtype),
            tf.TensorSpec([None, length, case.units], tf.float32),
        ],
        autograph=False,
    )
    def call(x, upstream):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x)
            objective = tf.reduce_sum(tf.cast(y, tf.float32) * upstream)
        d_x, d_table = tape.gradient(
            objective, [x, layer.embeddings.value], unconnected_gradients=tf.UnconnectedGradients.ZERO
        )
        return tf.cast(y, tf.float64), tf.cast(d_x, tf.float64), tf.cast(d_table, tf.float64)

    return call


def check_position_embedding(case):
    rng = np.random.default_rng(case.seed)
    x = rng.standard_normal((case.batch, case.length, case.units)).astype(case.input_dtype)
    upstream = rng.standard_normal(x.shape).astype("float32")
    layer = tf_moe.PositionEmbedding(
        case.max_length, initializer=keras.initializers.RandomNormal(seed=case.seed), dtype=case.policy
    )
    too_long = case.length > case.max_length
    if case.static and too_long:
        with pytest.raises(ValueError, match="`max_length`"):
            layer(x)
        return
    layer.build((None, case.length if case.static else None, case.units))
    call = _traced_call(layer, case)
    if too_long:
        with pytest.raises(tf.errors.InvalidArgumentError, match="`max_length`"):
            call(x, upstream)
        return
    y, d_x, d_table = (t.numpy() for t in call(x, upstream))
    table = layer.embeddings.numpy().astype(np.float64)
    seen = x.astype(keras.mixed_precision.Policy(case.policy).compute_dtype).astype(np.float64)
    tolerance = TOLERANCE[case.policy]
    used = table[: case.length]
    np.testing.assert_allclose(y, seen + used, rtol=0, atol=tolerance * (np.abs(seen) + np.abs(used)).max(initial=0))
    # The upstream gradient, rounded to the compute dtype and back to the input's by the casts it passes.
    np.testing.assert_array_equal(d_x, tf.cast(tf.cast(upstream, layer.compute_dtype), case.input_dtype))
    want_table = np.zeros_like(table)
    want_table[: case.length] = upstream.sum(axis=0)
    scale = np.abs(upstream).sum(axis=0).max(initial=0)
    np.testing.assert_allclose(d_table, want_table, rtol=0, atol=tolerance * scale + 1e-30)
    mask = rng.random((case.batch, case.length)) < 0.5
    np.testing.assert_array_equal(layer.compute_mask(x, tf.constant(mask)), mask)


@pytest.mark.parametrize("profile", PROFILES)
def test_position_embedding_adds_its_table_and_checks_the_length(profile):
    run_property(profile, position_cases(), check_position_embedding)
