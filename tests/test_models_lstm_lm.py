"""Tests of the appendix-C language model and its dense baselines."""

import os

import keras
import numpy as np
import pytest

import tf_moe
from tf_moe import HierarchicalRouter, routers
from tf_moe.models import BASELINES, lstm_lm, ops_per_timestep
from tf_moe.training import MoEModel

SMALL = dict(vocab_size=60, units=16, num_experts=4, k=2, expert_hidden_units=32, dropout=0.0)


def _tokens(rng, shape, vocab=60):
    return rng.integers(1, vocab, shape).astype("int32")


@pytest.mark.parametrize("kind", ("moe",) + BASELINES)
def test_shapes_and_padding_does_not_change_real_logits(kind):
    model = lstm_lm(model=kind, **SMALL)
    assert isinstance(model, MoEModel)
    rng = np.random.default_rng(0)
    tokens = _tokens(rng, (3, 9))
    tokens[0, 5:] = 0
    tokens[2, 7:] = 0
    logits = np.asarray(model(tokens))
    assert logits.shape == (3, 9, 60) and logits.dtype == np.float32
    # Each padded sentence alone, unpadded, gives the same logits.
    for row, length in ((0, 5), (1, 9), (2, 7)):
        alone = np.asarray(model(tokens[row : row + 1, :length]))
        np.testing.assert_allclose(logits[row, :length], alone[0], rtol=1e-5, atol=1e-5)


def test_hierarchical_moe_shapes_and_padding():
    model = lstm_lm(**{**SMALL, "num_experts": 8}, num_groups=4)
    router = model.get_layer("moe").router
    assert isinstance(router, HierarchicalRouter)
    assert (router.num_groups, router.experts_per_group, router.k_primary, router.k_secondary) == (4, 2, 2, 2)
    rng = np.random.default_rng(1)
    tokens = _tokens(rng, (2, 6))
    tokens[1, 3:] = 0
    logits = np.asarray(model(tokens))
    np.testing.assert_allclose(logits[1, :3], np.asarray(model(tokens[1:, :3]))[0], rtol=1e-5, atol=1e-5)


def test_ops_per_timestep_against_hand_count():
    u, h, n, k = 16, 32, 4, 2
    lstm = 4 * u * (u + u)  # input and recurrent kernels of one LSTM
    moe = u * n + k * (u * h + h * u)  # gate + k experts
    assert ops_per_timestep(lstm_lm(**SMALL)) == 2 * lstm + moe
    assert ops_per_timestep(lstm_lm(model="moe-1-wide", **SMALL)) == 2 * lstm + 2 * u * k * h
    assert ops_per_timestep(lstm_lm(model="4xlstm", **SMALL)) == 4 * lstm
    # Hierarchical, 4 groups of 2, k=2 per level: primary gate, 2 group gates, 4 experts.
    hier = lstm_lm(**{**SMALL, "num_experts": 8}, num_groups=4)
    assert ops_per_timestep(hier) == 2 * lstm + u * 4 + 2 * u * 2 + 4 * (2 * u * h)


def test_baselines_are_computationally_matched():
    # The paper's proportions (expert hidden = 2 * units, k = 4) at 1/8 width.
    sizes = dict(vocab_size=50, units=64, num_experts=16, k=4, expert_hidden_units=128)
    reference = ops_per_timestep(lstm_lm(**sizes))
    for kind in BASELINES:
        ops = ops_per_timestep(lstm_lm(model=kind, **sizes))
        assert abs(ops - reference) <= 0.1 * reference, (kind, ops, reference)
    hier = ops_per_timestep(lstm_lm(**{**sizes, "k": 2}, num_groups=4))
    assert abs(hier - reference) <= 0.1 * reference


def test_shared_experts_are_counted_and_matched_by_the_baselines():
    u, h, n, k, s = 16, 32, 4, 2, 1
    lstm = 4 * u * (u + u)
    model = lstm_lm(**SMALL, num_shared_experts=s)
    assert model.get_layer("moe").num_shared_experts == s
    assert ops_per_timestep(model) == 2 * lstm + u * n + (k + s) * (2 * u * h)
    # The dense stand-ins widen (or deepen) to the k + s experts a token visits.
    wide = lstm_lm(model="moe-1-wide", **SMALL, num_shared_experts=s)
    assert wide.get_layer("wide_hidden").units == (k + s) * h
    assert ops_per_timestep(wide) == 2 * lstm + 2 * u * (k + s) * h
    deep = lstm_lm(model="moe-1-deep", **SMALL, num_shared_experts=s)
    assert ops_per_timestep(deep) == 2 * lstm + 2 * u * h + (k + s - 1) * h * h
    # Padding still changes no real position's logits.
    tokens = _tokens(np.random.default_rng(3), (2, 6))
    tokens[1, 4:] = 0
    logits = np.asarray(model(tokens))
    np.testing.assert_allclose(logits[1, :4], np.asarray(model(tokens[1:, :4]))[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ("moe", "hierarchical") + BASELINES)
def test_keras_round_trip_gives_identical_outputs(kind, tmp_path):
    if kind == "hierarchical":
        model = lstm_lm(**{**SMALL, "num_experts": 8}, num_groups=4)
    else:
        model = lstm_lm(model=kind, **SMALL)
    tokens = _tokens(np.random.default_rng(2), (2, 5))
    tokens[0, 3:] = 0
    path = os.path.join(tmp_path, "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path, safe_mode=True)
    assert isinstance(loaded, MoEModel)
    np.testing.assert_array_equal(np.asarray(loaded(tokens)), np.asarray(model(tokens)))


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="`model`"):
        lstm_lm(model="lstm-2048", **SMALL)
    with pytest.raises(ValueError, match="`dropout`"):
        lstm_lm(**{**SMALL, "dropout": 1.5})
    with pytest.raises(ValueError, match="`num_groups`"):
        lstm_lm(**SMALL, num_groups=3)
    with pytest.raises(ValueError, match="`num_groups`"):
        lstm_lm(**SMALL, num_groups=0)
    with pytest.raises(ValueError, match="`vocab_size`"):
        lstm_lm(**{**SMALL, "vocab_size": 0})
    for kind in ("moe", "moe-1-wide"):
        with pytest.raises(ValueError, match="`num_shared_experts`"):
            lstm_lm(model=kind, **SMALL, num_shared_experts=-1)


@pytest.mark.parametrize("kind", ("moe", "4xlstm"))
def test_stateful_model_carries_state_through_a_stream(kind):
    from tf_moe.training import ResetRecurrentState

    rng = np.random.default_rng(3)
    tokens = _tokens(rng, (2, 12))
    stateless = lstm_lm(model=kind, **SMALL)
    stateful = lstm_lm(model=kind, stateful=True, batch_size=2, **SMALL)
    stateful.set_weights(stateless.get_weights())
    whole = np.asarray(stateless(tokens))
    # Three consecutive segments of the stream give the logits of the whole.
    parts = [np.asarray(stateful(tokens[:, i : i + 4])) for i in (0, 4, 8)]
    np.testing.assert_allclose(np.concatenate(parts, axis=1), whole, rtol=1e-5, atol=1e-5)
    # After a reset the stream starts again from a zero state.
    reset = ResetRecurrentState()
    reset.set_model(stateful)
    reset.on_epoch_begin(0)
    np.testing.assert_allclose(np.asarray(stateful(tokens[:, :4])), whole[:, :4], rtol=1e-5, atol=1e-5)


def test_stateful_model_needs_a_batch_size():
    with pytest.raises(ValueError, match="batch_size"):
        lstm_lm(stateful=True, **SMALL)


@pytest.mark.parametrize("router, num_groups", [("noisy_top_k", None), (None, 2)])
def test_gate_learning_rate_multiplier_reaches_the_papers_routers(router, num_groups):
    model = lstm_lm(**SMALL, router=router, num_groups=num_groups, gate_learning_rate_multiplier=5.0)
    assert model.get_layer("moe").router.learning_rate_multiplier == 5.0


def test_gate_learning_rate_multiplier_is_refused_where_no_noisy_gate_takes_it():
    with pytest.raises(ValueError, match="`gate_learning_rate_multiplier` is an option of the paper's noisy gates"):
        lstm_lm(**SMALL, gate_learning_rate_multiplier=5.0)


@pytest.mark.parametrize("router, k", [("switch", 1), ("top_k", 2), ("loss_free", 2), ("hash", 1)])
def test_any_router_by_name(router, k):
    model = lstm_lm(**{**SMALL, "k": k}, router=router)
    moe = model.get_layer("moe")
    assert type(moe.router) is type(routers.get(router, 4, k)) and moe.k == k
    rng = np.random.default_rng(3)
    tokens = _tokens(rng, (2, 6))
    tokens[1, 4:] = 0
    logits = np.asarray(model(tokens))
    # Padding still changes nothing (the hash router gets the ids, masked).
    np.testing.assert_allclose(logits[1, :4], np.asarray(model(tokens[1:, :4]))[0], rtol=1e-5, atol=1e-5)
    units, hidden = SMALL["units"], SMALL["expert_hidden_units"]
    gate = 0 if router == "hash" else units * 4
    lstms = 2 * 4 * units * (units + units)
    assert ops_per_timestep(model) == lstms + gate + k * (units * hidden + hidden * units)


def test_a_router_instance_and_its_conflicts():
    router = tf_moe.TopKRouter(4, 2, normalize=True)
    assert lstm_lm(**SMALL, router=router).get_layer("moe").router is router
    with pytest.raises(ValueError, match="`num_groups`"):
        lstm_lm(**SMALL, router="top_k", num_groups=2)
    with pytest.raises(ValueError, match="`k`"):
        lstm_lm(**SMALL, router="switch")  # k = 2
    # The default is the paper's gate without noise, which the main job measured; not MoELayer's.
    default = lstm_lm(**SMALL).get_layer("moe")
    assert type(default.router) is tf_moe.TopKGateRouter and default.importance_weight == 0.1
    assert type(tf_moe.MoELayer(4, 2, 8).router) is not tf_moe.TopKGateRouter
    with pytest.raises(ValueError, match="`importance_weight`"):
        lstm_lm(**SMALL, router="top_k", importance_weight=0.1)  # a weight top_k would ignore
