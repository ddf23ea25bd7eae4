"""One conformance suite for every router: its `Routing` keeps the contract, and `MoELayer` with it is a Keras citizen.

Each router's own maths is tested against numpy references in its test file;
here every router (every registered name, and the hierarchical one) must
return a `Routing` as `tf_moe.Router` documents it, and an `MoELayer` with it
must pass the layer checks of tests/layer_test_case.py (build, shapes,
config and `.keras` round trip, masks, mixed precision), at inference and,
where its training calls are deterministic, while training.
"""

from typing import NamedTuple

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_moe
from tests.layer_test_case import run_layer_test
from tf_moe import routers

N = 4
TOKEN_IDS = np.random.default_rng(2).integers(0, 50, (3, 5))


class Case(NamedTuple):
    router: object  # what MoELayer(router=...) takes
    call_kwargs: dict = {}  # per-token router inputs
    # Training calls repeat (no noise, no bias update between the checks' calls).
    deterministic_training: bool = True
    # A masked token changes no other token's routing.
    supports_masking: bool = True


def _serialized(router):
    # A config, so that every layer the checks build gets a router of its own.
    return keras.layers.serialize(router)


CASES = {
    "noisy_top_k": Case(_serialized(tf_moe.NoisyTopKRouter(N, 2, noisy=False))),
    "softmax": Case("softmax"),
    "batchwise": Case("batchwise"),
    "hierarchical": Case(_serialized(tf_moe.HierarchicalRouter(2, N // 2, 1, 2, noisy=False))),
    # Jitter makes training calls differ: tests/test_switch_router.py checks it.
    "switch": Case(_serialized(tf_moe.SwitchRouter(N, jitter_epsilon=0.0))),
    "top_k": Case("top_k"),
    # A masked token changes which tokens the experts choose (checked in its file).
    "expert_choice": Case("expert_choice", supports_masking=False),
    # Training updates the biases between the checks' calls.
    "loss_free": Case("loss_free", deterministic_training=False),
    "hash": Case("hash", {"token_ids": TOKEN_IDS}),
}


def test_every_router_has_a_case():
    assert set(CASES) == set(routers.NAMES) | {"hierarchical"}


def _layer(name):
    router = CASES[name].router
    k = None if name in ("softmax", *routers.ONE_EXPERT) else 2
    arguments = dict(num_experts=N, k=k) if isinstance(router, str) else {}
    return dict(arguments, hidden_units=8, output_units=6, router=router)


@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_moe_layer_with_the_router_is_a_keras_citizen(name, training):
    case = CASES[name]
    if training and not case.deterministic_training:
        pytest.skip("its training calls differ from one another by design")
    run_layer_test(
        tf_moe.MoELayer,
        _layer(name),
        input_shape=(3, 5, 10),
        expected_output_shape=(3, 5, 6),
        supports_masking=case.supports_masking,
        call_kwargs=dict(case.call_kwargs, **({"training": True} if training else {})),
    )


@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_the_routing_keeps_the_contract(name, training):
    layer = tf_moe.MoELayer(**_layer(name))
    x = np.random.default_rng(0).standard_normal((3, 5, 10)).astype("float32")
    mask = np.ones((3, 5), bool)
    mask[0, 3:] = False
    _, routing = layer(x, mask=mask, training=training, return_routing=True, **CASES[name].call_kwargs)
    router = layer.router
    assert isinstance(routing, tf_moe.Routing)
    assert set(routing.metrics) == set(router.metric_names)
    assert set(routing.losses) <= set(router.loss_names)
    assert routing.token_id.dtype == tf.int32 and routing.expert_id.dtype == tf.int32
    assert routing.weight.dtype == tf.float32 and routing.dropped.shape == ()
    assert routing.importance.shape == (N,) and routing.load.shape == (N,)
    token_id, expert_id, weight = (np.asarray(v) for v in routing[:3])
    assert token_id.shape == expert_id.shape == weight.shape
    assert ((0 <= expert_id) & (expert_id <= N)).all() and ((0 <= token_id) & (token_id < 15)).all()
    # Masked tokens get no expert, and not routed means weight 0.
    masked = ~mask.reshape(-1)[token_id]
    assert (expert_id[masked] == N).all()
    assert (weight[expert_id == N] == 0).all()
    # Importance sums the gates of the routed assignments; the load is a count (or its smooth estimate).
    routed = expert_id < N
    np.testing.assert_allclose(
        np.asarray(routing.importance),
        np.bincount(expert_id[routed], weights=weight[routed], minlength=N), rtol=1e-5, atol=1e-6,
    )
    load = np.asarray(routing.load)
    assert np.isfinite(load).all() and (load >= 0).all()
