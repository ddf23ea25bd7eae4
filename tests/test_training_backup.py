"""Tests of the crash-safe backup: atomic checkpoints, exact resumption, kills.

The kill tests run training in subprocesses (the library callbacks, and
`python -m tf_moe.reproduction.cli train lm`), SIGKILL them at random moments and rerun
them until they finish, then check that every rerun resumed where the
killed one left off (losing at most the epoch it was in) and that the final
weights equal those of an uninterrupted run, bit for bit, with gating noise
and dropout on.
"""

import glob
import json
import os
import random
import re
import subprocess
import sys
import textwrap
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_moe import HierarchicalMoE
from tf_moe.models import lstm_lm
from tf_moe.training import CrashSafeBackup, default_callbacks, epoch_stream, seed_states

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 30
STEPS = 3  # per epoch; a pass over `_dataset()` is 5 batches, so epochs straddle passes
EPOCHS = 3
SIZES = dict(vocab_size=VOCAB, units=8, num_experts=4, k=2, expert_hidden_units=16, dropout=0.3)


def _dataset():
    x = np.random.default_rng(0).integers(1, VOCAB, (40, 6)).astype("int32")
    x[::3, 4:] = 0
    dataset = tf.data.Dataset.from_tensor_slices((x, np.roll(x, -1, axis=1)))
    return dataset.shuffle(40, seed=1).batch(8, drop_remainder=True)


def _model(seed):
    keras.utils.set_random_seed(seed)
    model = lstm_lm(**SIZES)
    model.compile(optimizer="adam")
    return model


def _fit(model, callbacks, epochs, initial_epoch=0):
    # The shuffle order depends on the global seed too: seed as a new process would.
    tf.random.set_seed(0)
    model.fit(epoch_stream(_dataset(), STEPS, initial_epoch), epochs=epochs, steps_per_epoch=STEPS,
              verbose=0, callbacks=callbacks)
    return [np.asarray(v) for v in model.variables]


@pytest.fixture(scope="module")
def uninterrupted():
    """The variables after `EPOCHS` epochs without interruption."""
    return _fit(_model(0), [], epochs=EPOCHS)


class _Crash(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        if epoch == 2:
            raise RuntimeError("simulated crash")


def _assert_same(got, expected):
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        np.testing.assert_array_equal(a, b)


def _seed_generators(root):
    """Independent reference: the SeedGenerators reachable through layer attributes."""
    found, seen, stack = [], set(), [root]
    while stack:
        value = stack.pop()
        if id(value) in seen:
            continue
        seen.add(id(value))
        if isinstance(value, keras.random.SeedGenerator):
            found.append(value)
        elif isinstance(value, keras.layers.Layer):
            stack.extend(vars(value).values())
        elif isinstance(value, (list, tuple)):
            stack.extend(value)
        elif isinstance(value, dict):
            stack.extend(value.values())
    return found


def test_seed_states_are_every_seed_generator_of_the_model():
    model = lstm_lm(**SIZES, router="noisy_top_k")
    found = {id(v) for v in seed_states(model)}
    assert found == {id(generator.state) for generator in _seed_generators(model)}
    assert id(model.get_layer("moe").gate.seed_generator.state) in found
    assert len(found) >= 3  # the gate's noise and two dropout layers at least
    assert not found & {id(w) for w in model.weights}
    # Both levels of a hierarchical gate.
    inputs = keras.Input((4,))
    moe = HierarchicalMoE(num_groups=2, experts_per_group=2, k_primary=1, k_secondary=1, hidden_units=4)
    hierarchical = keras.Model(inputs, moe(inputs))
    states = {id(v) for v in seed_states(hierarchical)}
    assert states == {id(generator.state) for generator in _seed_generators(moe)} and len(states) == 2


@pytest.mark.slow
def test_a_resumed_noisy_run_ends_with_the_uninterrupted_weights(tmp_path, uninterrupted):
    backup = CrashSafeBackup(tmp_path / "backup")
    with pytest.raises(RuntimeError, match="simulated crash"):
        _fit(_model(0), [backup, _Crash()], epochs=EPOCHS)
    # A new process builds the model afresh: other weights and seeds.
    backup = CrashSafeBackup(tmp_path / "backup")
    assert backup.initial_epoch == 2
    resumed = _fit(_model(1), [backup], epochs=EPOCHS, initial_epoch=backup.initial_epoch)
    _assert_same(resumed, uninterrupted)
    assert len(backup.epoch_logs) == EPOCHS and "perplexity" in backup.epoch_logs[0]
    assert not os.path.exists(tmp_path / "backup")  # deleted once fit completed

    # Without the seed states (Keras's BackupAndRestore) the noise differs.
    keras_backup = keras.callbacks.BackupAndRestore(str(tmp_path / "keras"))
    with pytest.raises(RuntimeError, match="simulated crash"):
        _fit(_model(0), [keras_backup, _Crash()], epochs=EPOCHS)
    keras_backup = keras.callbacks.BackupAndRestore(str(tmp_path / "keras"))
    differs = _fit(_model(1), [keras_backup], epochs=EPOCHS, initial_epoch=2)
    assert not all(np.array_equal(a, b) for a, b in zip(differs, uninterrupted))


def test_epoch_stream_continues_the_uninterrupted_stream():
    batches = [x.numpy() for x, _ in epoch_stream(_dataset(), STEPS).take(4 * STEPS)]
    resumed = [x.numpy() for x, _ in epoch_stream(_dataset(), STEPS, initial_epoch=2).take(2 * STEPS)]
    _assert_same(resumed, batches[2 * STEPS:])
    # Reusing a dataset object would not: its shuffle state has moved on.
    reused = _dataset()
    list(reused)
    moved = [x.numpy() for x, _ in reused.repeat().take(STEPS)]
    assert not all(np.array_equal(a, b) for a, b in zip(moved, batches))
    with pytest.raises(ValueError, match="`steps_per_epoch`"):
        epoch_stream(_dataset(), 0)
    with pytest.raises(ValueError, match="`initial_epoch`"):
        epoch_stream(_dataset(), 3, initial_epoch=-1)


class _FailingRename:
    """`os.rename` that fails for the checkpoint of one epoch, as a kill there would stop it."""

    def __init__(self, epoch):
        self.epoch, self.rename = epoch, os.rename

    def __call__(self, source, target):
        if target.endswith(f"epoch-{self.epoch:06d}"):
            raise KeyboardInterrupt("killed while publishing")
        return self.rename(source, target)


def test_a_write_cut_short_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    model = _model(0)
    monkeypatch.setattr("tf_moe.training.backup.os.rename", _FailingRename(epoch=3))
    with pytest.raises(KeyboardInterrupt):
        _fit(model, [CrashSafeBackup(tmp_path)], epochs=EPOCHS)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path))[-2:] == ["epoch-000001", "epoch-000002"]
    assert len(glob.glob(os.path.join(tmp_path, ".partial-*"))) == 1  # the cut-short write
    backup = CrashSafeBackup(tmp_path, delete_on_end=False)
    assert backup.initial_epoch == 2
    # The same model object, to save a trace: the restore replaces its state.
    _fit(model, [backup], epochs=EPOCHS + 1, initial_epoch=2)
    # Pruned to the newest `keep`, leftovers of the cut write removed.
    assert sorted(os.listdir(tmp_path)) == ["epoch-000003", "epoch-000004"]


def test_a_damaged_latest_checkpoint_falls_back_to_the_previous(tmp_path, uninterrupted):
    model = _model(0)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _fit(model, [CrashSafeBackup(tmp_path, keep=3), _Crash()], epochs=EPOCHS)
    # A truncated newest weights file, as a disk fault would leave it.
    weights = os.path.join(tmp_path, "epoch-000002", "model.weights.h5")
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) // 2)
    backup = CrashSafeBackup(tmp_path)
    with pytest.warns(UserWarning, match="epoch-000002"):
        assert backup.initial_epoch == 1
    with pytest.warns(UserWarning, match="epoch-000002"):
        resumed = _fit(model, [backup], epochs=EPOCHS, initial_epoch=1)
    _assert_same(resumed, uninterrupted)


def test_unusable_backups_are_clear_errors(tmp_path):
    with pytest.raises(RuntimeError, match="simulated crash"):
        _fit(_model(0), [CrashSafeBackup(tmp_path / "a"), _Crash()], epochs=EPOCHS)
    # Another model's backup: never skipped as if damaged.
    other = lstm_lm(**{**SIZES, "units": 16})
    other.compile(optimizer="adam")
    with pytest.raises(ValueError, match="does not fit this model"):
        _fit(other, [CrashSafeBackup(tmp_path / "a")], epochs=EPOCHS)
    # Every checkpoint damaged: an error naming the directory, not a silent restart.
    for state in glob.glob(os.path.join(tmp_path, "a", "epoch-*", "state.json")):
        open(state, "w").close()
    with pytest.warns(UserWarning), pytest.raises(OSError, match="Every training backup in .*a"):
        CrashSafeBackup(tmp_path / "a").initial_epoch
    with pytest.raises(ValueError, match="`keep`"):
        CrashSafeBackup(tmp_path, keep=0)


def test_default_callbacks_can_keep_the_final_state(tmp_path):
    model = _model(0)
    callbacks = default_callbacks(str(tmp_path), keep_backup=True)
    final = _fit(model, callbacks, epochs=2)
    # A rerun restores the finished run, trains no epoch, keeps its logs.
    callbacks = default_callbacks(str(tmp_path), keep_backup=True)
    assert callbacks[0].initial_epoch == 2
    rerun = _model(1)
    _assert_same(_fit(rerun, callbacks, epochs=2, initial_epoch=2), final)
    assert len(callbacks[0].epoch_logs) == 2 and "loss" in callbacks[0].epoch_logs[-1]
    assert int(rerun.optimizer.iterations) == 2 * STEPS


# --- Kill tests -------------------------------------------------------------

# Trains the noisy LSTM LM with the library callbacks; prints epoch marks.
_WORKER = textwrap.dedent(
    """
    import os, sys
    root, output, result, epochs = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    sys.path.insert(0, root)
    import keras, numpy as np
    from tests.test_training_backup import STEPS, _dataset, _model
    from tf_moe.training import default_callbacks, delete_backup, epoch_stream

    class Marks(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            print("Epoch", epoch, flush=True)

    model = _model(0)
    # The backup outlives `fit` until the result is saved.
    callbacks = default_callbacks(output, keep_backup=True)
    model.fit(epoch_stream(_dataset(), STEPS, callbacks[0].initial_epoch), epochs=epochs,
              steps_per_epoch=STEPS, verbose=0, callbacks=callbacks + [Marks()])
    np.savez(result + ".partial.npz", *[np.asarray(v) for v in model.variables])
    os.replace(result + ".partial.npz", result)
    delete_backup(output)
    """
)

_ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": ROOT}


class _Attempt:
    """One training process, with its output in a file."""

    def __init__(self, command, log_path):
        self.log_path = log_path
        with open(log_path, "w") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=_ENV)

    def log(self):
        with open(self.log_path) as f:
            return f.read()

    def stop(self):
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=60)

    def run(self, kill_after=None, pattern=None, delay=0.0, timeout=600):
        """Waits for the end, or SIGKILLs `delay` s after the `kill_after`-th match of `pattern`.

        Returns whether the process was killed (it may finish first).
        """
        deadline = time.monotonic() + timeout
        try:
            if kill_after is not None:
                while len(re.findall(pattern, self.log())) < kill_after and self.process.poll() is None:
                    assert time.monotonic() < deadline, self.log()[-3000:]
                    time.sleep(0.02)
                time.sleep(delay)
                if self.process.poll() is None:
                    self.process.kill()  # SIGKILL
                    self.process.wait(timeout=60)
                    return True
            self.process.wait(timeout=max(1.0, deadline - time.monotonic()))
        finally:
            self.stop()
        assert self.process.returncode == 0, self.log()[-3000:]
        return False


def _train_with_kills(start, pattern, total_epochs, kills, rng, epoch_seconds, finished, one_run=True):
    """Runs `start(attempt)` processes until the training is done, SIGKILLing up to `kills` of them.

    Each kill comes at a random moment: `U(0, epoch_seconds)` after the
    start of a random epoch still to train, or during start-up. The
    training is done when a process exits by itself, or when `finished()`
    says that a killed one had saved everything (it was killed on its way
    out). With `one_run` (the epochs of `pattern` are those of one `fit`),
    checks that every rerun starts at the epoch the killed run was in or at
    the next one: a kill loses at most the epoch in progress.

    Returns:
        (kills done, epochs begun over all attempts).
    """
    killed = begun = 0
    last_begun = None
    for attempt in range(3 * kills + 5):
        process = start(attempt)
        if killed < kills:
            remaining = max(1, total_epochs - (begun - killed))
            was_killed = process.run(rng.randint(0, remaining), pattern, rng.uniform(0, epoch_seconds))
        else:
            was_killed = process.run()
        epochs = [int(epoch) for epoch in re.findall(pattern, process.log())]
        if one_run and epochs:
            assert epochs[0] in ((0,) if last_begun is None else (last_begun, last_begun + 1)), epochs
            last_begun = epochs[-1]
        begun += len(epochs)
        killed += was_killed
        if not was_killed or finished():
            return killed, begun
    raise AssertionError("training did not finish")


def _library_kill_test(tmp_path, kills, epochs, seed):
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)

    def start(name):
        output, result = str(tmp_path / name), str(tmp_path / f"{name}.npz")
        return lambda i: _Attempt([sys.executable, str(script), ROOT, output, result, str(epochs)],
                                  str(tmp_path / f"{name}-{i}.log"))

    reference = start("reference")(0)  # alongside the killed runs
    try:
        return _kill_cycles(tmp_path, start, reference, kills, epochs, seed)
    finally:
        reference.stop()


def _kill_cycles(tmp_path, start, reference, kills, epochs, seed):
    rng = random.Random(seed)
    done = cycle = 0
    while done < kills:
        name = f"killed{cycle}"
        cycle_kills, begun = _train_with_kills(
            start(name), r"Epoch (\d+)", epochs, kills - done, rng, epoch_seconds=0.6,
            finished=lambda: os.path.exists(tmp_path / f"{name}.npz") and not os.path.exists(tmp_path / name / "backup"),
        )
        done += cycle_kills
        assert epochs <= begun <= epochs + cycle_kills  # at most one epoch redone per kill
        if cycle == 0:
            reference.run()
            expected = np.load(tmp_path / "reference.npz")
        got = np.load(tmp_path / f"{name}.npz")
        _assert_same([got[k] for k in got.files], [expected[k] for k in expected.files])
        assert not os.path.exists(tmp_path / name / "backup")
        cycle += 1
    return done


def test_killed_training_resumes_exactly(tmp_path):
    """Two SIGKILLs at random moments in the default run (the many-kills test is slow)."""
    assert _library_kill_test(tmp_path, kills=2, epochs=EPOCHS, seed=0) == 2


def _cli_kill_test(tmp_path, kills, seed):
    epochs = 3
    flags = ["--quick", "--epochs", str(epochs), "--steps", "3", "--progress", "2"]

    def start(name):
        return lambda i: _Attempt(
            [sys.executable, "-m", "tf_moe.reproduction.cli", "train", "lm", *flags, "--output", str(tmp_path / name)],
            str(tmp_path / f"{name}-{i}.log"),
        )

    reference = start("cli_reference")(0)
    reference.run()
    rng = random.Random(seed)
    done = cycle = 0
    while done < kills:
        name = f"cli_killed{cycle}"
        # The MoE model then its baseline, `epochs` each.
        cycle_kills, begun = _train_with_kills(
            start(name), r"Epoch (\d+)/", 2 * epochs, kills - done, rng, epoch_seconds=3.0, one_run=False,
            finished=lambda: os.path.exists(tmp_path / name / "lm_results.json")
            and not glob.glob(str(tmp_path / name / "runs" / "*" / "backup")),
        )
        done += cycle_kills
        # A finished model is restored, never trained again: at most one
        # epoch redone per kill.
        assert 2 * epochs <= begun <= 2 * epochs + cycle_kills
        for model in ("lm_moe.keras", "lm_moe_1_wide.keras"):
            got = keras.models.load_model(tmp_path / name / model).get_weights()
            _assert_same(got, keras.models.load_model(tmp_path / "cli_reference" / model).get_weights())
        rows = [json.load(open(tmp_path / run / "lm_results.json"))["rows"] for run in (name, "cli_reference")]
        for got, expected in zip(*rows):
            del got["train_seconds"], expected["train_seconds"]
            assert got == expected
        assert not glob.glob(str(tmp_path / name / "runs" / "*" / "backup"))
        cycle += 1
    return done


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_many_kills_of_library_training_and_of_the_cli(tmp_path):
    library_kills = _library_kill_test(tmp_path, kills=12, epochs=6, seed=1)
    cli_kills = _cli_kill_test(tmp_path, kills=8, seed=2)
    assert library_kills + cli_kills >= 20
