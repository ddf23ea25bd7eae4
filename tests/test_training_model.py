"""Tests of MoEModel's train/test steps: reported losses, masking, distribution."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_moe import MoE
from tf_moe.models import seq2seq
from tf_moe.training import MoEModel, Perplexity, masked_token_cross_entropy

VOCAB = 30


def _tiny_model(noisy=True, seed=0):
    keras.utils.set_random_seed(seed)
    tokens = keras.Input((None,), dtype="int32")
    x = keras.layers.Embedding(VOCAB, 8, mask_zero=True)(tokens)
    x = MoE(4, 2, 16, noisy_gating=noisy, name="moe")(x)
    logits = keras.layers.Dense(VOCAB, dtype="float32", name="logits")(x)
    return MoEModel(tokens, logits)


def _data(seed=0, batch=8, length=6):
    rng = np.random.default_rng(seed)
    x = rng.integers(1, VOCAB, (batch, length)).astype("int32")
    y = rng.integers(1, VOCAB, (batch, length)).astype("int32")
    y[::2, 4:] = 0
    x[::2, 5:] = 0
    return x, y


def _numpy_masked_nll(logits, targets):
    logits = np.asarray(logits, np.float64)
    m = logits.max(-1, keepdims=True)
    log_probs = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
    nll = -np.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
    real = targets != 0
    return nll[real].mean()


def test_masked_token_cross_entropy_against_numpy():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((3, 5, VOCAB)).astype("float32")
    _, targets = _data(1, batch=3, length=5)
    loss, tokens = masked_token_cross_entropy(targets, logits)
    np.testing.assert_allclose(float(loss), _numpy_masked_nll(logits, targets), rtol=1e-5)
    assert float(tokens) == np.sum(targets != 0)


def test_perplexity_is_exp_of_the_token_weighted_mean():
    metric = Perplexity()
    metric.update_state(1.0, sample_weight=3.0)
    metric.update_state(2.0, sample_weight=1.0)
    np.testing.assert_allclose(float(metric.result()), np.exp(1.25), rtol=1e-6)


def test_evaluate_reports_masked_task_loss_and_perplexity():
    model = _tiny_model()
    model.compile(optimizer="adam")
    x, y = _data()
    logs = model.evaluate(x, y, batch_size=len(x), verbose=0, return_dict=True)
    expected = _numpy_masked_nll(model.predict(x, verbose=0), y)
    np.testing.assert_allclose(logs["task_loss"], expected, rtol=1e-5)
    np.testing.assert_allclose(logs["perplexity"], np.exp(expected), rtol=1e-5)
    # Layers add no loss at inference.
    assert logs["aux_loss"] == 0.0 and logs["loss"] == pytest.approx(logs["task_loss"])


def test_train_step_reports_task_aux_and_total_losses_apart():
    model = seq2seq(vocab_size=VOCAB, units=8, num_experts=4, k=2, expert_hidden_units=16, attention_heads=2)
    # A zero learning rate keeps the weights, so metrics are of one state.
    model.compile(optimizer=keras.optimizers.SGD(0.0))
    rng = np.random.default_rng(0)
    source = rng.integers(1, VOCAB, (8, 5)).astype("int32")
    decoder_input, targets = _data(2, batch=8, length=6)
    logs = model.fit((source, decoder_input), targets, batch_size=8, epochs=1, verbose=0).history
    logs = {key: value[0] for key, value in logs.items()}
    # The aux loss is the sum of the two MoE layers' balancing losses.
    np.testing.assert_allclose(
        logs["aux_loss"], logs["encoder_moe_aux_loss"] + logs["decoder_moe_aux_loss"], rtol=1e-5
    )
    assert logs["aux_loss"] > 0
    np.testing.assert_allclose(logs["loss"], logs["task_loss"] + logs["aux_loss"], rtol=1e-5)
    np.testing.assert_allclose(logs["perplexity"], np.exp(logs["task_loss"]), rtol=1e-5)
    for name in ("cv_importance", "cv_load", "max_over_mean_load", "dropped_fraction"):
        assert f"encoder_moe_{name}" in logs and f"decoder_moe_{name}" in logs


def test_training_lowers_the_loss():
    model = _tiny_model()
    model.compile(optimizer=keras.optimizers.Adam(0.05))
    x, y = _data()
    history = model.fit(x, y, batch_size=8, epochs=15, verbose=0).history
    assert history["task_loss"][-1] < 0.5 * history["task_loss"][0]


def test_padding_targets_do_not_count():
    model = _tiny_model()
    model.compile(optimizer="adam")
    x, y = _data()
    logs = model.evaluate(x, y, batch_size=8, verbose=0, return_dict=True)
    # Padding more target positions of a padded row leaves the loss of the rest.
    y_more, keep = y.copy(), y != 0
    y_more[0, :2] = 0
    keep[0, :2] = False
    logits = model.predict(x, verbose=0)
    expected = _numpy_masked_nll(logits[keep][None], y[keep][None])
    logs_more = model.evaluate(x, y_more, batch_size=8, verbose=0, return_dict=True)
    np.testing.assert_allclose(logs_more["task_loss"], expected, rtol=1e-5)
    assert logs_more["task_loss"] != pytest.approx(logs["task_loss"])


def test_compiled_loss_and_missing_targets_are_rejected():
    model = _tiny_model()
    model.compile(optimizer="adam", loss="mse")
    x, y = _data()
    with pytest.raises(ValueError, match="without `loss`"):
        model.fit(x, y, verbose=0)
    model.compile(optimizer="adam")
    with pytest.raises(ValueError, match="targets"):
        model.fit(x, verbose=0)


def test_one_step_under_mirrored_strategy_equals_one_device():
    # Equal token counts per replica, noise-free gates: the replicas' mean of
    # means is the global mean, so both runs must take the same step.
    rng = np.random.default_rng(3)
    x = rng.integers(1, VOCAB, (8, 5)).astype("int32")
    y = rng.integers(1, VOCAB, (8, 5)).astype("int32")

    def one_step(strategy):
        with strategy.scope():
            model = _tiny_model(noisy=False, seed=7)
            model.compile(optimizer=keras.optimizers.SGD(0.5))
        logs = model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0).history
        return [np.asarray(w) for w in model.weights], logs

    devices = [d.name for d in tf.config.list_logical_devices("CPU")[:2]]
    weights_one, logs_one = one_step(tf.distribute.OneDeviceStrategy(devices[0]))
    weights_two, logs_two = one_step(tf.distribute.MirroredStrategy(devices))
    for a, b in zip(weights_one, weights_two):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    for key in ("task_loss", "aux_loss", "perplexity", "moe_cv_load"):
        np.testing.assert_allclose(logs_two[key], logs_one[key], rtol=1e-4, atol=1e-6)


def test_config_keeps_pad_id():
    model = _tiny_model()
    model.pad_id = 3
    assert MoEModel.from_config(model.get_config()).pad_id == 3


class CountingModel(MoEModel):
    """Counts the traces of its train step."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.traces = 0

    def train_step(self, data):
        self.traces += 1
        return super().train_step(data)


class KerasBuildModel(CountingModel):
    """Keras's own order: the optimizer built inside the first trace."""

    make_train_function = keras.Model.make_train_function


def test_the_train_step_is_traced_once_and_trains_as_before():
    """The optimizer is built before the first trace, so no retrace for its variables."""
    x, y = _data()
    models = []
    for cls in (CountingModel, KerasBuildModel):
        model = _tiny_model(noisy=False)
        model = cls(model.inputs, model.outputs, name=cls.__name__.lower())
        model.compile(optimizer=keras.optimizers.Adam(0.05))
        model.fit(x, y, batch_size=4, epochs=2, shuffle=False, verbose=0)
        models.append(model)
    ours, keras_order = models
    assert (ours.traces, keras_order.traces) == (1, 2)
    for got, expected in zip(ours.weights + ours.optimizer.variables,
                             keras_order.weights + keras_order.optimizer.variables):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))
