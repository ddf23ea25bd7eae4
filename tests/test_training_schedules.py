"""Tests of the warm-up / inverse-square-root learning-rate schedule."""

import keras
import numpy as np
import pytest

from tf_moe.training import WarmupInverseSqrtDecay


def test_values_follow_the_formula():
    peak, warmup = 2e-3, 50
    schedule = WarmupInverseSqrtDecay(peak, warmup)
    for step in (0, 1, 24, 49, 50, 51, 199, 10_000):
        s = step + 1
        expected = peak * s / warmup if s <= warmup else peak * (warmup / s) ** 0.5
        np.testing.assert_allclose(float(schedule(step)), expected, rtol=1e-6)
    # Rises linearly to the peak, then falls as 1/sqrt(step).
    assert float(schedule(warmup - 1)) == pytest.approx(peak)
    assert float(schedule(4 * warmup - 1)) == pytest.approx(peak / 2)


def test_serialization_round_trip_in_an_optimizer():
    schedule = WarmupInverseSqrtDecay(1e-3, 10)
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(schedule))
    assert isinstance(restored, WarmupInverseSqrtDecay) and restored.get_config() == schedule.get_config()
    optimizer = keras.optimizers.Adam.from_config(keras.optimizers.Adam(schedule).get_config())
    optimizer.build([keras.Variable(np.zeros(2, "float32"))])
    assert float(optimizer.learning_rate) == pytest.approx(float(schedule(0)))
    for step in (0, 9, 30):
        assert float(restored(step)) == pytest.approx(float(schedule(step)))


@pytest.mark.parametrize(
    "kwargs, argument",
    [(dict(peak_learning_rate=0.0, warmup_steps=10), "peak_learning_rate"),
     (dict(peak_learning_rate=1e-3, warmup_steps=0), "warmup_steps"),
     (dict(peak_learning_rate=1e-3, warmup_steps=2.5), "warmup_steps")],
)
def test_bad_arguments_are_named(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        WarmupInverseSqrtDecay(**kwargs)
