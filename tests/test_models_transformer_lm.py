"""Tests of the decoder-only MoE Transformer language model and its dense twin."""

import os

import keras
import numpy as np
import pytest

import tf_moe
from tf_moe.models import ops_per_timestep, transformer_lm
from tf_moe.training import MoEModel
from tests.layer_test_case import run_layer_test

SMALL = dict(vocab_size=50, units=16, num_layers=2, num_heads=2, num_experts=4, k=2,
             expert_hidden_units=8, dropout=0.0, max_length=32)


def _tokens(seed, shape):
    return np.random.default_rng(seed).integers(1, 50, shape).astype("int32")


@pytest.mark.parametrize("kind", ["moe", "dense"])
def test_shapes_and_padding_does_not_change_real_logits(kind):
    model = transformer_lm(model=kind, **SMALL)
    assert isinstance(model, MoEModel)
    tokens = _tokens(0, (3, 9))
    tokens[0, 5:] = 0
    tokens[2, 7:] = 0
    logits = np.asarray(model(tokens))
    assert logits.shape == (3, 9, 50) and logits.dtype == np.float32
    for row, length in ((0, 5), (1, 9), (2, 7)):
        alone = np.asarray(model(tokens[row : row + 1, :length]))
        np.testing.assert_allclose(logits[row, :length], alone[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("router", [None, "top_k", "switch", "hash"])
def test_causal_a_later_token_changes_no_earlier_logit(router):
    k = 1 if router in ("switch", "hash") else 2
    model = transformer_lm(**{**SMALL, "k": k}, router=router)
    tokens = _tokens(1, (2, 8))
    changed = tokens.copy()
    changed[:, 5:] = (changed[:, 5:] % 49) + 1
    # At inference: routing noise while training would differ between calls anyway.
    a, b = np.asarray(model(tokens)), np.asarray(model(changed))
    np.testing.assert_allclose(a[:, :5], b[:, :5], rtol=1e-5, atol=1e-5)
    assert not np.allclose(a[:, 5:], b[:, 5:])


def test_ops_per_timestep_against_hand_count():
    d, h, n, k, layers = 16, 8, 4, 2, 2
    attention = 4 * d * d  # query, key, value and output projections
    moe = d * n + k * (d * h + h * d)  # router + k experts
    dense = 2 * d * (k * h + n // 2)  # the matched FFN, k * h + n / 2 wide: the same ops
    assert moe == dense
    assert ops_per_timestep(transformer_lm(**SMALL)) == layers * (attention + moe)
    assert ops_per_timestep(transformer_lm(model="dense", **SMALL)) == layers * (attention + dense)
    every_other = transformer_lm(moe_every=2, **SMALL)
    assert ops_per_timestep(every_other) == layers * attention + dense + moe
    assert [type(every_other.get_layer(f"block_{i}_moe")).__name__ for i in (2,)] == ["MoELayer"]
    with pytest.raises(ValueError):
        every_other.get_layer("block_1_moe")


def test_shared_experts_are_counted_and_the_dense_twin_matches_them():
    d, h, n, k, s, layers = 16, 8, 4, 2, 1, 2
    attention = 4 * d * d
    moe = d * n + (k + s) * (d * h + h * d)
    model = transformer_lm(**SMALL, num_shared_experts=s)
    assert model.get_layer("block_1_moe").num_shared_experts == s
    assert ops_per_timestep(model) == layers * (attention + moe)
    assert ops_per_timestep(transformer_lm(model="dense", **SMALL, num_shared_experts=s)) == layers * (attention + moe)


def test_default_moe_blocks_are_the_layers_default_and_routers_are_per_block():
    model = transformer_lm(**SMALL)
    default = tf_moe.MoELayer(4, 2, 8).get_config()
    for block in (1, 2):
        config = model.get_layer(f"block_{block}_moe").get_config()
        assert config["router"]["class_name"] == default["router"]["class_name"]
        assert config["importance_weight"] == default["importance_weight"]
    routers = [model.get_layer(f"block_{b}_moe").router for b in (1, 2)]
    assert routers[0] is not routers[1]
    hashed = transformer_lm(**{**SMALL, "k": 1}, router="hash")
    # The hash router routes by the model's input ids.
    assert hashed.get_layer("block_1_moe").router.required_inputs == ("token_ids",)
    with pytest.warns(UserWarning, match="not causal"):
        transformer_lm(**SMALL, router="expert_choice")


def test_trains_and_reloads(tmp_path):
    model = transformer_lm(**{**SMALL, "num_layers": 1})  # one MoE block: tracing dominates
    model.compile(optimizer=keras.optimizers.AdamW(1e-2))
    x = _tokens(2, (8, 12))
    y = np.roll(x, -1, axis=1)
    history = model.fit(x, y, epochs=4, batch_size=4, verbose=0)
    assert history.history["task_loss"][-1] < history.history["task_loss"][0]
    assert "block_1_moe_cv_load" in history.history and "aux_loss" in history.history
    path = os.path.join(tmp_path, "t.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, arg",
    [
        (dict(units=15), "`units`"),
        (dict(num_layers=0), "`num_layers`"),
        (dict(dropout=1.0), "`dropout`"),
        (dict(model="wide"), "`model`"),
        (dict(moe_every=0), "`moe_every`"),
        (dict(ffn_units=2.5), "`ffn_units`"),
        (dict(num_shared_experts=-1), "`num_shared_experts`"),
        (dict(router=tf_moe.TopKRouter(4, 2)), "`router`"),
    ],
)
def test_bad_arguments_are_named(kwargs, arg):
    with pytest.raises(ValueError, match=arg):
        transformer_lm(**{**SMALL, **kwargs})


def test_position_embedding_citizenship_and_length_check():
    # Masks pass through it in models (the padding test above); called alone it takes none.
    run_layer_test(
        tf_moe.PositionEmbedding, dict(max_length=8), input_shape=(2, 5, 4), expected_output_shape=(2, 5, 4),
        supports_masking=False,
    )
    layer = tf_moe.PositionEmbedding(max_length=4)
    with pytest.raises(ValueError, match="more than `max_length`"):
        layer(np.zeros((1, 6, 3), "float32"))
    x = np.zeros((2, 3, 5), "float32")
    np.testing.assert_allclose(layer(x), np.broadcast_to(layer.embeddings.numpy()[:3], (2, 3, 5)))


def _trained_dense(seed):
    dense = transformer_lm(model="dense", **{**SMALL, "ffn_units": 8})
    rng = np.random.default_rng(seed)
    for variable in dense.weights:
        variable.assign(rng.standard_normal(variable.shape).astype("float32") * 0.3)
    return dense


def test_upcycled_model_starts_as_the_dense_one_with_a_renormalising_router():
    dense = _trained_dense(3)
    moe = tf_moe.models.upcycle_transformer_lm(dense, num_experts=4, k=2, router="noisy_top_k")
    tokens = _tokens(4, (2, 9))
    np.testing.assert_allclose(np.asarray(moe(tokens)), np.asarray(dense(tokens)), rtol=1e-4, atol=1e-4)


def test_upcycled_copies_move_apart_under_the_default_router():
    moe = tf_moe.models.upcycle_transformer_lm(_trained_dense(5), num_experts=4, k=2)
    banks = [layer.experts for layer in moe.layers if isinstance(layer, tf_moe.MoELayer)]
    assert len(banks) == 2
    for layer in moe.layers:
        if isinstance(layer, tf_moe.MoELayer):
            assert np.std(layer.router.w_gate.numpy()) > 0  # a random gate, each layer its own
    moe.compile(keras.optimizers.SGD(0.1))
    tokens = _tokens(6, (8, 9))
    moe.fit(tokens[:, :-1], tokens[:, 1:], epochs=3, verbose=0)
    for bank in banks:
        kernels = bank.kernel_in.numpy()
        assert not np.allclose(kernels[0], kernels[1])
