"""Load-balance metrics that MoE layers report in the `fit` logs."""

import keras
import tensorflow as tf

from tf_moe.ops.gating import cv_squared

_EPSILON = 1e-10
# Figures averaged over the batches that routed something.
_BALANCE = ("cv_importance", "cv_load", "max_over_mean_load", "aux_loss")
# Numerator and denominator of the accumulated fractions.
_FRACTIONS = {"dropped_fraction": ("dropped", "routed"), "unrouted_fraction": ("unrouted", "tokens")}


@keras.saving.register_keras_serializable(package="tf_moe")
class LoadBalanceMetrics(keras.metrics.Metric):
    """Running load-balance figures of one MoE layer (Shazeer et al. 2017, Table 6).

    Averages over the batches seen since the last reset: the coefficient of
    variation of importance and of load, `max(load) / mean(load)`, the
    auxiliary loss and the router's own metrics (e.g. `topk_agreement`);
    and accumulates the fraction of routed assignments that capacity
    dropped and the fraction of tokens that got no expert at all.
    `result()` returns a dict whose keys start with the metric's name, so
    every MoE layer of a model gets its own log entries.

    A batch that routed nothing (no tokens, or all masked) has no balance
    to report and leaves the averages alone. A non-finite batch value (a NaN
    that unmasked inputs brought in, or a router metric that is undefined
    for that batch) is skipped, figure by figure, so one bad batch cannot
    turn the running values into NaN until the next reset.

    Args:
        name: prefix of the result keys (MoE layers use their own name).
        router_metrics: names of the router's metrics to average.
        **kwargs: base metric arguments.

    Example:

    >>> m = LoadBalanceMetrics(name="moe")
    >>> m.update_state(importance=[1.0, 3.0], load=[2.0, 2.0])
    >>> sorted(m.result())[:2]
    ['moe_aux_loss', 'moe_cv_importance']
    """

    def __init__(self, name="moe", router_metrics=(), **kwargs):
        super().__init__(name=name, **kwargs)
        self.router_metrics = tuple(router_metrics)
        clash = set(self.router_metrics) & (set(_BALANCE) | set(_FRACTIONS))
        if clash:
            raise ValueError(f"`router_metrics` must not reuse the balance names {sorted(clash)}.")
        self._averaged = _BALANCE + self.router_metrics
        names = [f"{key}_{part}" for key in self._averaged for part in ("total", "batches")]
        names += [part for parts in _FRACTIONS.values() for part in parts]
        self._totals = {
            key: self.add_variable(shape=(), initializer="zeros", name=key) for key in names
        }

    def update_state(
        self,
        importance,
        load,
        dropped=0.0,
        routed=0.0,
        aux_loss=0.0,
        unrouted=0.0,
        tokens=0.0,
        router_metrics=None,
    ):
        """Adds one batch's per-expert importance and load vectors.

        Args:
            importance, load: [num_experts] vectors of the batch.
            dropped, routed: assignments dropped for capacity, and routed.
            aux_loss: the layer's auxiliary loss on the batch.
            unrouted, tokens: tokens that reached no expert, and tokens.
            router_metrics: dict name -> scalar with the `router_metrics`
                names.
        """
        importance = tf.cast(importance, tf.float32)
        load = tf.cast(load, tf.float32)
        routed_any = tf.reduce_sum(importance) + tf.reduce_sum(load) > 0
        values = {
            "cv_importance": tf.sqrt(cv_squared(importance)),
            "cv_load": tf.sqrt(cv_squared(load)),
            "max_over_mean_load": tf.reduce_max(load) / (tf.reduce_mean(load) + _EPSILON),
            "aux_loss": aux_loss,
        }
        router_metrics = router_metrics or {}
        if set(router_metrics) != set(self.router_metrics):
            raise ValueError(
                f"`router_metrics` must have the keys {sorted(self.router_metrics)}, "
                f"got {sorted(router_metrics)}."
            )
        values.update(router_metrics)
        for key in self._averaged:
            value = tf.cast(values[key], tf.float32)
            counted = tf.logical_and(routed_any, tf.math.is_finite(value))
            self._totals[f"{key}_total"].assign_add(tf.where(counted, value, 0.0))
            self._totals[f"{key}_batches"].assign_add(tf.cast(counted, tf.float32))
        for (part_name, whole_name), (part, whole) in zip(
            _FRACTIONS.values(), ((dropped, routed), (unrouted, tokens))
        ):
            part, whole = tf.cast(part, tf.float32), tf.cast(whole, tf.float32)
            finite = tf.logical_and(tf.math.is_finite(part), tf.math.is_finite(whole))
            self._totals[part_name].assign_add(tf.where(finite, part, 0.0))
            self._totals[whole_name].assign_add(tf.where(finite, whole, 0.0))

    def result(self):
        results = {
            key: self._totals[f"{key}_total"] / tf.maximum(self._totals[f"{key}_batches"], 1.0)
            for key in self._averaged
        }
        for key, (part, whole) in _FRACTIONS.items():
            results[key] = self._totals[part] / tf.maximum(self._totals[whole], 1.0)
        return {f"{self.name}_{key}": value for key, value in results.items()}

    def reset_state(self):
        for variable in self._totals.values():
            variable.assign(0.0)

    def get_config(self):
        config = super().get_config()
        config["router_metrics"] = list(self.router_metrics)
        return config
