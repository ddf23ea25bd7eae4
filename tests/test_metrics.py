import numpy as np
import pytest

import tf_moe


def _cv(values):
    values = np.asarray(values, np.float64)
    return values.std() / values.mean()


def test_averages_per_batch_figures_and_accumulates_fractions():
    metric = tf_moe.LoadBalanceMetrics(name="layer")
    batches = [([1.0, 3.0, 2.0], [2.0, 2.0, 5.0]), ([4.0, 4.0, 1.0], [1.0, 6.0, 2.0])]
    for importance, load in batches:
        metric.update_state(importance, load, dropped=1.0, routed=9.0, aux_loss=0.5, unrouted=1.0, tokens=4.0)
    result = {key: float(value) for key, value in metric.result().items()}
    assert result["layer_cv_importance"] == pytest.approx(np.mean([_cv(i) for i, _ in batches]), rel=1e-5)
    assert result["layer_cv_load"] == pytest.approx(np.mean([_cv(l) for _, l in batches]), rel=1e-5)
    expected_ratio = np.mean([max(l) / np.mean(l) for _, l in batches])
    assert result["layer_max_over_mean_load"] == pytest.approx(expected_ratio, rel=1e-5)
    assert result["layer_aux_loss"] == pytest.approx(0.5)
    assert result["layer_dropped_fraction"] == pytest.approx(2.0 / 18.0)
    assert result["layer_unrouted_fraction"] == pytest.approx(2.0 / 8.0)


def test_a_batch_that_routed_nothing_leaves_the_averages_alone():
    metric = tf_moe.LoadBalanceMetrics()
    metric.update_state([2.0, 2.0, 2.0, 2.0], [3.0, 3.0, 3.0, 3.0], aux_loss=0.25)
    metric.update_state([0.0] * 4, [0.0] * 4)
    result = {key: float(value) for key, value in metric.result().items()}
    assert result["moe_max_over_mean_load"] == pytest.approx(1.0)
    assert result["moe_cv_load"] == pytest.approx(0.0, abs=1e-6)
    assert result["moe_aux_loss"] == pytest.approx(0.25)
    assert all(np.isfinite(value) for value in result.values())


def test_reset_state_and_serialization():
    metric = tf_moe.LoadBalanceMetrics(name="balance")
    metric.update_state([1.0, 2.0], [1.0, 3.0])
    metric.reset_state()
    assert float(metric.result()["balance_max_over_mean_load"]) == 0.0
    clone = tf_moe.LoadBalanceMetrics.from_config(metric.get_config())
    assert clone.name == "balance"


def test_a_non_finite_batch_is_skipped_not_kept_forever():
    """One NaN (or inf) batch must not turn the running figures into NaN."""
    metric = tf_moe.LoadBalanceMetrics(name="m", router_metrics=("agreement",))
    metric.update_state([1.0, 3.0], [2.0, 2.0], dropped=1.0, routed=4.0, aux_loss=0.5,
                        unrouted=0.0, tokens=2.0, router_metrics={"agreement": 0.75})
    nan = float("nan")
    metric.update_state([nan, 1.0], [nan, 1.0], dropped=nan, routed=nan, aux_loss=nan,
                        unrouted=nan, tokens=nan, router_metrics={"agreement": nan})
    metric.update_state([2.0, 2.0], [1.0, 3.0], dropped=0.0, routed=4.0, aux_loss=0.25,
                        unrouted=1.0, tokens=2.0, router_metrics={"agreement": float("inf")})
    result = {key: float(value) for key, value in metric.result().items()}
    assert all(np.isfinite(value) for value in result.values())
    assert result["m_cv_importance"] == pytest.approx(np.mean([_cv([1, 3]), 0.0]), rel=1e-5)
    assert result["m_cv_load"] == pytest.approx(np.mean([0.0, _cv([1, 3])]), rel=1e-5, abs=1e-6)
    assert result["m_aux_loss"] == pytest.approx(0.375)
    assert result["m_agreement"] == pytest.approx(0.75)  # the only finite value
    assert result["m_dropped_fraction"] == pytest.approx(1.0 / 8.0)
    assert result["m_unrouted_fraction"] == pytest.approx(1.0 / 4.0)


def test_router_metrics_are_averaged_and_checked():
    metric = tf_moe.LoadBalanceMetrics(name="m", router_metrics=("agreement",))
    for value in (0.5, 1.0):
        metric.update_state([1.0, 1.0], [1.0, 1.0], router_metrics={"agreement": value})
    assert float(metric.result()["m_agreement"]) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="agreement"):
        metric.update_state([1.0], [1.0], router_metrics={})
    with pytest.raises(ValueError, match="balance names"):
        tf_moe.LoadBalanceMetrics(router_metrics=("cv_load",))
    assert tf_moe.LoadBalanceMetrics.from_config(metric.get_config()).router_metrics == ("agreement",)
