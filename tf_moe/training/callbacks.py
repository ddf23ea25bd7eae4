"""Callbacks: TensorBoard summaries with per-expert load histograms, crash-safe backups."""

import os
import shutil

import keras
import tensorflow as tf
from tensorflow.core.framework import summary_pb2

from tf_moe.layers.moe_layer import MoELayer
from tf_moe.training.backup import CrashSafeBackup


def moe_layers(model):
    """The `MoELayer` layers of a functional model, in graph order."""
    return [layer for layer in model.layers if isinstance(layer, MoELayer)]


def expert_loads(model, inputs):
    """Fraction of the routed tokens that each expert of each MoE layer gets.

    Runs `model` on `inputs` at inference and reads, for every MoE layer,
    the tokens its router sent to each expert (masked tokens excluded): the
    `load` of the layer's `last_routing`, whatever the layer's call
    arguments (token ids for a hash router included). Like any
    inference call it updates the MoE layers' balance metrics; a model with
    an `ExpertParallelMoE` over several replicas must be called in their
    replica context.

    Args:
        model: a built Keras model with `MoELayer` layers.
        inputs: a batch of model inputs.

    Returns:
        dict layer name -> float32 [num_experts] loads summing to 1.
    """
    layers = moe_layers(model)
    if not layers:
        return {}
    model(inputs, training=False)
    loads = {}
    for layer in layers:
        load = layer.last_routing.load
        loads[layer.name] = load / tf.maximum(tf.reduce_sum(load), 1.0)
    return loads


def _metadata(plugin_name):
    return summary_pb2.SummaryMetadata(
        plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name=plugin_name)
    ).SerializeToString()


def write_scalar(tag, value, step):
    """`tf.summary.scalar` without the `tensorboard` package (same record)."""
    tf.summary.write(tag, tf.cast(value, tf.float32), step=step, metadata=_metadata("scalars"))


def write_expert_histogram(tag, load, step):
    """Writes `load` [n] as a TensorBoard histogram with one bucket per expert.

    Bucket `i` spans `[i, i + 1)` and holds expert `i`'s load, so the
    histogram's x axis is the expert index and its height the load.
    """
    load = tf.cast(load, tf.float64)
    left = tf.range(tf.shape(load)[0], dtype=tf.float64)
    buckets = tf.stack([left, left + 1.0, load], axis=1)
    tf.summary.write(tag, buckets, step=step, metadata=_metadata("histograms"))


class TrainingSummaries(keras.callbacks.Callback):
    """TensorBoard logs of an MoE model, with per-expert load histograms.

    At the end of every epoch it writes each entry of the epoch logs
    (losses, perplexity, every MoE layer's load-balance metrics, and the
    learning rate) as a scalar under `train/` or `validation/`, and routes a
    fixed probe batch through the model to write each MoE layer's
    per-expert load as a histogram `<layer name>/expert_load` (one bucket
    per expert; a balanced layer is flat at `1 / num_experts`). It needs
    no `tensorboard` package to write; view the logs with
    `tensorboard --logdir <log_dir>`.

    Args:
        log_dir: directory of the summaries.
        probe_inputs: optional batch of model inputs for the histograms.

    Example:

    >>> callback = TrainingSummaries("logs", probe_inputs=x_valid[:64])
    >>> model.fit(x, y, callbacks=[callback])  # doctest: +SKIP
    """

    def __init__(self, log_dir, probe_inputs=None):
        super().__init__()
        self.log_dir = log_dir
        self.probe_inputs = probe_inputs
        self._writers = {}

    def _writer(self, name):
        if name not in self._writers:
            self._writers[name] = tf.summary.create_file_writer(os.path.join(self.log_dir, name))
        return self._writers[name]

    def on_epoch_end(self, epoch, logs=None):
        logs = dict(logs or {})
        logs.setdefault("learning_rate", self.model.optimizer.learning_rate)
        for key, value in logs.items():
            split = "validation" if key.startswith("val_") else "train"
            with self._writer(split).as_default():
                write_scalar(f"epoch_{key.removeprefix('val_')}", value, epoch)
        if self.probe_inputs is not None:
            with self._writer("experts").as_default():
                for name, load in expert_loads(self.model, self.probe_inputs).items():
                    write_expert_histogram(f"{name}/expert_load", load, epoch)
        for writer in self._writers.values():
            writer.flush()

    def on_train_end(self, logs=None):
        for writer in self._writers.values():
            writer.close()
        self._writers = {}


def default_callbacks(output_dir, probe_inputs=None, keep_backup=False):
    """TensorBoard logs with expert-load histograms, and crash-safe backups.

    `CrashSafeBackup` saves the whole training state (weights, optimizer,
    the gates' and dropout's random seeds) at the end of every epoch under
    `<output_dir>/backup` and restores it when `fit` is called again after a
    crash, so a killed run loses at most the epoch it was in, and resumes
    exactly (feed `fit` with `epoch_stream` for the same data order).
    `TrainingSummaries` writes the logs under `<output_dir>/logs`.

    Args:
        output_dir: directory for `logs/` and `backup/`.
        probe_inputs: optional batch for the expert-load histograms.
        keep_backup: keep the backup when `fit` completes (delete it with
            `delete_backup(output_dir)` once the trained model is saved);
            by default `fit` deletes it when it completes.

    Returns:
        A list of callbacks for `fit`, the `CrashSafeBackup` first.
    """
    return [
        CrashSafeBackup(_backup_dir(output_dir), delete_on_end=not keep_backup),
        TrainingSummaries(os.path.join(output_dir, "logs"), probe_inputs),
    ]


def delete_backup(output_dir):
    """Deletes the backup that `default_callbacks(output_dir, keep_backup=True)` kept."""
    shutil.rmtree(_backup_dir(output_dir), ignore_errors=True)


def _backup_dir(output_dir):
    return os.path.join(output_dir, "backup")


class ResetRecurrentState(keras.callbacks.Callback):
    """Resets the state of a model's stateful recurrent layers between passes.

    A stateful model (`lstm_lm(..., stateful=True)`) carries its state from
    batch to batch through a token stream. The state must start from zero at
    the start of every training epoch and of every evaluation, and the
    training state must not leak into evaluation or back: this callback
    resets it at each of those points.

    Example:

    >>> model.fit(train, validation_data=valid,
    ...           callbacks=[ResetRecurrentState()])  # doctest: +SKIP
    """

    def _reset(self):
        layers = list(self.model.layers)
        while layers:
            layer = layers.pop()
            if isinstance(layer, keras.Model):
                layers.extend(layer.layers)
            elif isinstance(layer, keras.layers.RNN) and layer.stateful:
                layer.reset_state()

    def on_epoch_begin(self, epoch, logs=None):
        self._reset()

    def on_test_begin(self, logs=None):
        self._reset()

    def on_test_end(self, logs=None):
        self._reset()
