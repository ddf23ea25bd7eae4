"""FeedForwardExperts alone against a numpy transcription of the experts."""

import keras
import numpy as np
import pytest

import tf_moe
from tests import numpy_reference as ref
from tests.layer_test_case import randomise_weights, run_layer_test

N, C, D, H, O = 3, 5, 4, 6, 2


def _numpy_activation(name):
    return {
        "relu": ref.relu,
        "tanh": np.tanh,
        "linear": lambda v: v,
        "sigmoid": lambda v: 1 / (1 + np.exp(-v)),
    }[name]


def test_layer_citizenship():
    run_layer_test(
        tf_moe.FeedForwardExperts,
        dict(num_experts=N, hidden_units=H, output_units=O, activation="tanh"),
        input_shape=(N, C, D),
        expected_output_shape=(N, C, O),
        supports_masking=False,
    )


@pytest.mark.parametrize("activation", ["relu", "tanh", "linear", "sigmoid"])
@pytest.mark.parametrize("use_bias", [True, False])
def test_each_expert_is_its_own_feed_forward_network(activation, use_bias):
    experts = tf_moe.FeedForwardExperts(N, H, O, activation=activation, use_bias=use_bias)
    experts.build((N, None, D))
    randomise_weights(experts, seed=1)
    assert len(experts.weights) == (4 if use_bias else 2)
    x = np.random.default_rng(2).standard_normal((N, C, D)).astype("float32")
    y = np.asarray(experts(x))
    for e in range(N):
        b_in = experts.bias_in.numpy()[e, 0] if use_bias else None
        b_out = experts.bias_out.numpy()[e, 0] if use_bias else None
        want = ref.expert(
            x[e], experts.kernel_in.numpy()[e], b_in, experts.kernel_out.numpy()[e], b_out,
            _numpy_activation(activation),
        )
        np.testing.assert_allclose(y[e], want, rtol=1e-5, atol=1e-5)


def test_regularisers_add_their_penalties():
    experts = tf_moe.FeedForwardExperts(
        N, H, O, kernel_regularizer=keras.regularizers.L2(0.01), bias_regularizer=keras.regularizers.L1(0.1)
    )
    experts.build((N, None, D))
    randomise_weights(experts, seed=3)
    experts(np.zeros((N, C, D), "float32"))
    kernels = [experts.kernel_in.numpy(), experts.kernel_out.numpy()]
    biases = [experts.bias_in.numpy(), experts.bias_out.numpy()]
    expected = sorted([0.01 * np.sum(k**2) for k in kernels] + [0.1 * np.sum(np.abs(b)) for b in biases])
    np.testing.assert_allclose(sorted(float(loss) for loss in experts.losses), expected, rtol=1e-5)


def test_default_initialiser_gives_each_expert_glorot_variance():
    experts = tf_moe.FeedForwardExperts(64, 32, 16)
    experts.build((64, None, 48))
    # Glorot uniform of one [48, 32] kernel: variance 2 / (48 + 32).
    np.testing.assert_allclose(np.var(experts.kernel_in.numpy()), 2 / (48 + 32), rtol=0.05)
    np.testing.assert_allclose(np.var(experts.kernel_out.numpy()), 2 / (32 + 16), rtol=0.05)


def test_ops_per_token():
    experts = tf_moe.FeedForwardExperts(N, H, O)
    experts.build((N, None, D))
    assert experts.ops_per_token() == D * H + H * O


@pytest.mark.parametrize(
    "kwargs, shape, arg",
    [
        (dict(num_experts=0, hidden_units=H, output_units=O), None, "`num_experts`"),
        (dict(num_experts=N, hidden_units=2.5, output_units=O), None, "`hidden_units`"),
        (dict(num_experts=N, hidden_units=H, output_units=O), (N, D), "num_experts, slots, d"),
        (dict(num_experts=N, hidden_units=H, output_units=O), (N + 1, C, D), "num_experts=3"),
    ],
)
def test_bad_arguments_are_named(kwargs, shape, arg):
    with pytest.raises(ValueError, match=arg):
        tf_moe.FeedForwardExperts(**kwargs).build(shape)
