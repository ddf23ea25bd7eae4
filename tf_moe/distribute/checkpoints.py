"""One consistent checkpoint from a whole cluster, written by the chief.

Under MultiWorkerMirroredStrategy every worker runs the same program, and
Keras's `save_weights` writes on every worker. `ExpertParallelMoE` saves
the full expert bank (every worker's shards, gathered with a collective),
so every worker must take part in each save, but only one file may be
written: the chief's. Other workers write to a temporary directory that is
deleted at once. The chief writes to a temporary file beside the target
and renames it into place, so a crash never leaves half a checkpoint.

A checkpoint holds full, unsharded values: it restores onto any number of
workers and replicas, and into a single-device `MoELayer`.
"""

import os
import re
import tempfile

import keras
import tensorflow as tf

from tf_moe.layers.checks import check_positive_int
from tf_moe.training.backup import numbered_entries

_SUFFIX = ".weights.h5"
_BACKUP = re.compile(r"^epoch-(\d+)\.weights\.h5$")


def is_chief(strategy=None):
    """Whether this worker writes the checkpoints (always, outside a cluster).

    Args:
        strategy: a `tf.distribute.Strategy` (default: the one in scope).
    """
    strategy = strategy or tf.distribute.get_strategy()
    return bool(strategy.extended.should_checkpoint)


def save_weights(model, filepath):
    """`model.save_weights(filepath)` from every worker of a cluster.

    Call it on every worker at the same point of the program: the expert
    shards are gathered from all workers. The chief writes `filepath`
    atomically; the other workers' copies go to a temporary directory
    that is deleted.

    Args:
        model: a built Keras model.
        filepath: path ending in `.weights.h5`, on storage every worker
            can read (to restore) and the chief can write.

    Example:

    >>> save_weights(model, "/shared/run/model.weights.h5")  # doctest: +SKIP
    """
    filepath = os.fspath(filepath)
    if not filepath.endswith(_SUFFIX):
        raise ValueError(f"`filepath` must end in {_SUFFIX!r}, got {filepath!r}.")
    if not is_chief(model.distribute_strategy):
        with tempfile.TemporaryDirectory(prefix="tf_moe-worker-") as scratch:
            model.save_weights(os.path.join(scratch, "worker" + _SUFFIX))
        return
    directory = os.path.dirname(os.path.abspath(filepath))
    os.makedirs(directory, exist_ok=True)
    partial = os.path.join(directory, f".partial-{os.getpid()}-{os.path.basename(filepath)}")
    try:
        model.save_weights(partial)
        os.replace(partial, filepath)  # atomic: the file appears whole or not at all
    finally:
        if os.path.exists(partial):
            os.remove(partial)


class ClusterBackup(keras.callbacks.Callback):
    """Backs up training at the end of every epoch from a cluster, and resumes it.

    Like `keras.callbacks.BackupAndRestore`, for MultiWorkerMirroredStrategy
    and expert parallelism: every worker takes part in each save
    (`save_weights`), the chief alone writes `directory/epoch-NNNNNN.weights.h5`
    (weights and optimizer state, expert banks whole) and keeps the newest
    `keep`. When a worker dies the others stop with an error (the strategy's
    heartbeats or collectives fail); restart every worker with the same
    `directory` and `fit(..., initial_epoch=backup.initial_epoch)`: each
    worker loads the newest backup in `on_train_begin`, onto whatever
    number of workers and replicas the new run has.

    Args:
        directory: where the backups go; every worker must read it (shared
            storage), the chief writes it.
        keep: int >= 1, how many of the newest backups to keep.

    Attributes:
        initial_epoch: the epoch of the newest backup (0 without one): pass
            it to `fit`.

    Example:

    >>> backup = ClusterBackup("/shared/run/backup")
    >>> model.fit(dataset, epochs=10, initial_epoch=backup.initial_epoch,
    ...           callbacks=[backup])  # doctest: +SKIP
    """

    def __init__(self, directory, keep=2):
        super().__init__()
        if not directory:
            raise ValueError(f"`directory` must be a path, got {directory!r}.")
        check_positive_int("keep", keep)
        self.directory = os.fspath(directory)
        self.keep = keep
        self._resumed_epoch = None

    def _backups(self):
        """`(epoch, path)` of every backup, newest first."""
        return numbered_entries(self.directory, _BACKUP)

    @property
    def initial_epoch(self):
        backups = self._backups()
        return backups[0][0] if backups else 0

    def on_train_begin(self, logs=None):
        backups = self._backups()
        if not backups:
            return
        self._resumed_epoch = backups[0][0]
        optimizer = self.model.optimizer
        if optimizer is not None and not optimizer.built:
            # Its variables must exist to be loaded.
            optimizer.build(self.model.trainable_variables)
        self.model.load_weights(backups[0][1])

    def on_epoch_begin(self, epoch, logs=None):
        if self._resumed_epoch is not None and epoch != self._resumed_epoch:
            raise ValueError(
                f"The backup in {self.directory} is at epoch {self._resumed_epoch} but `fit` "
                f"starts at epoch {epoch}: pass `initial_epoch=backup.initial_epoch` to `fit`."
            )
        self._resumed_epoch = None

    def on_epoch_end(self, epoch, logs=None):
        save_weights(self.model, os.path.join(self.directory, f"epoch-{epoch + 1:06d}{_SUFFIX}"))
        if is_chief(self.model.distribute_strategy):
            for _, path in self._backups()[self.keep :]:
                os.remove(path)
