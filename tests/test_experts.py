"""Gated experts and the experts contract, against numpy references.

Gated FeedForwardExperts (SwiGLU, GEGLU, GLU) against a transcription of
Shazeer (2020) and its chain-rule gradients; a user's own expert bank plugged
into MoELayer against a dense per-token computation, saved and reloaded in a
fresh process.
"""

import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_moe
from tests import numpy_reference as ref
from tests.layer_test_case import randomise_weights, run_layer_test

N, C, D, H, O = 3, 5, 4, 6, 2
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _gated(activation, use_bias, seed=1):
    experts = tf_moe.FeedForwardExperts(N, H, O, activation=activation, use_bias=use_bias, gated=True)
    experts.build((N, None, D))
    randomise_weights(experts, seed=seed)
    return experts


def _gated_weights(experts, e):
    get = lambda name: getattr(experts, name).numpy()[e]  # noqa: E731
    biases = [get(b)[0] if experts.use_bias else None for b in ("bias_gate", "bias_in", "bias_out")]
    return get("kernel_gate"), biases[0], get("kernel_in"), biases[1], get("kernel_out"), biases[2]


@pytest.mark.parametrize("activation", ["silu", "gelu", "sigmoid"])
@pytest.mark.parametrize("use_bias", [True, False])
def test_gated_experts_and_their_gradients_equal_the_reference(activation, use_bias):
    experts = _gated(activation, use_bias)
    assert len(experts.weights) == (6 if use_bias else 3)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((N, C, D)).astype("float32")
    d_out = rng.standard_normal((N, C, O)).astype("float32")
    x_var = tf.constant(x)
    names = ["kernel_gate", "kernel_in", "kernel_out"] + (["bias_gate", "bias_in", "bias_out"] if use_bias else [])
    with tf.GradientTape() as tape:
        tape.watch(x_var)
        y = experts(x_var)
        objective = tf.reduce_sum(y * d_out)
    grads = tape.gradient(objective, [x_var] + [getattr(experts, n) for n in names])
    got = dict(zip(["x"] + [n.replace("kernel_", "w_").replace("bias_", "b_") for n in names], grads))
    for e in range(N):
        weights = _gated_weights(experts, e)
        np.testing.assert_allclose(y[e], ref.gated_expert(x[e], *weights, activation), rtol=1e-4, atol=1e-5)
        want = ref.gated_expert_gradients(x[e], *weights, d_out[e], activation)
        for name, value in want.items():
            got_e = np.asarray(got[name][e])
            if name.startswith("b_"):
                got_e = got_e[0]
            np.testing.assert_allclose(got_e, value, rtol=1e-4, atol=1e-4, err_msg=name)


def test_gated_experts_citizenship_and_ops():
    run_layer_test(
        tf_moe.FeedForwardExperts,
        dict(num_experts=N, hidden_units=H, output_units=O, activation="silu", gated=True),
        input_shape=(N, C, D),
        expected_output_shape=(N, C, O),
        supports_masking=False,
    )
    experts = _gated("silu", True)
    # Three kernels: d*h twice (gate and linear) and h*o, as Shazeer (2020) counts them.
    assert experts.ops_per_token() == 2 * D * H + H * O


@pytest.mark.parametrize("gated", ["yes", 1])
def test_gated_must_be_a_bool(gated):
    with pytest.raises(ValueError, match="`gated`"):
        tf_moe.FeedForwardExperts(N, H, O, gated=gated)
    with pytest.raises(ValueError, match="`gated`"):
        tf_moe.MoELayer(4, 2, 8, gated=gated)


def _moe_reference(layer, x, expert_fn):
    """The routed mixture computed densely: every token through its experts, in numpy."""
    flat = x.reshape(-1, x.shape[-1])
    router = layer.router
    _, gates, _ = ref.noisy_top_k(flat, router.w_gate.numpy(), router.w_noise.numpy(), 0, layer.k,
                                  router.noise_epsilon, train=False)
    out = sum(gates[:, e : e + 1] * expert_fn(flat, e) for e in range(layer.num_experts))
    return out.reshape(x.shape[:-1] + (out.shape[-1],))


def test_moe_layer_with_gated_experts_equals_the_dense_reference():
    layer = tf_moe.MoELayer(4, 2, 6, activation="gelu", gated=True, router="noisy_top_k")
    x = np.random.default_rng(3).standard_normal((2, 7, 5)).astype("float32")
    layer(x)
    randomise_weights(layer, seed=4)
    bank = layer.experts
    want = _moe_reference(
        layer, x, lambda t, e: ref.gated_expert(t, *_gated_weights(bank, e), "gelu")
    )
    np.testing.assert_allclose(layer(x, training=False), want, rtol=1e-4, atol=1e-5)
    # The router's d*n, then k gated experts at 2*d*h + h*o each.
    assert layer.ops_per_token() == 5 * 4 + 2 * (2 * 5 * 6 + 6 * 5)
    assert layer.get_config()["gated"] is True


@keras.saving.register_keras_serializable(package="tf_moe_tests")
class ScaledLinearExperts(tf_moe.Experts):
    """A user's expert bank: expert e is `x A_e * s_e` (no tf_moe internals)."""

    def build(self, input_shape):
        self.check_input_shape(input_shape)
        self.output_units = self.output_units or input_shape[-1]
        self.kernel = self.add_weight(shape=(self.num_experts, input_shape[-1], self.output_units), name="kernel")
        self.scale = self.add_weight(shape=(self.num_experts, 1, 1), initializer="ones", name="scale")

    def call(self, inputs):
        return tf.matmul(inputs, self.kernel) * self.scale

    def ops_per_token(self):
        return self.kernel.shape[1] * self.kernel.shape[2]


_CUSTOM_BANK_MODULE = textwrap.dedent('''
    import keras, tensorflow as tf, tf_moe

    @keras.saving.register_keras_serializable(package="tf_moe_tests")
    class ScaledLinearExperts(tf_moe.Experts):
        def build(self, input_shape):
            self.check_input_shape(input_shape)
            self.output_units = self.output_units or input_shape[-1]
            self.kernel = self.add_weight(shape=(self.num_experts, input_shape[-1], self.output_units), name="kernel")
            self.scale = self.add_weight(shape=(self.num_experts, 1, 1), initializer="ones", name="scale")

        def call(self, inputs):
            return tf.matmul(inputs, self.kernel) * self.scale

        def ops_per_token(self):
            return self.kernel.shape[1] * self.kernel.shape[2]
''')


def _custom_moe(num_shared_experts=0):
    layer = tf_moe.MoELayer(4, 2, experts=ScaledLinearExperts(4, output_units=3), router="noisy_top_k",
                            num_shared_experts=num_shared_experts)
    x = np.random.default_rng(5).standard_normal((2, 6, 5)).astype("float32")
    layer(x)
    randomise_weights(layer, seed=6)
    return layer, x


def _linear_expert(bank):
    return lambda t, e: t @ bank.kernel.numpy()[e] * bank.scale.numpy()[e, 0, 0]


def test_a_users_expert_bank_plugs_into_moe_layer():
    layer, x = _custom_moe(num_shared_experts=1)
    mask = np.random.default_rng(7).random(x.shape[:-1]) > 0.25
    shared = layer.shared_experts
    assert isinstance(shared, ScaledLinearExperts) and shared.num_experts == 1
    poisoned = np.where(mask[..., None], x, np.nan).astype("float32")
    y = np.asarray(layer(poisoned, mask=mask, training=False))
    want = _moe_reference(layer, x, _linear_expert(layer.experts)) + _linear_expert(shared)(x, 0)
    np.testing.assert_allclose(y[mask], want[mask], rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(y[~mask], 0.0)
    assert y.shape == (2, 6, 3) and layer.compute_output_shape((2, 6, 5)) == (2, 6, 3)
    # The router's d*n, then k routed and the shared expert at d*o each.
    assert layer.ops_per_token() == 5 * 4 + 3 * 5 * 3


@keras.saving.register_keras_serializable(package="tf_moe_tests")
class EinsumExperts(ScaledLinearExperts):
    """A bank that needs exactly [num_experts, slots, d], as the contract gives it."""

    def call(self, inputs):
        return tf.einsum("esd,edo->eso", inputs, self.kernel) * self.scale


def test_a_users_bank_gets_its_contracts_buffer_for_several_shared_experts():
    layer = tf_moe.MoELayer(4, 2, experts=EinsumExperts(4, output_units=3), router="noisy_top_k", num_shared_experts=2)
    x = np.random.default_rng(8).standard_normal((2, 6, 5)).astype("float32")
    layer(x)
    randomise_weights(layer, seed=9)
    assert not layer.shared_experts.broadcasts_tokens and tf_moe.FeedForwardExperts.broadcasts_tokens
    with tf.GradientTape() as tape:
        y = layer(x, training=False)
        loss = tf.reduce_sum(y**2)
    shared = layer.shared_experts
    want = _moe_reference(layer, x, _linear_expert(layer.experts)) + sum(_linear_expert(shared)(x, j) for j in (0, 1))
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-5)
    grads = tape.gradient(loss, [shared.kernel, shared.scale])
    assert all(g is not None and np.all(np.any(np.asarray(g) != 0, axis=(1, 2))) for g in grads)


def test_a_users_expert_bank_trains_through_moe_layer():
    layer, x = _custom_moe()
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(layer(x, training=True) ** 2)
    grads = tape.gradient(loss, [layer.experts.kernel, layer.experts.scale])
    assert all(g is not None and np.any(np.asarray(g) != 0) for g in grads)


def test_a_users_bank_without_call_split_runs_one_padded_buffer():
    layer, x = _custom_moe()
    assert layer.experts.overflow_cost is None
    # A training call on the dropless path works without `call_split`...
    layer(x, training=True)
    # ...which the base class refuses, naming what to set.
    with pytest.raises(NotImplementedError, match="overflow_cost"):
        layer.experts.call_split(tf.zeros((4, 1, 5)), tf.zeros((0, 0, 5)), tf.zeros((0,), tf.int32))


def test_a_users_expert_bank_reloads_in_a_fresh_process(tmp_path):
    layer, x = _custom_moe(num_shared_experts=1)
    inputs = keras.Input((None, 5))
    model = keras.Model(inputs, layer(inputs))
    path = str(tmp_path / "custom.keras")
    model.save(path)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", model.predict(x, verbose=0))
    script = _CUSTOM_BANK_MODULE + textwrap.dedent(f'''
        import numpy as np
        model = keras.models.load_model({path!r})
        x = np.load({str(tmp_path / "x.npy")!r})
        np.testing.assert_array_equal(model.predict(x, verbose=0), np.load({str(tmp_path / "y.npy")!r}))
        moe = model.layers[1]
        assert type(moe.experts).__name__ == "ScaledLinearExperts"
        assert type(moe.shared_experts).__name__ == "ScaledLinearExperts"
        print("reloaded")
    ''')
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert "reloaded" in out.stdout, out.stderr[-3000:]


def test_gated_moe_reloads_in_a_fresh_process(tmp_path):
    layer = tf_moe.MoELayer(4, 2, 6, activation="silu", gated=True, num_shared_experts=1)
    x = np.random.default_rng(8).standard_normal((2, 6, 5)).astype("float32")
    inputs = keras.Input((None, 5))
    model = keras.Model(inputs, layer(inputs))
    randomise_weights(layer, seed=9)
    path = str(tmp_path / "gated.keras")
    model.save(path)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", model.predict(x, verbose=0))
    script = textwrap.dedent(f'''
        import keras, numpy as np, tf_moe
        model = keras.models.load_model({path!r})
        x = np.load({str(tmp_path / "x.npy")!r})
        np.testing.assert_array_equal(model.predict(x, verbose=0), np.load({str(tmp_path / "y.npy")!r}))
        assert model.layers[1].experts.gated
        print("reloaded")
    ''')
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert "reloaded" in out.stdout, out.stderr[-3000:]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(hidden_units=8), r"\['hidden_units'\]"),
        (dict(activation="tanh", gated=True), r"\['activation', 'gated'\]"),
        (dict(use_bias=False), r"\['use_bias'\]"),
    ],
)
def test_a_bank_and_feed_forward_arguments_together_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tf_moe.MoELayer(4, 2, experts=ScaledLinearExperts(4), **kwargs)


def test_bad_expert_banks_are_named():
    with pytest.raises(ValueError, match="`experts` holds 3 experts, the router routes to 4"):
        tf_moe.MoELayer(4, 2, experts=ScaledLinearExperts(3))
    with pytest.raises(ValueError, match="`experts` must be None, a tf_moe.Experts layer"):
        tf_moe.MoELayer(4, 2, experts=keras.layers.Dense(3))
    with pytest.raises(ValueError, match="`hidden_units`"):
        tf_moe.MoELayer(4, 2)


def test_expert_parallelism_refuses_a_users_bank():
    with pytest.raises(ValueError, match="`experts`: ExpertParallelMoE shards FeedForwardExperts"):
        tf_moe.ExpertParallelMoE(4, 2, experts=ScaledLinearExperts(4))
