"""The stacked experts' hand-written gradient against numpy and against autodiff."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_moe
from tests import numpy_reference as ref
from tf_moe.ops.expert_matmul import gated_activation, split_feed_forward, stacked_feed_forward

N, C, D, H, O = 3, 5, 4, 6, 2


def _sigmoid(v):
    return 1 / (1 + np.exp(-v))


def _normal_pdf(v):
    return np.exp(-0.5 * v**2) / math.sqrt(2 * math.pi)


# name -> (TensorFlow activation, numpy activation, numpy derivative)
ACTIVATIONS = {
    "relu": (tf.nn.relu, ref.relu, lambda p: (p > 0).astype(p.dtype)),
    "tanh": (tf.tanh, np.tanh, lambda p: 1 - np.tanh(p) ** 2),
    "sigmoid": (tf.sigmoid, _sigmoid, lambda p: _sigmoid(p) * (1 - _sigmoid(p))),
    "linear": (lambda v: v, lambda v: v, np.ones_like),
    "gelu": (
        keras.activations.gelu,
        lambda p: p * ref.normal_cdf(p),
        lambda p: ref.normal_cdf(p) + p * _normal_pdf(p),
    ),
}


def _arrays(use_bias, capacity=C, seed=0):
    rng = np.random.default_rng(seed)
    shapes = [(N, capacity, D), (N, D, H), (N, H, O)] + ([(N, 1, H), (N, 1, O)] if use_bias else [])
    return [rng.standard_normal(shape).astype("float32") for shape in shapes]


def _plain(x, w_in, w_out, b_in=None, b_out=None, activation=tf.nn.relu):
    """The same function in plain TensorFlow ops, left to autodiff."""
    hidden = tf.matmul(x, w_in) + (0.0 if b_in is None else b_in)
    outputs = tf.matmul(activation(hidden), w_out)
    return outputs + (0.0 if b_out is None else b_out)


def _values_and_gradients(fn, arrays, d_out, activation):
    tensors = [tf.constant(a) for a in arrays]
    with tf.GradientTape() as tape:
        tape.watch(tensors)
        outputs = fn(*tensors, activation=activation)
        loss = tf.reduce_sum(outputs * d_out)
    return [outputs.numpy()] + [g.numpy() for g in tape.gradient(loss, tensors)]


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("use_bias", [True, False])
def test_values_and_gradients_match_numpy(activation, use_bias):
    tf_activation, np_activation, derivative = ACTIVATIONS[activation]
    arrays = _arrays(use_bias)
    d_out = np.random.default_rng(1).standard_normal((N, C, O)).astype("float32")
    got = _values_and_gradients(stacked_feed_forward, arrays, d_out, tf_activation)
    x, w_in, w_out = arrays[:3]
    b_in, b_out = arrays[3:] if use_bias else (None, None)
    for e in range(N):
        bias = (b_in[e, 0], b_out[e, 0]) if use_bias else (None, None)
        want_y = ref.expert(x[e], w_in[e], bias[0], w_out[e], bias[1], np_activation)
        dx, dw_in, dw_out, db_in, db_out = ref.expert_gradients(
            x[e], w_in[e], bias[0], w_out[e], bias[1], d_out[e], np_activation, derivative
        )
        want = [want_y, dx, dw_in, dw_out] + ([db_in[None], db_out[None]] if use_bias else [])
        for name, g, w in zip(["y", "x", "kernel_in", "kernel_out", "bias_in", "bias_out"], got, want):
            np.testing.assert_allclose(g[e], w, rtol=1e-4, atol=1e-4, err_msg=f"{activation}: {name}")


@pytest.mark.parametrize("capacity", [C, 1, 0])
@pytest.mark.parametrize("use_bias", [True, False])
def test_gradients_equal_autodiff_of_the_plain_ops(capacity, use_bias):
    arrays = _arrays(use_bias, capacity, seed=2)
    d_out = np.random.default_rng(3).standard_normal((N, capacity, O)).astype("float32")
    for activation in (tf.nn.relu, tf.tanh):
        got = _values_and_gradients(stacked_feed_forward, arrays, d_out, activation)
        want = _values_and_gradients(_plain, arrays, d_out, activation)
        for g, w in zip(got, want):
            assert g.shape == w.shape
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("use_bias", [True, False])
def test_tokens_broadcast_to_every_expert_get_the_sum_of_their_gradients(use_bias):
    """[1, C, D] inputs (shared experts): the same values and gradients as the tokens copied to each expert."""
    arrays = _arrays(use_bias, seed=9)
    arrays[0] = arrays[0][:1]
    d_out = np.random.default_rng(10).standard_normal((N, C, O)).astype("float32")
    got = _values_and_gradients(stacked_feed_forward, arrays, d_out, tf.nn.relu)
    copied = [np.repeat(arrays[0], N, axis=0)] + arrays[1:]
    want = _values_and_gradients(_plain, copied, d_out, tf.nn.relu)
    want[1] = want[1].sum(axis=0, keepdims=True)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_xla_and_dynamic_capacity_give_the_same_gradients():
    arrays = [tf.constant(a) for a in _arrays(use_bias=True, seed=4)]
    d_out = tf.random.stateless_normal((N, C, O), seed=[0, 1])

    def step(*tensors):
        with tf.GradientTape() as tape:
            tape.watch(tensors)
            loss = tf.reduce_sum(stacked_feed_forward(*tensors, activation=tf.nn.gelu) * d_out)
        return tape.gradient(loss, tensors)

    eager = step(*arrays)
    compiled = tf.function(step, jit_compile=True)(*arrays)
    signature = [tf.TensorSpec((N, None, D))] + [tf.TensorSpec(a.shape) for a in arrays[1:]]
    dynamic = tf.function(step, input_signature=signature)(*arrays)
    for e, x, y in zip(eager, compiled, dynamic):
        np.testing.assert_allclose(x.numpy(), e.numpy(), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(y.numpy(), e.numpy(), rtol=1e-5, atol=1e-5)


def test_the_gradient_can_be_taken_twice():
    arrays = [tf.constant(a) for a in _arrays(use_bias=True, seed=5)]
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(arrays)
        loss = tf.reduce_sum(stacked_feed_forward(*arrays) ** 2)
    first, second = tape.gradient(loss, arrays), tape.gradient(loss, arrays)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


@pytest.mark.parametrize("policy, tolerance", [("mixed_float16", 1e-2), ("mixed_bfloat16", 5e-2)])
def test_layer_gradients_under_mixed_precision_follow_float32(policy, tolerance):
    x = np.random.default_rng(6).standard_normal((N, C, D)).astype("float32")
    results = {}
    try:
        for name in ("float32", policy):
            keras.mixed_precision.set_global_policy(name)
            experts = tf_moe.FeedForwardExperts(N, H, O, activation="tanh")
            experts.build((N, None, D))
            for variable, value in zip(experts.weights, _arrays(use_bias=True, seed=7)[1:]):
                variable.assign(value)
            with tf.GradientTape() as tape:
                outputs = experts(x)
                loss = tf.reduce_sum(tf.cast(outputs, tf.float32) ** 2)
            grads = tape.gradient(loss, experts.trainable_variables)
            assert outputs.dtype == keras.mixed_precision.global_policy().compute_dtype
            assert all(g.dtype == tf.float32 for g in grads)
            results[name] = [outputs.numpy().astype("float32")] + [g.numpy() for g in grads]
    finally:
        keras.mixed_precision.set_global_policy("float32")
    for want, got in zip(results["float32"], results[policy]):
        np.testing.assert_allclose(got, want, atol=tolerance * np.abs(want).max())


def test_one_bias_without_the_other_is_an_error():
    x, w_in, w_out, b_in, _ = (tf.constant(a) for a in _arrays(use_bias=True))
    with pytest.raises(ValueError, match="`bias_in` and `bias_out`"):
        stacked_feed_forward(x, w_in, w_out, bias_in=b_in)


def _padded(x, overflow_x, overflow_experts):
    """The one buffer `split_feed_forward` stands for: overflow rows at their experts, zeros elsewhere."""
    further = np.zeros((x.shape[0], overflow_x.shape[1], x.shape[2]), "float32")
    further[overflow_experts] = overflow_x
    return np.concatenate([x, further], axis=1)


@pytest.mark.parametrize("use_bias", [True, False])
@pytest.mark.parametrize(
    "activation", [tf.nn.relu, keras.activations.gelu, gated_activation(keras.activations.silu)],
    ids=["relu", "gelu", "swiglu"],
)
@pytest.mark.parametrize("first, overflow_experts", [(C, [0, 2]), (C, [1]), (0, [0, 1, 2]), (C, [])])
def test_split_feed_forward_equals_one_buffer_without_its_zero_rows(use_bias, activation, first, overflow_experts):
    """Values and gradients of every argument against `stacked_feed_forward` on the padded buffer."""
    rng = np.random.default_rng(8)
    further = 3 if overflow_experts else 0
    gated = activation not in (tf.nn.relu, keras.activations.gelu)
    x = rng.standard_normal((N, first, D)).astype("float32")
    overflow_x = rng.standard_normal((len(overflow_experts), further, D)).astype("float32")
    weights = [rng.standard_normal(s).astype("float32") for s in [(N, D, 2 * H if gated else H), (N, H, O)]]
    if use_bias:
        weights += [rng.standard_normal(s).astype("float32") for s in [(N, 1, 2 * H if gated else H), (N, 1, O)]]
    d_out = rng.standard_normal((N, first + further, O)).astype("float32")
    # Only real rows get output gradients, as `combine` gives them.
    rows = np.zeros((N, further), bool)
    rows[overflow_experts] = True
    d_out[:, first:][~rows] = 0
    ids = tf.constant(overflow_experts, tf.int32)

    def split(x, overflow_x, *weights):
        outputs, overflow_outputs = split_feed_forward(x, overflow_x, ids, *weights, activation=activation)
        return tf.reduce_sum(outputs * d_out[:, :first]) + tf.reduce_sum(
            overflow_outputs * tf.gather(d_out[:, first:], ids)
        ), (outputs, overflow_outputs)

    tensors = [tf.constant(a) for a in [x, overflow_x] + weights]
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(tensors)
        loss, (outputs, overflow_outputs) = split(*tensors)
    got = tape.gradient(loss, tensors)
    again = tape.gradient(loss, tensors)  # the gradient may be taken twice

    padded = tf.constant(_padded(x, overflow_x, overflow_experts))
    want_tensors = [padded] + tensors[2:]
    with tf.GradientTape() as tape:
        tape.watch(want_tensors)
        want_outputs = stacked_feed_forward(*want_tensors, activation=activation)
        want_loss = tf.reduce_sum(want_outputs * d_out)
    want = tape.gradient(want_loss, want_tensors)
    want_outputs, d_padded = want_outputs.numpy(), want[0].numpy()

    np.testing.assert_allclose(outputs, want_outputs[:, :first], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(overflow_outputs, want_outputs[overflow_experts, first:], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got[0], d_padded[:, :first], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got[1], d_padded[overflow_experts, first:], rtol=1e-5, atol=1e-5)
    for g, w, a in zip(got[2:], want[1:], again[2:]):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)
        np.testing.assert_array_equal(a, g)


def _ancestors(tensor):
    """Every op `tensor` waits for, through data and control edges."""
    seen, todo = set(), [tensor.op]
    while todo:
        op = todo.pop()
        if op not in seen:
            seen.add(op)
            todo += [t.op for t in op.inputs] + list(op.control_inputs)
    return seen


@pytest.mark.parametrize("gated", [False, True])
def test_bank_gradients_wait_for_every_read_of_the_bank(gated):
    """An update must find no read of the bank alive, or TensorFlow copies the whole bank first.

    An optimizer's update of a variable (`ResourceApply*`, `assign_sub`)
    copies the variable when a tensor read from it is still held by an op
    yet to run (copy-on-write): a copy of every expert's weights in each
    step. The update runs once the variable's gradient is ready, so every
    op that reads the bank (forward, input gradient, the split's gather)
    must be an ancestor of its gradient, on both dropless paths of the layer.
    """
    layer = tf_moe.MoELayer(4, 2, 16, gated=gated)
    layer.build((None, 8))
    bank = layer.experts.trainable_variables

    @tf.function
    def gradients(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(tf.square(layer(x, training=True)))
        return tape.gradient(loss, [x] + bank)

    for overflow_cost in (32.0, None):  # split buffers, one padded buffer
        layer.experts.overflow_cost = overflow_cost
        graph = gradients.get_concrete_function(tf.TensorSpec([None, 8])).graph
        captured = {id(external): internal for external, internal in graph.captures}
        for variable, gradient in zip(bank, graph.outputs[1:]):
            handle = captured[id(variable.handle)]
            reads = [op.outputs[0] for op in handle.consumers() if op.type == "ReadVariableOp"]
            readers = {op for read in reads for op in read.consumers()}
            assert readers, variable.path
            late = readers - _ancestors(gradient)
            assert not late, (variable.path, overflow_cost, sorted(op.name for op in late))


def test_a_training_step_updates_the_bank_in_place():
    """The update's effect: after each compiled SGD step every kernel keeps its buffer (no copy)."""

    def address(variable):
        view = variable.value.numpy()  # shares the variable's buffer on the CPU
        return view.__array_interface__["data"][0]

    layer = tf_moe.MoELayer(8, 2, 64)
    layer.build((None, 32))
    optimizer = keras.optimizers.SGD(0.1)
    optimizer.build(layer.trainable_variables)

    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_mean(tf.square(layer(x, training=True))) + tf.add_n(layer.losses)
        grads = tape.gradient(loss, [x] + layer.trainable_variables)
        optimizer.apply(grads[1:], layer.trainable_variables)
        return grads[0]

    x = tf.random.normal([256, 32], seed=0)
    step(x)  # traced; the first call may build state
    kernels = [layer.experts.kernel_in, layer.experts.kernel_out]
    for _ in range(10):
        before = [address(v) for v in kernels]
        step(x)
        assert [address(v) for v in kernels] == before
