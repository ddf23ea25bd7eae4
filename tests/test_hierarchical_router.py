"""HierarchicalRouter against a numpy transcription of appendix B."""

import math

import numpy as np
import pytest
import tensorflow as tf

import tf_moe
from tests import numpy_reference as ref
from tf_moe.layers.hierarchical_router import hierarchical_load
from tf_moe.ops.gating import cv_squared

EPS = 1e-2


def _randomised_gate(a=3, b=4, kp=2, ks=2, d=5, seed=0, **kwargs):
    gate = tf_moe.HierarchicalRouter(a, b, kp, ks, noise_epsilon=EPS, seed=seed, **kwargs)
    gate.build((None, d))
    rng = np.random.default_rng(seed)
    for variable in gate.weights:
        variable.assign(rng.standard_normal(variable.shape).astype("float32"))
    return gate


def _gate_weights(gate):
    return (
        gate.primary.w_gate.numpy(),
        gate.primary.w_noise.numpy(),
        gate.w_gate.numpy(),
        gate.w_noise.numpy(),
    )


def _reference(gate, x, primary_noise, secondary_noise, train=True):
    """Appendix B, token by token: dense product gates, Importance_H, Load_H."""
    wp, wnp, ws, wns = _gate_weights(gate)
    a, b = gate.num_groups, gate.experts_per_group
    kp, ks = gate.k_primary, gate.k_secondary
    hp, gp, sp = ref.noisy_top_k(x, wp, wnp, primary_noise, kp, EPS, train=train)
    gates = np.zeros((len(x), a * b))
    load = np.zeros(a * b)
    if train and kp < a:
        primary_load = ref.smooth_load(x, wp, hp, sp, kp)
    else:
        primary_load = (gp > 0).sum(axis=0).astype(float)
    for i in range(a):
        hi, gi, si = ref.noisy_top_k(x, ws[i], wns[i], secondary_noise[:, i], ks, EPS, train=train)
        gates[:, i * b : (i + 1) * b] = gp[:, i : i + 1] * gi
        members = gp[:, i] > 0  # X^(i)
        if not members.any():
            continue
        if train and ks < b:
            secondary_load = ref.smooth_load(x[members], ws[i], hi[members], si[members], ks)
        else:
            secondary_load = (gi[members] > 0).sum(axis=0)
        load[i * b : (i + 1) * b] = primary_load[i] * secondary_load / members.sum()
    return gates, gates.sum(axis=0), load


def _per_token(routing, gate, num_tokens):
    """Assignments as [tokens, k_primary, k_secondary] (they come choice-major)."""
    shape = (gate.k_primary, gate.k_secondary, num_tokens)
    token_id = np.asarray(routing.token_id).reshape(shape)
    assert np.all(token_id == np.arange(num_tokens))
    return [np.asarray(t).reshape(shape).transpose(2, 0, 1) for t in (routing.expert_id, routing.weight)]


def _draws(t, a, b, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((t, 5)).astype("float32")
    return x, rng.standard_normal((t, a)).astype("float32"), rng.standard_normal((t, a, b)).astype("float32")


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("kp,ks", [(2, 2), (1, 1), (2, 3)])
def test_matches_appendix_b(train, kp, ks):
    gate = _randomised_gate(kp=kp, ks=ks)
    x, pn, sn = _draws(24, 3, 4)
    routing = gate(x, training=train, noise=(pn, sn))
    gates, importance, load = _reference(gate, x, pn, sn, train)
    assert routing.expert_id.shape == (24 * kp * ks,)
    np.testing.assert_allclose(ref.routing_gates(routing, 24, 12), gates, atol=1e-5)
    np.testing.assert_allclose(routing.importance, importance, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(routing.load, load, rtol=1e-4, atol=1e-5)
    assert float(routing.dropped) == 0.0 and routing.losses == {}


def test_routes_within_chosen_groups_best_first():
    gate = _randomised_gate()
    x, pn, sn = _draws(16, 3, 4)
    routing = gate(x, training=True, noise=(pn, sn))
    index, weight = _per_token(routing, gate, 16)
    groups = index // 4
    assert np.all(groups[:, :, 0] == groups[:, :, 1])
    assert np.all(groups[:, 0, 0] != groups[:, 1, 0])
    # Best group first, and within it the best expert first.
    assert np.all(weight[:, 0].sum(axis=1) >= weight[:, 1].sum(axis=1))
    assert np.all(weight[:, :, 0] >= weight[:, :, 1])
    np.testing.assert_allclose(weight.sum(axis=(1, 2)), 1.0, rtol=1e-5)


def test_unchosen_groups_are_never_evaluated():
    """NaN noise on every (token, group) pair the primary gate did not pick
    must not reach any output: secondary gates run on routed pairs only."""
    gate = _randomised_gate()
    x, pn, sn = _draws(16, 3, 4)
    chosen = np.asarray(gate.primary(x, training=True, noise=pn).expert_id).reshape(2, 16).T
    poisoned = np.full_like(sn, np.nan)
    rows = np.arange(16)[:, None]
    poisoned[rows, chosen] = sn[rows, chosen]
    clean = gate(x, training=True, noise=(pn, sn))
    routing = gate(x, training=True, noise=(pn, poisoned))
    for field in ("expert_id", "weight", "importance", "load"):
        np.testing.assert_array_equal(getattr(routing, field), getattr(clean, field))


def test_mask_excludes_tokens():
    gate = _randomised_gate()
    x, pn, sn = _draws(20, 3, 4)
    mask = np.arange(20) % 4 != 0
    gates, importance, load = _reference(gate, x[mask], pn[mask], sn[mask])
    x[~mask], pn[~mask], sn[~mask] = np.nan, np.nan, np.nan  # reach nothing
    routing = gate(x, training=True, mask=mask, noise=(pn, sn))
    index, _ = _per_token(routing, gate, 20)
    assert np.all(index[~mask] == 12)
    np.testing.assert_allclose(ref.routing_gates(routing, 20, 12)[mask], gates, atol=1e-5)
    np.testing.assert_allclose(routing.importance, importance, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(routing.load, load, rtol=1e-4, atol=1e-5)


def test_group_capacity_drops_late_pairs():
    """With a static capacity each group gates its first C (token, group)
    pairs in choice-major order; the rest get no expert and are counted."""
    gate = _randomised_gate(capacity_factor=0.5)
    x, pn, sn = _draws(24, 3, 4)
    routing = gate(x, training=True, noise=(pn, sn))
    gates, _, _ = _reference(gate, x, pn, sn)
    capacity = math.ceil(0.5 * 2 * 24 / 3)
    _, primary, _ = ref.noisy_top_k(x, *_gate_weights(gate)[:2], pn, 2, EPS)
    ranked = np.argsort(-primary, axis=1, kind="stable")[:, :2]
    used, kept = np.zeros(3, int), np.zeros((24, 3), bool)
    for choice in range(2):
        for token in range(24):
            group = ranked[token, choice]
            kept[token, group] = used[group] < capacity
            used[group] += 1
    expected = gates * np.repeat(kept, 4, axis=1)
    np.testing.assert_allclose(ref.routing_gates(routing, 24, 12), expected, atol=1e-5)
    assert float(routing.dropped) == 2 * (48 - kept.sum())
    assert kept.sum() < 48


def test_load_is_differentiable_at_both_levels():
    gate = _randomised_gate()
    x, pn, sn = _draws(32, 3, 4)
    with tf.GradientTape() as tape:
        loss = cv_squared(gate(x, training=True, noise=(pn, sn)).load)
    grads = tape.gradient(loss, [gate.primary.w_noise, gate.w_gate, gate.w_noise])
    for grad in grads:
        assert grad is not None and np.any(np.asarray(grad) != 0)


def test_hierarchical_load_guards_empty_groups():
    load = hierarchical_load(
        tf.constant([4.0, 0.0]), tf.constant([[1.0, 3.0], [0.0, 0.0]]), tf.constant([2.0, 0.0])
    )
    np.testing.assert_allclose(load, [2.0, 6.0, 0.0, 0.0])


@pytest.mark.parametrize(
    "kwargs,arg",
    [
        (dict(num_groups=2, experts_per_group=4, k_primary=3), "k_primary"),
        (dict(num_groups=4, experts_per_group=2, k_secondary=3), "k_secondary"),
        (dict(num_groups=0, experts_per_group=2), "num_groups"),
        (dict(num_groups=2, experts_per_group=2, capacity_factor=0.0), "capacity_factor"),
        (dict(num_groups=2, experts_per_group=2, capacity_factor=float("inf")), "capacity_factor"),
        (dict(num_groups=2, experts_per_group=2, noise_epsilon=float("nan")), "noise_epsilon"),
    ],
)
def test_bad_configurations(kwargs, arg):
    with pytest.raises(ValueError, match=arg):
        tf_moe.HierarchicalRouter(**kwargs)


def test_config_round_trip_and_contract():
    gate = tf_moe.HierarchicalRouter(4, 3, 2, 1, noisy=False, capacity_factor=1.5, seed=3)
    clone = tf_moe.HierarchicalRouter.from_config(gate.get_config())
    assert clone.get_config() == gate.get_config()
    assert (clone.num_experts, clone.k) == (12, 2)
    # The primary gate on every token, then the gates of the 2 groups it picks.
    assert clone.ops_per_token(10) == 10 * 4 + 2 * 10 * 3


def test_metrics_are_the_primary_gates_diagnostics():
    gate = _randomised_gate()
    x, pn, sn = _draws(30, 3, 4)
    pn = pn * 3.0
    routing = gate(x, training=True, noise=(pn, sn))
    wp, wnp = gate.primary.w_gate.numpy(), gate.primary.w_noise.numpy()
    h, _, stddev = ref.noisy_top_k(x, wp, wnp, pn, 2, EPS)
    valid = np.ones(30, bool)
    agreement = ref.topk_agreement(h, x @ wp, 2, valid)
    assert 0.0 < agreement < 1.0
    np.testing.assert_allclose(float(routing.metrics["topk_agreement"]), agreement, rtol=1e-6)
    np.testing.assert_allclose(
        float(routing.metrics["noise_to_signal"]), ref.noise_to_signal(stddev, x @ wp, valid), rtol=1e-5
    )


def test_learning_rate_multiplier_scales_both_levels_and_keeps_the_function():
    plain = _randomised_gate()
    fast = _randomised_gate(learning_rate_multiplier=8.0)
    assert fast.primary.learning_rate_multiplier == 8.0
    assert fast.get_config()["learning_rate_multiplier"] == 8.0
    for mine, theirs in zip(
        (fast.primary.w_gate, fast.primary.w_noise, fast.w_gate, fast.w_noise),
        (plain.primary.w_gate, plain.primary.w_noise, plain.w_gate, plain.w_noise),
    ):
        mine.assign(theirs.numpy() / 8.0)
    x, pn, sn = _draws(30, 3, 4)
    fast_routing, plain_routing = (r(x, training=True, noise=(pn, sn)) for r in (fast, plain))
    for field in ("expert_id", "weight", "importance", "load"):
        np.testing.assert_allclose(getattr(fast_routing, field), getattr(plain_routing, field), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="learning_rate_multiplier"):
        tf_moe.HierarchicalRouter(2, 2, learning_rate_multiplier=-1.0)
