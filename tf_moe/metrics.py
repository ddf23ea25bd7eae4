"""Load-balance metrics that MoE layers report in the `fit` logs."""

import keras
import tensorflow as tf

from tf_moe.ops.gating import cv_squared

_EPSILON = 1e-10


@keras.saving.register_keras_serializable(package="tf_moe")
class LoadBalanceMetrics(keras.metrics.Metric):
    """Running load-balance figures of one MoE layer (PAPER.md table 6).

    Averages over the batches seen since the last reset: the coefficient of
    variation of importance and of load, `max(load) / mean(load)`, and the
    auxiliary loss; and accumulates the fraction of routed assignments that
    capacity dropped and the fraction of tokens that got no expert at all.
    `result()` returns a dict whose keys start with the metric's name, so
    every MoE layer of a model gets its own log entries.

    Args:
        name: prefix of the result keys (MoE layers use their own name).
        **kwargs: base metric arguments.

    Example:

    >>> m = LoadBalanceMetrics(name="moe")
    >>> m.update_state(importance=[1.0, 3.0], load=[2.0, 2.0])
    >>> sorted(m.result())[:2]
    ['moe_aux_loss', 'moe_cv_importance']
    """

    def __init__(self, name="moe", **kwargs):
        super().__init__(name=name, **kwargs)
        names = (
            "cv_importance", "cv_load", "max_over_mean_load", "aux_loss", "batches", "dropped",
            "routed", "unrouted", "tokens",
        )
        self._totals = {
            key: self.add_variable(shape=(), initializer="zeros", name=key) for key in names
        }

    def update_state(
        self, importance, load, dropped=0.0, routed=0.0, aux_loss=0.0, unrouted=0.0, tokens=0.0
    ):
        """Adds one batch's per-expert importance and load vectors.

        A batch that routed nothing (no tokens, or all masked) has no balance
        to report: it leaves the averages alone rather than pulling them to 0.
        """
        importance = tf.cast(importance, tf.float32)
        load = tf.cast(load, tf.float32)
        routed_any = tf.cast(tf.reduce_sum(importance) + tf.reduce_sum(load) > 0, tf.float32)
        values = {
            "cv_importance": routed_any * tf.sqrt(cv_squared(importance)),
            "cv_load": routed_any * tf.sqrt(cv_squared(load)),
            "max_over_mean_load": routed_any * tf.reduce_max(load) / (tf.reduce_mean(load) + _EPSILON),
            "aux_loss": routed_any * tf.cast(aux_loss, tf.float32),
            "batches": routed_any,
            "dropped": dropped,
            "routed": routed,
            "unrouted": unrouted,
            "tokens": tokens,
        }
        for key, value in values.items():
            self._totals[key].assign_add(tf.cast(value, tf.float32))

    def result(self):
        batches = tf.maximum(self._totals["batches"], 1.0)
        results = {
            key: self._totals[key] / batches
            for key in ("cv_importance", "cv_load", "max_over_mean_load", "aux_loss")
        }
        results["dropped_fraction"] = self._totals["dropped"] / tf.maximum(self._totals["routed"], 1.0)
        results["unrouted_fraction"] = self._totals["unrouted"] / tf.maximum(self._totals["tokens"], 1.0)
        return {f"{self.name}_{key}": value for key, value in results.items()}

    def reset_state(self):
        for variable in self._totals.values():
            variable.assign(0.0)
