"""The paper's learning-rate schedule: linear warm-up, then 1/sqrt(step) decay."""

import keras
import tensorflow as tf


@keras.saving.register_keras_serializable(package="tf_moe")
class WarmupInverseSqrtDecay(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up to a peak, then decay proportional to `1 / sqrt(step)`.

    With `s = step + 1` (Keras passes the 0-based optimizer step) and
    `w = warmup_steps`:

        lr(s) = peak_learning_rate * min(s / w, sqrt(w / s))

    so the rate grows linearly to `peak_learning_rate` at step `w` and then
    falls as the inverse square root of the step number (appendix C of the
    paper, used with Adam).

    Args:
        peak_learning_rate: float > 0, the rate at the end of warm-up.
        warmup_steps: int >= 1, length of the linear warm-up.

    Example:

    >>> schedule = WarmupInverseSqrtDecay(1e-3, warmup_steps=100)
    >>> optimizer = keras.optimizers.Adam(learning_rate=schedule)
    >>> round(float(schedule(99)), 6), round(float(schedule(399)), 6)
    (0.001, 0.0005)
    """

    def __init__(self, peak_learning_rate, warmup_steps):
        if not peak_learning_rate > 0:
            raise ValueError(f"`peak_learning_rate` must be > 0, got {peak_learning_rate!r}.")
        if not isinstance(warmup_steps, int) or isinstance(warmup_steps, bool) or warmup_steps < 1:
            raise ValueError(f"`warmup_steps` must be an int >= 1, got {warmup_steps!r}.")
        self.peak_learning_rate = float(peak_learning_rate)
        self.warmup_steps = warmup_steps

    def __call__(self, step):
        s = tf.cast(step, tf.float32) + 1.0
        w = float(self.warmup_steps)
        return self.peak_learning_rate * tf.minimum(s / w, tf.sqrt(w / s))

    def get_config(self):
        return {"peak_learning_rate": self.peak_learning_rate, "warmup_steps": self.warmup_steps}
