"""Crash-safe training backups that a killed `fit` resumes from exactly."""

import hashlib
import json
import os
import re
import shutil
import tempfile
import warnings

import keras
import numpy as np

from tf_moe.layers.checks import check_positive_int
from tf_moe._internals import clear_resume_epoch, set_resume_epoch

_WEIGHTS = "model.weights.h5"
_STATE = "state.json"
_CHECKPOINT = re.compile(r"^epoch-(\d+)$")
_PARTIAL = ".partial-"
_FORMAT = 1


def seed_states(model):
    """The state variables of every `keras.random.SeedGenerator` of `model`.

    Keras documents `Layer.variables` as `Layer.weights` plus the seed
    generators' states (metric variables are in neither), so these are the
    variables in the first and not in the second, in the model's order:
    the gating noise of the gates, dropout, and any other layer's RNG.
    `save_weights` does not save them.
    """
    weights = {id(v) for v in model.weights}
    return [v for v in model.variables if id(v) not in weights]


def epoch_stream(dataset, steps_per_epoch, initial_epoch=0):
    """The batches that epochs `initial_epoch, ...` of an uninterrupted `fit` see.

    `fit(dataset.repeat(), steps_per_epoch=S)` reads one endless stream, so
    epoch `e` is its batches `e * S` to `(e + 1) * S - 1`. A resumed run
    must skip the batches of the epochs it restored. The stream is the
    same in every process only if `dataset` is built afresh for this
    `fit` with seeded shuffling: a `tf.data` shuffle with
    `reshuffle_each_iteration=True` draws each pass's order from a state
    that every earlier iteration of the same dataset object advanced.

    Args:
        dataset: a newly built `tf.data.Dataset` (one pass over the data;
            shuffle it with a fixed seed).
        steps_per_epoch: int, batches per epoch (`fit`'s `steps_per_epoch`).
        initial_epoch: int, the epoch `fit` starts at, e.g.
            `CrashSafeBackup.initial_epoch`.

    Returns:
        The repeated dataset from batch `initial_epoch * steps_per_epoch` on.

    Example:

    >>> backup = CrashSafeBackup("run/backup")
    >>> stream = epoch_stream(make_dataset(), 200, backup.initial_epoch)
    >>> model.fit(stream, epochs=10, steps_per_epoch=200, callbacks=[backup])
    ... # doctest: +SKIP
    """
    check_positive_int("steps_per_epoch", steps_per_epoch)
    if isinstance(initial_epoch, bool) or not isinstance(initial_epoch, int) or initial_epoch < 0:
        raise ValueError(f"`initial_epoch` must be an int >= 0, got {initial_epoch!r}.")
    return dataset.repeat().skip(initial_epoch * steps_per_epoch)


class CrashSafeBackup(keras.callbacks.Callback):
    """Backs up the training state every epoch so that a killed run resumes exactly.

    Like `keras.callbacks.BackupAndRestore`, it saves the model at the end of
    every epoch and, when `fit` is called again, restores it and skips the
    finished epochs. Unlike it:

    * a kill at any moment, SIGKILL and power loss included, leaves a usable
      backup: each epoch is written to a temporary directory, synced to disk
      and renamed into place in one step, and the last `keep` epochs are
      kept, each with a SHA-256 checksum of its weights. A resume uses the
      newest intact one and warns about any it skips (Keras's
      `double_checkpoint=True` overwrites the state file in place after the
      weights, so a kill between the two leaves an empty file that every
      later resume fails on, or weights and epoch number that disagree);
    * the state includes every `keras.random.SeedGenerator` of the model (the
      gates' noise, dropout), so with the same data a resumed run draws the
      same random numbers and reaches the same weights as an uninterrupted
      one. For the same data, feed `fit` with `epoch_stream`;
    * it keeps the logs of every finished epoch (`epoch_logs`), restored
      ones included, so a run that is resumed after its last epoch still
      reports them.

    The state is the model's weights, the optimizer's variables (its step
    count included), the seed generators and the epoch logs. Resume with the
    same model, optimizer and data settings: a backup whose weights do not
    fit the model is an error, never skipped.

    Args:
        directory: where the checkpoints go (one `epoch-NNNNNN` directory
            each); used by this run only.
        keep: int >= 1, how many of the newest checkpoints to keep.
        delete_on_end: delete `directory` when `fit` completes. Pass False to
            keep the final state until the trained model is safely saved
            (then delete the directory yourself): a rerun then restores the
            finished run and trains no epoch.

    Attributes:
        initial_epoch: the epoch `fit` starts at: that of the newest intact
            checkpoint, 0 without one. Read it before `fit` to build the data.
        epoch_logs: list of the logs (name -> float) of every finished epoch.

    Example:

    >>> backup = CrashSafeBackup("runs/lm/backup")
    >>> model.fit(epoch_stream(make_dataset(), 100, backup.initial_epoch),
    ...           epochs=10, steps_per_epoch=100, callbacks=[backup])
    ... # doctest: +SKIP
    """

    def __init__(self, directory, keep=2, delete_on_end=True):
        super().__init__()
        if not directory:
            raise ValueError(f"`directory` must be a path, got {directory!r}.")
        check_positive_int("keep", keep)
        self.directory = os.fspath(directory)
        self.keep = keep
        self.delete_on_end = bool(delete_on_end)
        self.epoch_logs = []

    @property
    def initial_epoch(self):
        checkpoint = self._newest_intact()
        return 0 if checkpoint is None else checkpoint[1]["epoch"]

    def on_train_begin(self, logs=None):
        if not self.model.built:
            raise ValueError(
                "CrashSafeBackup needs a built model before `fit` (call it on a batch, or build it)."
            )
        self.epoch_logs = []
        checkpoint = self._newest_intact()
        if checkpoint is None:
            return
        path, state = checkpoint
        optimizer = self.model.optimizer
        if optimizer is not None and not optimizer.built:
            # Its variables must exist to be loaded.
            optimizer.build(self.model.trainable_variables)
        seeds = seed_states(self.model)
        if len(seeds) != len(state["seed_states"]):
            raise ValueError(
                f"The backup {path} holds {len(state['seed_states'])} random seed states but the "
                f"model has {len(seeds)}: it is another model's. Delete {self.directory} to train "
                "from scratch."
            )
        try:
            self.model.load_weights(os.path.join(path, _WEIGHTS))
        except ValueError as error:
            raise ValueError(
                f"The backup {path} does not fit this model ({error}). Resume with the model "
                f"it was made with, or delete {self.directory} to train from scratch."
            ) from error
        for variable, value in zip(seeds, state["seed_states"]):
            variable.assign(np.asarray(value, variable.dtype))
        self.epoch_logs = list(state["logs"])
        set_resume_epoch(self.model, state["epoch"])

    def on_epoch_end(self, epoch, logs=None):
        self.epoch_logs.append({name: float(value) for name, value in (logs or {}).items()})
        self._write(epoch + 1)

    def on_train_end(self, logs=None):
        clear_resume_epoch(self.model)
        if self.delete_on_end:
            shutil.rmtree(self.directory, ignore_errors=True)

    def _checkpoints(self):
        """`(epoch, path)` of every published checkpoint, newest first."""
        return numbered_entries(self.directory, _CHECKPOINT)

    def _newest_intact(self):
        """`(path, state)` of the newest checkpoint that reads back whole, or None."""
        checkpoints = self._checkpoints()
        for epoch, path in checkpoints:
            state = _read_intact(path, epoch)
            if state is not None:
                return path, state
            warnings.warn(f"Skipping the damaged training backup {path}.", stacklevel=2)
        if checkpoints:
            raise OSError(
                f"Every training backup in {self.directory} is damaged; nothing can be resumed. "
                "Delete that directory to train from scratch."
            )
        return None

    def _write(self, epoch):
        os.makedirs(self.directory, exist_ok=True)
        partial = tempfile.mkdtemp(prefix=_PARTIAL, dir=self.directory)
        weights = os.path.join(partial, _WEIGHTS)
        self.model.save_weights(weights)
        _sync_file(weights)
        state = {
            "format": _FORMAT,
            "epoch": epoch,
            "weights_sha256": _sha256(weights),
            "seed_states": [np.asarray(v).tolist() for v in seed_states(self.model)],
            "logs": self.epoch_logs,
        }
        with open(os.path.join(partial, _STATE), "w") as f:
            json.dump(state, f)
            f.flush()
            os.fsync(f.fileno())
        _sync_dir(partial)
        final = os.path.join(self.directory, f"epoch-{epoch:06d}")
        # Only after a damaged checkpoint of this epoch was skipped.
        shutil.rmtree(final, ignore_errors=True)
        os.rename(partial, final)  # atomic: the checkpoint appears whole or not at all
        _sync_dir(self.directory)
        self._prune()

    def _prune(self):
        for _, path in self._checkpoints()[self.keep :]:
            shutil.rmtree(path, ignore_errors=True)
        for name in os.listdir(self.directory):
            if name.startswith(_PARTIAL):  # left by a killed write
                shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)


def numbered_entries(directory, pattern):
    """`(number, path)` of the entries of `directory` whose name `pattern` matches, newest first.

    `pattern`'s first group is the entry's number (an epoch); a missing
    directory has no entries.
    """
    if not os.path.isdir(directory):
        return []
    found = []
    for name in os.listdir(directory):
        match = pattern.match(name)
        if match:
            found.append((int(match.group(1)), os.path.join(directory, name)))
    return sorted(found, reverse=True)


def _read_intact(path, epoch):
    """The state of the checkpoint at `path` if it is whole and consistent, else None."""
    try:
        with open(os.path.join(path, _STATE)) as f:
            state = json.load(f)
        intact = (
            state.get("format") == _FORMAT
            and state.get("epoch") == epoch
            and isinstance(state.get("seed_states"), list)
            and isinstance(state.get("logs"), list)
            and state.get("weights_sha256") == _sha256(os.path.join(path, _WEIGHTS))
        )
    except (OSError, ValueError, AttributeError):
        return None
    return state if intact else None


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _sync_file(path):
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _sync_dir(path):
    # Makes a rename durable; directories cannot be opened on Windows.
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
