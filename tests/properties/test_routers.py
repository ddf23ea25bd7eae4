"""Properties of every router against the numpy transcriptions of their gates.

For any token count (zero included), mask, masked contents (NaN in the
tokens and in given noise draws, other ids for the hash router) and
training flag, a router's `Routing` holds the reference gates, in the
documented order (choice-major for token-choice routers), with the
reference importance, load and losses, and its state (the loss-free
biases) moves as the reference says. The jitter of the Switch and top-k
routers draws from TensorFlow's generator, which numpy cannot replay:
here it is 0 (the layer properties cover it).
"""

import dataclasses
from typing import Callable, NamedTuple

import numpy as np
import pytest

from tests import numpy_reference as ref
from tests.layer_test_case import randomise_weights
from tests.properties.cases import (
    ROUTERS,
    PROFILES,
    as_input,
    as_seen,
    cases,
    documented_error,
    make_inputs,
    predicted_error,
    require_predicted_error,
    run_property,
)


class Expected(NamedTuple):
    gates: np.ndarray  # [T, n] dense gates
    importance: np.ndarray
    load: np.ndarray
    ranked: np.ndarray = None  # [T, k] each token's experts in choice order (token-choice routers)
    dropped: float = 0.0
    losses: dict = {}
    after: dict = {}  # variable name -> its value after the call


class GateReference(NamedTuple):
    draws: Callable  # (router, num_tokens, rng) -> the `noise` call argument, or None
    # (router, x [T, d] float64, valid [T], training, noise, router_inputs) -> Expected
    expected: Callable


def _hard_load(ranked, valid, n):
    return np.bincount(ranked[valid].ravel(), minlength=n)[:n].astype(float)


def _noisy_top_k(router, x, valid, training, noise, router_inputs):
    n, k, eps = router.num_experts, router.k, router.noise_epsilon
    w_gate, w_noise = (np.asarray(w, np.float64) for w in (router.w_gate, router.w_noise))
    train = bool(training) and router.noisy
    h, gates, stddev = ref.noisy_top_k(x, w_gate, w_noise, noise, k, eps, train=train)
    gates[~valid] = 0.0
    ranked = np.argsort(-h, axis=1, kind="stable")[:, :k]
    if train and k < n:
        load = ref.smooth_load(x[valid], w_gate, h[valid], stddev[valid], k)
    else:
        load = _hard_load(ranked, valid, n)
    return Expected(gates, gates.sum(axis=0), load, ranked)


def _top_k_gate(router, x, valid, training, noise, router_inputs):
    w_gate = router.learning_rate_multiplier * np.asarray(router.w_gate, np.float64)
    logits, gates = ref.top_k_gate(x, w_gate, router.k, router.normalize_inputs)
    gates[~valid] = 0.0
    ranked = np.argsort(-logits, axis=1, kind="stable")[:, : router.k]
    load = _hard_load(ranked, valid, router.num_experts)
    return Expected(gates, gates.sum(axis=0), load, ranked, losses=_losses(router, logits, valid))


def _softmax(router, x, valid, training, noise, router_inputs):
    gates = ref.softmax(x @ np.asarray(router.w_gate, np.float64)) * valid[:, None]
    ranked = np.broadcast_to(np.arange(router.num_experts), gates.shape)
    return Expected(gates, gates.sum(axis=0), np.full(router.num_experts, float(valid.sum())), ranked)


def _batchwise(router, x, valid, training, noise, router_inputs):
    n, k = router.num_experts, router.k
    sigma = ref.softmax(x @ np.asarray(router.w_gate, np.float64))
    thresholds = np.asarray(router.thresholds, np.float64)
    if not training:
        keep, gates = ref.threshold_gates(sigma, thresholds, router.candidates, valid)
        return Expected(gates, gates.sum(axis=0), keep.sum(axis=0), losses={"batchwise_threshold": 0.0})
    batch_mask, gates = ref.batchwise_gates(sigma, k * len(x) // n, valid)
    disagreement = (sigma > thresholds) - batch_mask
    loss = (disagreement * (sigma - thresholds))[valid].sum() / max(valid.sum(), 1)
    return Expected(gates, gates.sum(axis=0), batch_mask.sum(axis=0), losses={"batchwise_threshold": loss})


def _hierarchical_draws(router, num_tokens, rng):
    a, b = router.num_groups, router.experts_per_group
    return rng.standard_normal((num_tokens, a)), rng.standard_normal((num_tokens, a, b))


def _hierarchical(router, x, valid, training, noise, router_inputs):
    weights = [
        np.asarray(w, np.float64)
        for w in (router.primary.w_gate, router.primary.w_noise, router.w_gate, router.w_noise)
    ]
    capacity = None
    if router.capacity_factor is not None:
        capacity = ref.capacity_slots(router.capacity_factor, router.k_primary * len(x), router.num_groups)
    gates, importance, load, dropped = ref.hierarchical_top_k(
        x, weights, noise, router.k_primary, router.k_secondary, router.noise_epsilon,
        train=bool(training) and router.noisy, valid=valid, capacity=capacity,
    )
    return Expected(gates, importance, load, dropped=dropped)


def _losses(router, logits, valid, **losses):
    """`losses`, plus the z-loss of the valid rows' logits where the router has a weight for it."""
    if router.z_loss_weight:
        losses["z_loss"] = router.z_loss_weight * (ref.z_loss(logits[valid]) if valid.any() else 0.0)
    return losses


def _top_k(router, x, valid, training, noise, router_inputs):
    w_gate = np.asarray(router.w_gate, np.float64)
    probabilities, gates, ranked = ref.top_k_routing(x, w_gate, router.k, normalize=router.normalize)
    gates[~valid] = 0.0
    balance = 0.0
    if valid.any():
        balance = ref.switch_balance_loss(probabilities[valid], ranked[valid], router.balance_weight)
    losses = _losses(router, x @ w_gate, valid, load_balancing=balance)
    return Expected(gates, gates.sum(axis=0), _hard_load(ranked, valid, router.num_experts), ranked, losses=losses)


def _expert_choice(router, x, valid, training, noise, router_inputs):
    n, w_gate = router.num_experts, np.asarray(router.w_gate, np.float64)
    scores = ref.softmax(x @ w_gate)
    capacity = ref.capacity_slots(router.capacity_factor, len(x), n)  # min(ceil(c T / n), T)
    gates = np.zeros_like(scores)
    for i in range(n):
        # Masked tokens rank last and are never taken.
        for t in np.argsort(-np.where(valid, scores[:, i], -np.inf), kind="stable")[:capacity]:
            gates[t, i] = scores[t, i] if valid[t] else 0.0
    load = (gates > 0).sum(axis=0).astype(float)
    return Expected(gates, gates.sum(axis=0), load, losses=_losses(router, x @ w_gate, valid))


def _loss_free(router, x, valid, training, noise, router_inputs):
    n, k, w_gate = router.num_experts, router.k, np.asarray(router.w_gate, np.float64)
    bias = np.asarray(router.expert_bias, np.float64)
    affinity, gates, ranked = ref.loss_free_routing(x, w_gate, bias, k, router.affinity)
    gates[~valid] = 0.0
    losses = {}
    if router.balance_weight:
        # Without sequence ids the batch is one sequence.
        losses["sequence_balance"] = 0.0
        if valid.any():
            one_sequence = np.zeros(int(valid.sum()), int)
            losses["sequence_balance"] = ref.sequence_balance_loss(
                affinity[valid], ranked[valid], one_sequence, router.balance_weight
            )
    after = {"expert_bias": bias}
    if training and router.bias_update_rate:
        after["expert_bias"] = ref.loss_free_bias_update(bias, ranked[valid], n, router.bias_update_rate)
    load = _hard_load(ranked, valid, n)
    return Expected(
        gates, gates.sum(axis=0), load, ranked, losses=_losses(router, x @ w_gate, valid, **losses), after=after
    )


def _hash(router, x, valid, training, noise, router_inputs):
    n = router.num_experts
    ids = router_inputs["token_ids"].reshape(-1)
    expert = np.array([ref.hash_expert(int(i), n, router.seed) for i in ids], int).reshape(-1, 1)
    gates = np.zeros((len(ids), n))
    gates[np.flatnonzero(valid), expert[valid, 0]] = 1.0
    load = _hard_load(expert, valid, n)
    return Expected(gates, load, load, expert)


def _no_draws(router, num_tokens, rng):
    return None


# Every router with its numpy reference: name (of ROUTERS) -> its reference.
GATE_REFERENCES = {
    "noisy_top_k": GateReference(lambda router, t, rng: rng.standard_normal((t, router.num_experts)), _noisy_top_k),
    "softmax": GateReference(_no_draws, _softmax),
    "batchwise": GateReference(_no_draws, _batchwise),
    "hierarchical": GateReference(_hierarchical_draws, _hierarchical),
    "switch": GateReference(_no_draws, _top_k),
    "top_k": GateReference(_no_draws, _top_k),
    "top_k_gate": GateReference(_no_draws, _top_k_gate),
    "expert_choice": GateReference(_no_draws, _expert_choice),
    "loss_free": GateReference(_no_draws, _loss_free),
    "hash": GateReference(_no_draws, _hash),
}


def _poisoned(noise, valid):
    """The draws with NaN at masked tokens (a router must not read them)."""
    if noise is None:
        return None
    if isinstance(noise, tuple):
        return tuple(_poisoned(part, valid) for part in noise)
    poisoned = noise.astype("float32")
    poisoned[~valid] = np.nan
    return poisoned


def check_routing_equals_the_reference(case, reference):
    rng = np.random.default_rng(case.seed + 2)
    router = case.layer.build()
    router.build((None, case.units))
    randomise_weights(router, case.seed)
    inputs = make_inputs(case, 1, router)
    valid = inputs.valid
    noise = reference.draws(router, case.num_tokens, rng)
    kwargs = {} if noise is None else {"noise": _poisoned(noise, valid)}
    predicted = predicted_error(router, case.num_tokens, case.training)
    before = [v.numpy() for v in router.variables]
    try:
        routing = router(
            as_input(inputs.poisoned, case), training=case.training, mask=inputs.mask,
            **kwargs, **inputs.poisoned_router_inputs,
        )
    except ValueError as error:
        documented_error(error, predicted)
        return
    require_predicted_error(predicted)
    after = {v.name: v.numpy() for v in router.variables}
    for variable, value in zip(router.variables, before):  # the reference reads the state the call saw
        variable.assign(value)
    x = as_seen(inputs.clean, case, router)
    expected = reference.expected(router, x, valid, case.training, noise, inputs.router_inputs)
    n, num_tokens = router.num_experts, case.num_tokens
    token_id, expert_id, weight = (np.asarray(t) for t in (routing.token_id, routing.expert_id, routing.weight))
    assert np.all((expert_id >= 0) & (expert_id <= n))
    np.testing.assert_array_equal(weight[expert_id == n], 0.0)
    dense = ref.dense_gates(token_id, expert_id, weight, num_tokens, n)
    np.testing.assert_allclose(dense, expected.gates, rtol=1e-5, atol=1e-5)
    if expected.ranked is not None:
        # Token choice: all first choices, then all second choices, ...
        k = router.k
        np.testing.assert_array_equal(token_id, np.tile(np.arange(num_tokens), k))
        np.testing.assert_array_equal(
            expert_id.reshape(k, num_tokens).T, np.where(valid[:, None], expected.ranked, n)
        )
    np.testing.assert_allclose(routing.importance, expected.importance, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(routing.load, expected.load, rtol=1e-4, atol=1e-4)
    assert float(routing.dropped) == expected.dropped
    assert set(routing.losses) == set(expected.losses)
    for name, value in expected.losses.items():
        np.testing.assert_allclose(float(routing.losses[name]), value, rtol=1e-4, atol=1e-6)
    assert set(routing.metrics) == set(router.metric_names)
    for name, value in expected.after.items():
        np.testing.assert_allclose(after[name], value, rtol=1e-6, atol=1e-7, err_msg=name)


def _without_jitter(spec):
    if "jitter_epsilon" not in spec.kwargs:
        return spec
    return dataclasses.replace(spec, kwargs={**spec.kwargs, "jitter_epsilon": 0.0})


def test_every_router_has_a_reference():
    assert set(GATE_REFERENCES) == set(ROUTERS)


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("name", sorted(GATE_REFERENCES))
def test_routing_equals_the_reference(name, profile):
    reference = GATE_REFERENCES[name]
    run_property(
        profile,
        cases(ROUTERS[name].map(_without_jitter), policies=("float32",), max_leading=1),
        lambda case: check_routing_equals_the_reference(case, reference),
    )
