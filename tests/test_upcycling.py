"""Sparse upcycling (Komatsuzaki et al. 2023): experts start as copies of a trained dense FFN."""

import keras
import numpy as np
import pytest

import tf_moe
from tests import numpy_reference as ref

D, H = 6, 10


def _trained_ffn(seed=0, use_bias=True):
    hidden = keras.layers.Dense(H, activation="relu", use_bias=use_bias)
    output = keras.layers.Dense(D, use_bias=use_bias)
    output(hidden(np.zeros((1, D), "float32")))
    rng = np.random.default_rng(seed)
    for variable in hidden.weights + output.weights:
        variable.assign(rng.standard_normal(variable.shape).astype("float32") * 0.5)
    return hidden, output


@pytest.mark.parametrize("router", ["noisy_top_k", "top_k_normalized"])
def test_upcycled_layer_computes_the_dense_ffn_where_gates_sum_to_one(router):
    hidden, output = _trained_ffn()
    if router == "top_k_normalized":
        moe = tf_moe.upcycle(hidden, output, num_experts=8, router=tf_moe.TopKRouter(8, 2, normalize=True))
    else:
        moe = tf_moe.upcycle(hidden, output, num_experts=8, k=2, router=router)
    x = np.random.default_rng(1).standard_normal((3, 4, D)).astype("float32")
    dense = np.asarray(output(hidden(x)))
    for training in (False, True):
        np.testing.assert_allclose(moe(x, training=training), dense, rtol=1e-5, atol=1e-5)


def test_every_expert_is_a_copy_and_the_router_is_fresh():
    hidden, output = _trained_ffn(seed=2)
    moe = tf_moe.upcycle(hidden, output, num_experts=4, k=2, router="top_k")
    bank = moe.experts
    for e in range(4):
        np.testing.assert_array_equal(bank.kernel_in.numpy()[e], hidden.kernel.numpy())
        np.testing.assert_array_equal(bank.bias_in.numpy()[e, 0], hidden.bias.numpy())
        np.testing.assert_array_equal(bank.kernel_out.numpy()[e], output.kernel.numpy())
        np.testing.assert_array_equal(bank.bias_out.numpy()[e, 0], output.bias.numpy())
    assert bank.hidden_units == H and bank.activation is keras.activations.relu
    # The router is new: Switch-style initial weights, not derived from the FFN.
    assert np.std(moe.router.w_gate.numpy()) > 0
    # Top-k without renormalising scales the FFN by the kept probability mass.
    x = np.random.default_rng(3).standard_normal((5, D)).astype("float32")
    logits = x @ moe.router.w_gate.numpy()
    mass = np.sort(ref.softmax(logits), axis=-1)[:, -2:].sum(-1, keepdims=True)
    np.testing.assert_allclose(moe(x), mass * np.asarray(output(hidden(x))), rtol=1e-5, atol=1e-5)


def test_upcycling_from_weight_pairs_without_biases():
    hidden, output = _trained_ffn(seed=4, use_bias=False)
    moe = tf_moe.upcycle((hidden.kernel.numpy(), None), (output.kernel.numpy(),), 4, 2, activation="relu")
    x = np.random.default_rng(5).standard_normal((7, D)).astype("float32")
    np.testing.assert_allclose(moe(x), output(hidden(x)), rtol=1e-5, atol=1e-5)
    assert not moe.use_bias


def test_upcycled_experts_drift_apart_when_trained():
    hidden, output = _trained_ffn(seed=6)
    moe = tf_moe.upcycle(hidden, output, num_experts=4, k=2)
    inputs = keras.Input((D,))
    model = keras.Model(inputs, moe(inputs))
    model.compile(keras.optimizers.SGD(0.1), "mse")
    rng = np.random.default_rng(7)
    model.fit(rng.standard_normal((64, D)), rng.standard_normal((64, D)), epochs=3, verbose=0)
    kernels = moe.experts.kernel_in.numpy()
    assert not np.allclose(kernels[0], kernels[1])


@pytest.mark.parametrize(
    "args, kwargs, message",
    [
        ((keras.layers.Dense(3), keras.layers.Dense(3)), {}, "must be built"),
        (((np.zeros((4, 5)), np.zeros(4)), (np.zeros((5, 4)),)), {}, r"`hidden` must be a Dense layer or \(kernel"),
        (((np.zeros((4, 5)),), (np.zeros((6, 4)),)), {}, "does not follow"),
        (((np.zeros((4, 5)), np.zeros(5)), (np.zeros((5, 4)), None)), {}, "both have biases"),
        (("dense", None), {}, "`hidden` must be a keras.layers.Dense"),
    ],
)
def test_bad_ffns_are_named(args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        tf_moe.upcycle(*args, num_experts=4, k=2, **kwargs)


def test_output_layer_with_an_activation_or_a_second_activation_is_refused():
    hidden, _ = _trained_ffn()
    relu_output = keras.layers.Dense(D, activation="relu")
    relu_output.build((None, H))
    with pytest.raises(ValueError, match="`output`: the FFN's second layer must have no activation"):
        tf_moe.upcycle(hidden, relu_output, 4, 2)
    _, output = _trained_ffn()
    with pytest.raises(ValueError, match="`activation`: `hidden` is a Dense layer"):
        tf_moe.upcycle(hidden, output, 4, 2, activation="gelu")
