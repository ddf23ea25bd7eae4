"""The fused optimizers train an MoE model as Keras's SGD, Adam and AdamW do, and save like them.

The reference is Keras's own optimizer on the same model, weights and
batches. SGD's fused kernels compute Keras's operations exactly; Adam's
round `1 - beta` in float32 where Keras rounds it from Python's double
(`1 - beta_2` differs by 1.3e-5 relative), so Adam is compared over a few
steps to about 1e-6.
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
from tf_moe.training import FusedAdam, FusedAdamW, FusedSGD, fused_optimizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

OPTIMIZERS = {
    "sgd": lambda: keras.optimizers.SGD(0.1),
    "momentum": lambda: keras.optimizers.SGD(0.1, momentum=0.9),
    "nesterov": lambda: keras.optimizers.SGD(0.1, momentum=0.9, nesterov=True),
    "adam": lambda: keras.optimizers.Adam(0.01),
    "amsgrad": lambda: keras.optimizers.Adam(0.01, amsgrad=True),
    "adamw": lambda: keras.optimizers.AdamW(0.01, weight_decay=0.1),
    # A schedule, clipping and EMA: Keras's machinery around the update stays Keras's.
    "adam_extras": lambda: keras.optimizers.Adam(
        keras.optimizers.schedules.ExponentialDecay(0.01, 2, 0.5), global_clipnorm=0.5, use_ema=True
    ),
}
EXACT = ("sgd", "momentum", "nesterov")


def _moe_model(optimizer, router="noisy_top_k"):
    """Dense -> MoELayer -> Dense, the same weights and router seed on every call."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6, 12))
    hidden = keras.layers.Dense(12, activation="tanh")(inputs)
    hidden = tf_moe.MoELayer(8, 2, 16, router=router, name="moe")(hidden)
    model = keras.Model(inputs, keras.layers.Dense(3)(hidden))
    model.compile(optimizer=optimizer, loss="mse")
    return model


def _data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(32, 6, 12)).astype("float32"), rng.normal(size=(32, 6, 3)).astype("float32")


def _assert_trained_alike(got, expected, exact):
    pairs = [(w.path, w.numpy(), r.numpy()) for w, r in zip(got.weights, expected.weights)]
    pairs += [(r.path, np.asarray(s), np.asarray(r)) for s, r in zip(got.optimizer.variables, expected.optimizer.variables)]
    assert len(got.optimizer.variables) == len(expected.optimizer.variables)
    for path, value, reference in pairs:
        if exact:
            np.testing.assert_array_equal(value, reference, err_msg=path)
        else:
            # Moments scale with the gradients: 1e-6 of each variable's scale.
            scale = max(1.0, float(np.abs(reference).max())) if "moe" in path or "dense" in path else 1.0
            np.testing.assert_allclose(value, reference, rtol=1e-5, atol=1e-6 * scale, err_msg=path)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_fused_optimizer_trains_an_moe_as_keras_does(name):
    x, y = _data()
    expected = _moe_model(OPTIMIZERS[name]())
    got = _moe_model(fused_optimizer(OPTIMIZERS[name]()))
    assert type(got.optimizer).__name__ == "Fused" + type(expected.optimizer).__name__
    expected_history = expected.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0).history
    got_history = got.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0).history
    np.testing.assert_allclose(got_history["loss"], expected_history["loss"], rtol=1e-6)
    _assert_trained_alike(got, expected, exact=name in EXACT)


def test_sparse_gradients_take_keras_update():
    """An embedding's gradient is a tf.IndexedSlices: Keras updates it (and the rest is fused)."""
    x = np.random.default_rng(1).integers(1, 30, (8, 5)).astype("int32")

    def lm(optimizer):
        keras.utils.set_random_seed(0)
        model = tf_moe.models.transformer_lm(
            vocab_size=30, units=8, num_layers=1, num_heads=2, num_experts=4, k=2, expert_hidden_units=8,
            dropout=0.0,
        )
        model.compile(optimizer=optimizer)
        model.fit(x[:, :-1], x[:, 1:], batch_size=4, epochs=2, shuffle=False, verbose=0)
        return model

    got, expected = lm(FusedSGD(0.5, momentum=0.5)), lm(keras.optimizers.SGD(0.5, momentum=0.5))
    _assert_trained_alike(got, expected, exact=True)
    assert not np.array_equal(got.get_layer("embedding").get_weights()[0], lm(FusedSGD(0.0)).get_weights()[0])


def test_fused_updates_compile_with_xla():
    """XLA lacks some fused kernels, so under jit_compile the update is Keras's, fused by XLA."""
    x, y = np.ones((8, 4), "float32"), np.zeros((8, 2), "float32")
    results = []
    for optimizer in (keras.optimizers.Adam(0.1, amsgrad=True), FusedAdam(0.1, amsgrad=True)):
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
        model.compile(optimizer, "mse", jit_compile=True)
        model.fit(x, y, batch_size=4, epochs=2, verbose=0)
        results.append(model.get_weights())
    for got, expected in zip(*results):
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize(
    "optimizer",
    [
        FusedSGD(0.2, momentum=0.5, nesterov=True, clipnorm=1.0),
        FusedAdam(keras.optimizers.schedules.ExponentialDecay(0.1, 10, 0.9), amsgrad=True, epsilon=1e-5),
        FusedAdamW(0.01, weight_decay=0.05, beta_2=0.99),
    ],
    ids=type,
)
def test_config_round_trip(optimizer):
    restored = type(optimizer).from_config(optimizer.get_config())
    assert restored.get_config() == optimizer.get_config()
    deserialized = keras.optimizers.deserialize(keras.optimizers.serialize(optimizer))
    assert type(deserialized) is type(optimizer)
    assert deserialized.get_config() == optimizer.get_config()


def test_fused_optimizer_copies_the_configuration():
    base = keras.optimizers.AdamW(0.003, weight_decay=0.02, beta_1=0.8, global_clipnorm=2.0, name="mine")
    fused = fused_optimizer(base)
    assert type(fused) is FusedAdamW
    assert fused.get_config() == base.get_config()
    assert fused_optimizer(fused) is fused


def test_loss_scale_optimizer_is_fused_inside():
    base = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.2, momentum=0.5), initial_scale=64.0)
    fused = fused_optimizer(base)
    assert isinstance(fused, keras.optimizers.LossScaleOptimizer)
    assert type(fused.inner_optimizer) is FusedSGD
    assert fused.inner_optimizer.get_config() == base.inner_optimizer.get_config()
    assert fused.initial_scale == 64.0


def test_bad_optimizers_are_refused_by_name():
    with pytest.raises(ValueError, match="`optimizer` must be one of keras.optimizers.SGD"):
        fused_optimizer(keras.optimizers.RMSprop())
    with pytest.raises(ValueError, match="`optimizer` must be one of"):
        fused_optimizer("adam")
    used = keras.optimizers.Adam()
    used.build([keras.Variable(np.zeros(2, "float32"))])
    with pytest.raises(ValueError, match="`optimizer` has already been used"):
        fused_optimizer(used)


def test_model_with_fused_optimizer_reloads_and_trains_on_in_a_fresh_process(tmp_path):
    x, y = _data()
    # A noise-free router: the continued training must not depend on the noise's seed state.
    model = _moe_model(FusedAdam(0.01), router="top_k")
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    path = str(tmp_path / "model.keras")
    model.save(path)
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    np.savez(tmp_path / "data.npz", x=x, y=y)
    np.savez(tmp_path / "trained.npz", *model.get_weights(), *[np.asarray(v) for v in model.optimizer.variables])
    script = textwrap.dedent(f'''
        import keras, numpy as np, tf_moe
        model = keras.models.load_model({path!r})
        assert type(model.optimizer) is tf_moe.training.FusedAdam, type(model.optimizer)
        data = np.load({str(tmp_path / "data.npz")!r})
        model.fit(data["x"], data["y"], batch_size=8, epochs=1, shuffle=False, verbose=0)
        trained = np.load({str(tmp_path / "trained.npz")!r})
        values = model.get_weights() + [np.asarray(v) for v in model.optimizer.variables]
        assert len(values) == len(trained.files)
        for i, value in enumerate(values):
            np.testing.assert_array_equal(value, trained[f"arr_{{i}}"])
        print("reloaded")
    ''')
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert "reloaded" in out.stdout, out.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["momentum", "adam"])
def test_expert_parallel_fused_optimizer_equals_single_device_training(name):
    """`expert_parallel_optimizer(fused_optimizer(...))`: shards take the fused update on their replica."""
    from tests.test_distribute_expert_parallel import _copy_weights, _data as ep_data, _model, _reference, _strategy
    from tf_moe.distribute import ExpertParallelMoE, expert_parallel_optimizer
    from tf_moe.distribute.expert_parallel import gather_shards

    x, y = ep_data(32)
    reference = _reference(None, OPTIMIZERS[name]())
    with _strategy(2).scope():
        optimizer = expert_parallel_optimizer(fused_optimizer(OPTIMIZERS[name]()))
        assert isinstance(optimizer, FusedAdam if name == "adam" else FusedSGD)
        model = _model(ExpertParallelMoE, None, optimizer)
        _copy_weights(reference, model)
    expected = reference.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0).history
    got = model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0).history
    np.testing.assert_allclose(got["loss"], expected["loss"], rtol=1e-4, atol=1e-6)
    for weight, ref_weight in zip(model.get_layer("moe").weights, reference.get_layer("moe").weights):
        np.testing.assert_allclose(gather_shards(weight), ref_weight.numpy(), rtol=1e-4, atol=1e-6, err_msg=ref_weight.path)
    for slot, ref_slot in zip(model.optimizer.variables, reference.optimizer.variables):
        np.testing.assert_allclose(gather_shards(slot), np.asarray(ref_slot), rtol=1e-4, atol=1e-6, err_msg=ref_slot.path)


def test_fused_kernels_run_inside_a_strategy_update():
    """Under MirroredStrategy every replica's copy of a variable and of its slots gets the update."""
    from tests.test_distribute_expert_parallel import _strategy

    strategy = _strategy(2)
    with strategy.scope():
        variable = keras.Variable(np.ones(3, "float32"))
        optimizer = FusedSGD(0.5, momentum=0.5)
        optimizer.build([variable])

    @tf.function
    def step():
        def replica_fn():
            optimizer.apply([tf.constant([1.0, 2.0, 3.0])], [variable])

        strategy.run(replica_fn)

    step()
    step()
    # Gradients summed over 2 replicas: 2g. m1 = -0.5*2g, w1 = 1 + m1; m2 = 0.5*m1 - 0.5*2g, w2 = w1 + m2.
    g = 2 * np.array([1.0, 2.0, 3.0])
    m1 = -0.5 * g
    m2 = 0.5 * m1 - 0.5 * g
    for replica_value in strategy.experimental_local_results(variable.value):
        np.testing.assert_allclose(replica_value.numpy(), 1 + m1 + m2, rtol=1e-6)


@pytest.mark.parametrize(
    "optimizer, kernel",
    [
        (FusedSGD(0.1), "ResourceApplyGradientDescent"),
        (FusedSGD(0.1, momentum=0.9), "ResourceApplyKerasMomentum"),
        (FusedAdam(), "ResourceApplyAdam"),
        (FusedAdam(amsgrad=True), "ResourceApplyAdamWithAmsgrad"),
        (FusedAdamW(weight_decay=0.1), "ResourceApplyAdam"),
    ],
    ids=lambda value: value if isinstance(value, str) else type(value).__name__,
)
def test_dense_updates_are_one_fused_kernel(optimizer, kernel):
    variable = keras.Variable(np.ones((2, 3), "float32"))
    optimizer.build([variable])
    step = tf.function(lambda gradient: optimizer.apply([gradient], [variable]))
    graph = step.get_concrete_function(tf.TensorSpec((2, 3))).graph
    kinds = [op.type for op in graph.get_operations()]
    assert kinds.count(kernel) == 1
    # Keras's updates assign to the variable and slots with these; the one
    # AssignVariableOp left counts the iterations, AdamW's decay is Keras's.
    assert "AssignAddVariableOp" not in kinds
    assert kinds.count("AssignSubVariableOp") == int(isinstance(optimizer, FusedAdamW))
    assert kinds.count("AssignVariableOp") == 1
