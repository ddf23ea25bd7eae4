"""Expert parallelism (Shazeer et al. 2017, section 3.1) on logical CPU devices.

References are the single-device `MoELayer` with the same weights on the
same global batch: sharding the experts over replicas must not change the
maths, whatever the router.
"""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_moe
from tests.layer_test_case import randomise_weights, run_layer_test
from tf_moe.distribute import ExpertParallelMoE, expert_parallel_optimizer, get_strategy
from tf_moe.distribute.exchange import Traffic, TrafficRecorder
from tf_moe.distribute.expert_parallel import _ShardedExperts, gather_shards

D, N = 6, 4


def _strategy(replicas):
    devices = [d.name for d in tf.config.list_logical_devices("CPU")[:replicas]]
    return get_strategy("mirrored", devices=devices)


def _router(kind="noisy_top_k"):
    """A noise-free router of each kind over the N experts."""
    return {
        "noisy_top_k": lambda: tf_moe.NoisyTopKRouter(N, 2, noisy=False),
        "softmax": lambda: tf_moe.SoftmaxRouter(N),
        "batchwise": lambda: tf_moe.BatchwiseRouter(N, 2),
        "hierarchical": lambda: tf_moe.HierarchicalRouter(2, N // 2, 1, 2, noisy=False),
    }[kind]()


def _model(layer_cls, capacity_factor=None, optimizer=None, router="noisy_top_k"):
    keras.utils.set_random_seed(1)
    inputs = keras.Input((3, D))
    outputs = layer_cls(
        hidden_units=8, router=_router(router), capacity_factor=capacity_factor, name="moe",
    )(inputs)
    model = keras.Model(inputs, outputs)
    if optimizer is not None:
        model.compile(optimizer, "mse")
    return model


def _copy_weights(source, target):
    """MoE weights into an (expert-parallel) MoE of any replica count."""
    src, dst = source.get_layer("moe"), target.get_layer("moe")
    dst.gate.set_weights(src.gate.get_weights())
    dst.experts.load_own_variables({str(i): gather_shards(w) for i, w in enumerate(src.experts.weights)})


def _reference(capacity_factor=None, optimizer=None, router="noisy_top_k"):
    model = _model(tf_moe.MoELayer, capacity_factor, optimizer, router)
    # A random router, so tokens really spread over experts on all replicas.
    randomise_weights(model.get_layer("moe").router, seed=0, scale=1.0)
    return model


def _data(batch=16):
    rng = np.random.default_rng(3)
    return rng.standard_normal((batch, 3, D)).astype("float32"), rng.standard_normal((batch, 3, D)).astype("float32")


def test_layer_citizenship_on_one_replica():
    run_layer_test(
        ExpertParallelMoE,
        dict(num_experts=4, k=2, hidden_units=8, output_units=5),
        input_shape=(3, 5, 10),
        expected_output_shape=(3, 5, 5),
    )


@pytest.mark.parametrize(
    "router",
    # The default run takes the hierarchical router (about a minute on two
    # cores); the noisy top-k router is also covered on 2 replicas above.
    ["hierarchical"] + [pytest.param(r, marks=pytest.mark.slow) for r in ("noisy_top_k", "softmax", "batchwise")],
)
def test_every_router_on_four_replicas_equals_the_single_device_layer(router):
    """Inference outputs and balance, and (where the routing of a replica's
    batch is that of the global batch) two training epochs."""
    x, y = _data()
    reference = _reference(None, keras.optimizers.SGD(0.1), router)
    with _strategy(4).scope():
        model = _model(ExpertParallelMoE, None, expert_parallel_optimizer(keras.optimizers.SGD(0.1)), router)
        _copy_weights(reference, model)
    assert model.get_layer("moe").experts.num_experts == 1
    np.testing.assert_allclose(
        model.predict(x, batch_size=len(x), verbose=0), reference.predict(x, batch_size=len(x), verbose=0),
        rtol=1e-5, atol=1e-6,
    )
    if router == "batchwise":
        return  # each replica ranks its own batch while training
    expected = reference.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0).history
    got = model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0).history
    for key in ("loss", "moe_aux_loss", "moe_cv_importance", "moe_cv_load"):
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-4, atol=1e-6, err_msg=key)
    for ref_weight, weight in zip(reference.get_layer("moe").weights, model.get_layer("moe").weights):
        np.testing.assert_allclose(gather_shards(weight), ref_weight.numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "replicas, capacity_factor", [(2, None), pytest.param(4, 1.0, marks=pytest.mark.slow)]
)
def test_outputs_equal_single_device_moe(replicas, capacity_factor):
    x, _ = _data()
    reference = _reference(capacity_factor)
    with _strategy(replicas).scope():
        model = _model(ExpertParallelMoE, capacity_factor)
        _copy_weights(reference, model)
    experts = model.get_layer("moe").experts
    assert experts.num_experts == N // replicas  # each replica holds its shard only
    # capacity_factor=1.0 drops tokens; the per-replica capacity is then
    # that of the replica's batch, as for a single device on that batch.
    per_replica = len(x) // replicas if capacity_factor else len(x)
    expected = np.concatenate(
        [reference.predict(part, batch_size=per_replica, verbose=0) for part in np.split(x, len(x) // per_replica)]
    )
    got = model.predict(x, batch_size=len(x), verbose=0)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("exchange", ["all_to_all", "all_gather"])
@pytest.mark.parametrize("replicas", [2, 4])
def test_exchange_runs_every_replica_buffer_through_its_expert(replicas, exchange):
    """Slots of every replica reach the replica holding their expert and come back."""
    strategy = _strategy(replicas)
    with strategy.scope():
        experts = _ShardedExperts(N // replicas, hidden_units=8, output_units=5, name="experts")
        experts.exchange = exchange
        experts.build((N // replicas, None, D))
    w_in, w_out, b_in, b_out = (gather_shards(w) for w in experts.weights)
    buffers = np.random.default_rng(5).standard_normal((replicas, N, 3, D)).astype("float32")
    per_replica = strategy.experimental_distribute_values_from_function(
        lambda context: tf.constant(buffers[context.replica_id_in_sync_group])
    )
    outputs = strategy.experimental_local_results(strategy.run(tf.function(experts), args=(per_replica,)))
    for replica, got in enumerate(outputs):
        hidden = np.maximum(np.einsum("ncd,ndh->nch", buffers[replica], w_in) + b_in, 0)
        expected = np.einsum("nch,nho->nco", hidden, w_out) + b_out
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("capacity_factor", [2.0, pytest.param(None, marks=pytest.mark.slow)])
def test_training_matches_single_device(capacity_factor):
    """Adam on 2 replicas = one device on the same global batch (no drops)."""
    x, y = _data(32)
    reference = _reference(capacity_factor, keras.optimizers.Adam(0.05))
    with _strategy(2).scope():
        model = _model(ExpertParallelMoE, capacity_factor, expert_parallel_optimizer(keras.optimizers.Adam(0.05)))
        _copy_weights(reference, model)
    expected = reference.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0).history
    got = model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0).history
    for key in ("loss", "moe_aux_loss", "moe_cv_importance", "moe_cv_load", "moe_dropped_fraction"):
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(
        model.evaluate(x, y, verbose=0), reference.evaluate(x, y, verbose=0), rtol=1e-4, atol=1e-6
    )
    ref_layer, layer = reference.get_layer("moe"), model.get_layer("moe")
    for ref_weight, weight in zip(ref_layer.weights, layer.weights):
        np.testing.assert_allclose(gather_shards(weight), ref_weight.numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("replicas", [1, pytest.param(4, marks=pytest.mark.slow)])
def test_checkpoint_restores_onto_other_replica_counts(tmp_path, replicas):
    """Saved from 2 replicas, restored onto 1 or 4: same outputs and Adam state."""
    x, y = _data()
    with _strategy(2).scope():
        model = _model(ExpertParallelMoE, None, expert_parallel_optimizer(keras.optimizers.Adam(0.05)))
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)  # shards and Adam slots now differ
    path = str(tmp_path / "ep.weights.h5")
    model.save_weights(path)
    expected = model.predict(x, batch_size=16, verbose=0)
    with _strategy(replicas).scope():
        restored = _model(ExpertParallelMoE, None, expert_parallel_optimizer(keras.optimizers.Adam(0.05)))
        restored.optimizer.build(restored.trainable_variables)
        restored.load_weights(path)
    assert restored.get_layer("moe").experts.num_experts == N // replicas
    np.testing.assert_allclose(restored.predict(x, batch_size=16, verbose=0), expected, rtol=1e-5, atol=1e-6)
    for saved, loaded in zip(model.optimizer.variables, restored.optimizer.variables):
        np.testing.assert_allclose(gather_shards(loaded), gather_shards(saved), rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_plain_optimizer_stops_fit_before_mixing_shards():
    """Keras would sum gradients over replicas, wrong for shards of different experts: `fit` stops first."""
    x, y = _data(32)
    with _strategy(2).scope():
        model = _model(ExpertParallelMoE, None, keras.optimizers.SGD(0.5))
    kernel = model.get_layer("moe").experts.kernel_in
    before = gather_shards(kernel)
    with pytest.raises(ValueError, match="expert_parallel_optimizer"):
        model.fit(x, y, batch_size=32, epochs=1, verbose=0)
    np.testing.assert_array_equal(gather_shards(kernel), before)


def _run_on_halves(strategy, layer, x, mask=None, eagerly=False):
    """`layer` on each replica's half of `x` (and `mask`); the outputs per replica, as float32."""
    halves = {"inputs": np.split(x, strategy.num_replicas_in_sync)}
    if mask is not None:
        halves["mask"] = np.split(mask, strategy.num_replicas_in_sync)
    per_replica = {
        key: strategy.experimental_distribute_values_from_function(
            lambda context, parts=parts: tf.constant(parts[context.replica_id_in_sync_group])
        )
        for key, parts in halves.items()
    }
    outputs = strategy.run(layer if eagerly else tf.function(layer), kwargs=per_replica)
    return [tf.cast(y, tf.float32).numpy() for y in strategy.experimental_local_results(outputs)]


def test_dropless_buffers_of_different_sizes_run_eagerly():
    """Found by the property suite: run eagerly (`strategy.run` without a
    tf.function) each replica's dropless buffer had a known shape of its own,
    so the all-gather saw different shapes and aborted every later collective."""
    x, _ = _data()
    mask = np.ones(x.shape[:-1], bool)
    mask[: len(x) // 2] = False  # replica 0 routes nothing, replica 1 everything
    reference = tf_moe.MoELayer(hidden_units=8, router=_router())
    reference.build((None, 3, D))
    randomise_weights(reference, seed=0, scale=1.0)
    strategy = _strategy(2)
    with strategy.scope():
        layer = ExpertParallelMoE(hidden_units=8, router=_router())
        layer.build((None, 3, D))
        layer.router.set_weights(reference.router.get_weights())
        layer.experts.load_own_variables({str(i): w.numpy() for i, w in enumerate(reference.experts.weights)})
    outputs = _run_on_halves(strategy, layer, x, mask, eagerly=True)
    for half, half_mask, got in zip(np.split(x, 2), np.split(mask, 2), outputs):
        np.testing.assert_allclose(got, reference(half, mask=half_mask).numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("exchange", ["all_to_all", "all_gather"])
@pytest.mark.parametrize("capacity_factor", [None, 0.5])
def test_an_empty_batch_on_every_replica_gives_empty_outputs(capacity_factor, exchange):
    """Found by the property suite (a process crash): the exchange all-gathered
    empty buffers, and TensorFlow's collective gather segfaults on those."""
    strategy = _strategy(2)
    with strategy.scope():
        layer = ExpertParallelMoE(
            hidden_units=8, router=_router(), capacity_factor=capacity_factor, exchange=exchange
        )
        layer.build((None, 3, D))
    outputs = _run_on_halves(strategy, layer, np.zeros((0, 3, D), "float32"))
    assert [y.shape for y in outputs] == [(0, 3, D)] * 2


@pytest.mark.parametrize("exchange", ["all_to_all", "all_gather"])
def test_mixed_bfloat16_equals_the_single_device_layer(exchange):
    """Found by the property suite: the collective gather has no bfloat16
    kernel (a TypeError inside TensorFlow under `mixed_bfloat16`)."""
    x, _ = _data()
    reference = tf_moe.MoELayer(hidden_units=8, router=_router(), dtype="mixed_bfloat16")
    reference.build((None, 3, D))
    randomise_weights(reference, seed=0, scale=1.0)
    strategy = _strategy(2)
    with strategy.scope():
        layer = ExpertParallelMoE(hidden_units=8, router=_router(), dtype="mixed_bfloat16", exchange=exchange)
        layer.build((None, 3, D))
        layer.router.set_weights(reference.router.get_weights())
        layer.experts.load_own_variables({str(i): w.numpy() for i, w in enumerate(reference.experts.weights)})
    for half, got in zip(np.split(x, 2), _run_on_halves(strategy, layer, x)):
        want = tf.cast(reference(half), tf.float32).numpy()
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-2 * np.abs(want).max())


def test_exchange_argument_is_checked_and_saved():
    with pytest.raises(ValueError, match="`exchange` must be one of"):
        ExpertParallelMoE(num_experts=4, k=2, hidden_units=8, exchange="ring")
    layer = ExpertParallelMoE(num_experts=4, k=2, hidden_units=8, exchange="all_gather")
    assert ExpertParallelMoE.from_config(layer.get_config()).exchange == "all_gather"


def test_num_experts_must_divide_over_replicas():
    with _strategy(4).scope():
        layer = ExpertParallelMoE(num_experts=6, k=2, hidden_units=8)
        with pytest.raises(ValueError, match="num_experts"):
            layer.build((None, D))


def test_call_outside_replica_context_is_an_error():
    x, _ = _data()
    with _strategy(2).scope():
        model = _model(ExpertParallelMoE)
        with pytest.raises(RuntimeError, match="replica context"):
            model(x)


def test_expert_parallel_optimizer_keeps_config():
    base = keras.optimizers.Adam(0.003, beta_1=0.8)
    wrapped = expert_parallel_optimizer(base)
    assert isinstance(wrapped, keras.optimizers.Adam) and type(wrapped).__name__ == "ExpertParallelAdam"
    assert wrapped.get_config() == base.get_config()
    assert expert_parallel_optimizer(wrapped) is wrapped
    with pytest.raises(TypeError, match="optimizer"):
        expert_parallel_optimizer("adam")


def _new_router(kind):
    return {
        "switch": lambda: tf_moe.SwitchRouter(N, balance_weight=0.5, jitter_epsilon=0.0, z_loss_weight=0.1),
        "expert_choice": lambda: tf_moe.ExpertChoiceRouter(N, capacity_factor=1.0),
        "loss_free": lambda: tf_moe.LossFreeRouter(N, 2, bias_update_rate=0.01, balance_weight=0.1),
        "hash": lambda: tf_moe.HashRouter(N, seed=1),
        "top_k": lambda: tf_moe.TopKRouter(N, 2, z_loss_weight=0.1),
    }[kind]()


def _id_model(layer_cls, kind, optimizer=None):
    """A model of (x, token ids) -> MoE(x), the ids reaching routers that need them."""
    keras.utils.set_random_seed(1)
    inputs = keras.Input((3, D))
    ids = keras.Input((3,), dtype="int32")
    moe = layer_cls(hidden_units=8, router=_new_router(kind), num_shared_experts=1, name="moe")
    outputs = moe(inputs, **({"token_ids": ids} if moe.router.required_inputs else {}))
    model = keras.Model([inputs, ids], outputs)
    if optimizer is not None:
        model.compile(optimizer, "mse")
    return model


@pytest.mark.parametrize(
    "kind",
    # The default run takes the loss-free router (its bias state is the
    # subtle part); each takes 15-30 s on two cores.
    ["loss_free"] + [pytest.param(k, marks=pytest.mark.slow) for k in ("hash", "switch", "expert_choice", "top_k")],
)
def test_new_routers_on_two_replicas_equal_the_single_device_layer(kind):
    """Inference outputs; and two epochs of training (its losses, weights and,
    for the loss-free router, its biases, updated once per step from the
    global batch) where the routing of a replica's batch is that of the
    global batch, i.e. all but expert choice."""
    x, y = _data()
    ids = np.random.default_rng(4).integers(0, 500, (len(x), 3)).astype("int32")
    reference = _id_model(tf_moe.MoELayer, kind, keras.optimizers.SGD(0.1))
    layer = reference.get_layer("moe")
    randomise_weights(layer.router, seed=0, scale=1.0)
    with _strategy(2).scope():
        model = _id_model(ExpertParallelMoE, kind, expert_parallel_optimizer(keras.optimizers.SGD(0.1)))
        target = model.get_layer("moe")
        target.router.set_weights(layer.router.get_weights())
        target.shared_experts.set_weights(layer.shared_experts.get_weights())
        target.experts.load_own_variables({str(i): gather_shards(w) for i, w in enumerate(layer.experts.weights)})
    got = model.predict([x, ids], batch_size=len(x), verbose=0)
    if kind == "expert_choice":
        # Each replica's experts choose among that replica's half of the batch.
        halves = [reference.predict([xs, i], batch_size=len(xs), verbose=0)
                  for xs, i in zip(np.split(x, 2), np.split(ids, 2))]
        np.testing.assert_allclose(got, np.concatenate(halves), rtol=1e-5, atol=1e-6)
        return
    np.testing.assert_allclose(got, reference.predict([x, ids], batch_size=len(x), verbose=0), rtol=1e-5, atol=1e-6)
    expected = reference.fit([x, ids], y, batch_size=16, epochs=2, shuffle=False, verbose=0).history
    history = model.fit([x, ids], y, batch_size=16, epochs=2, shuffle=False, verbose=0).history
    for key in ("loss", "moe_aux_loss", "moe_cv_importance", "moe_cv_load"):
        np.testing.assert_allclose(history[key], expected[key], rtol=1e-4, atol=1e-6, err_msg=key)
    for ref_weight, weight in zip(layer.weights, target.weights):
        np.testing.assert_allclose(gather_shards(weight), ref_weight.numpy(), rtol=1e-4, atol=1e-5, err_msg=weight.path)


def test_the_layers_traffic_recorder_sees_both_exchanges_of_every_replica():
    x, _ = _data()
    strategy = _strategy(2)
    with strategy.scope():
        layer = ExpertParallelMoE(hidden_units=8, router=_router(), capacity_factor=2.0, exchange="all_to_all")
        layer.traffic = traffic = TrafficRecorder()  # before the build: handed to the experts
        layer.build((None, 3, D))
    _run_on_halves(strategy, layer, x)
    # Per replica: its buffer [2 replicas, 2 experts, capacity 6, D] out, the outputs back.
    capacity = math.ceil(2.0 * 2 * 8 * 3 / N)
    sent = 2 * (N // 2) * capacity * D * 4 // 2  # half the rows leave the replica
    assert sorted(traffic, key=lambda t: t.replica) == [Traffic("all_to_all", r, "forward", sent)
                                                         for r in (0, 0, 1, 1)]
    layer.traffic = None  # after the build too
    assert layer.experts.traffic is None


def test_each_replica_keeps_its_own_last_routing():
    x, _ = _data()
    mask = np.ones(x.shape[:-1], bool)
    mask[: len(x) // 2] = False  # replica 0 routes nothing, replica 1 everything
    strategy = _strategy(2)
    with strategy.scope():
        layer = ExpertParallelMoE(hidden_units=8, router=_router())
        layer.build((None, 3, D))
    halves = [tf.constant(part) for part in np.split(x, 2)]
    masks = [tf.constant(part) for part in np.split(mask, 2)]

    def loads(context_inputs, context_mask):
        layer(context_inputs, mask=context_mask)
        return tf.reduce_sum(layer.last_routing.load)

    per_replica = [strategy.experimental_distribute_values_from_function(lambda c, p=p: p[c.replica_id_in_sync_group])
                   for p in (halves, masks)]
    totals = strategy.experimental_local_results(strategy.run(loads, args=per_replica))
    assert [float(t) for t in totals] == [0.0, 8 * 3 * 2]  # k = 2 choices of every token of replica 1
