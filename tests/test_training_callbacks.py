"""Tests of the training callbacks: expert-load histograms, crash-safe resume."""

import glob
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_moe.models import lstm_lm
from tf_moe.training import TrainingSummaries, default_callbacks, expert_loads

VOCAB = 30
SIZES = dict(vocab_size=VOCAB, units=8, num_experts=4, k=2, expert_hidden_units=16, dropout=0.0, seed=0)


def _data(seed=0, batch=16, length=6):
    rng = np.random.default_rng(seed)
    x = rng.integers(1, VOCAB, (batch, length)).astype("int32")
    x[::3, 4:] = 0
    return x, np.roll(x, -1, axis=1)


def test_expert_loads_count_the_gates_top_k():
    model = lstm_lm(**SIZES)
    moe = model.get_layer("moe")
    rng = np.random.default_rng(1)
    moe.gate.w_gate.assign(rng.standard_normal(moe.gate.w_gate.shape).astype("float32"))
    x, _ = _data()
    loads = expert_loads(model, x)
    # Independent count: top-2 of x_moe @ W_g over the real tokens.
    moe_inputs = keras.Model(model.input, model.get_layer("lstm_1_residual").output)(x)
    logits = np.asarray(moe_inputs).reshape(-1, 8) @ np.asarray(moe.gate.w_gate)
    top = np.argsort(-logits, axis=-1)[:, :2][(x != 0).reshape(-1)]
    counts = np.bincount(top.reshape(-1), minlength=4)
    np.testing.assert_allclose(np.asarray(loads["moe"]), counts / counts.sum(), rtol=1e-6)


def _events(log_dir):
    tags = set()
    for path in glob.glob(os.path.join(log_dir, "**", "events.out.tfevents.*"), recursive=True):
        for event in tf.compat.v1.train.summary_iterator(path):
            tags.update(value.tag for value in event.summary.value)
    return tags


def test_histograms_are_written_per_moe_layer(tmp_path):
    model = lstm_lm(**SIZES, router="noisy_top_k")  # a router with diagnostics to log
    model.compile(optimizer="adam")
    x, y = _data()
    callbacks = default_callbacks(str(tmp_path), probe_inputs=x[:8])
    assert any(isinstance(c, TrainingSummaries) for c in callbacks)
    model.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=callbacks, validation_data=(x, y))
    tags = _events(os.path.join(tmp_path, "logs"))
    assert {"moe/expert_load", "epoch_moe_cv_load", "epoch_perplexity", "epoch_learning_rate"} <= tags
    # The router's diagnostics, for the training and the validation routing.
    for split in ("train", "validation"):
        tags = _events(os.path.join(tmp_path, "logs", split))
        assert {"epoch_moe_topk_agreement", "epoch_moe_noise_to_signal"} <= tags
    assert _last_tensor(os.path.join(tmp_path, "logs", "validation"), "epoch_moe_topk_agreement") == 1.0
    histogram = _last_tensor(os.path.join(tmp_path, "logs", "experts"), "moe/expert_load")
    # One bucket per expert, [i, i + 1), holding the probe batch's load.
    np.testing.assert_array_equal(histogram[:, 0], np.arange(4))
    np.testing.assert_allclose(histogram[:, 2], np.asarray(expert_loads(model, x[:8])["moe"]), rtol=1e-6)
    # Training completed, so the crash backup is gone.
    assert os.path.exists(os.path.join(tmp_path, "logs")) and not os.path.exists(os.path.join(tmp_path, "backup"))


def _last_tensor(log_dir, tag):
    found = None
    for path in sorted(glob.glob(os.path.join(log_dir, "events.out.tfevents.*"))):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                if value.tag == tag:
                    found = tf.make_ndarray(value.tensor)
    return found


class _Crash(keras.callbacks.Callback):
    def __init__(self, at_epoch):
        super().__init__()
        self.at_epoch = at_epoch

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.at_epoch:
            raise RuntimeError("simulated crash")


class _Recorder(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.epochs, self.weights_at_start = [], {}

    def on_epoch_begin(self, epoch, logs=None):
        self.epochs.append(epoch)
        self.weights_at_start[epoch] = [np.array(w) for w in self.model.weights]

    def on_epoch_end(self, epoch, logs=None):
        self.iterations = int(self.model.optimizer.iterations)


def test_a_crashed_run_resumes_from_its_last_epoch(tmp_path):
    x, y = _data()
    keras.utils.set_random_seed(0)
    model = lstm_lm(**SIZES)
    model.compile(optimizer="adam")
    first = _Recorder()
    with pytest.raises(RuntimeError, match="simulated crash"):
        model.fit(x, y, batch_size=8, epochs=4, verbose=0,
                  callbacks=default_callbacks(str(tmp_path)) + [first, _Crash(at_epoch=2)])
    assert first.epochs == [0, 1, 2]

    # A new process would build a fresh model: different initial weights.
    keras.utils.set_random_seed(1)
    restarted = lstm_lm(**SIZES)
    restarted.compile(optimizer="adam")
    second = _Recorder()
    history = restarted.fit(x, y, batch_size=8, epochs=4, verbose=0,
                            callbacks=default_callbacks(str(tmp_path)) + [second])
    # Only the lost epochs run again, from the weights the crash left.
    assert second.epochs == [2, 3] and len(history.history["loss"]) == 2
    for restored, saved in zip(second.weights_at_start[2], first.weights_at_start[2]):
        np.testing.assert_array_equal(restored, saved)
    assert second.iterations == 4 * 2  # two batches per epoch, four epochs in all
