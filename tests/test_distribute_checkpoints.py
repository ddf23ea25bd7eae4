"""Cluster checkpoints on one worker (the chief); tests/test_distribute_multiworker.py
runs them on two worker processes, with a worker killed mid-training."""

import os

import keras
import numpy as np
import pytest

from tf_moe.distribute import ClusterBackup, save_weights
from tf_moe.distribute.checkpoints import is_chief


def _model():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4), keras.layers.Dense(2)])
    model.compile(keras.optimizers.Adam(0.1), "mse")
    return model


def _data():
    rng = np.random.default_rng(0)
    return rng.standard_normal((8, 3)).astype("float32"), rng.standard_normal((8, 2)).astype("float32")


def test_save_weights_writes_one_whole_file(tmp_path):
    model = _model()
    assert is_chief(model.distribute_strategy)
    path = tmp_path / "sub" / "model.weights.h5"
    save_weights(model, path)
    assert os.listdir(tmp_path / "sub") == ["model.weights.h5"]  # no partial file left
    restored = _model()
    for variable in restored.weights:
        variable.assign(np.zeros(variable.shape))
    restored.load_weights(str(path))
    for a, b in zip(restored.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match=r"`filepath` must end in '\.weights\.h5'"):
        save_weights(model, tmp_path / "model.h5")


def test_backup_resumes_to_the_uninterrupted_weights(tmp_path):
    x, y = _data()
    uninterrupted = _model()
    uninterrupted.fit(x, y, batch_size=4, epochs=3, shuffle=False, verbose=0)

    backup = ClusterBackup(tmp_path / "backup", keep=1)
    assert backup.initial_epoch == 0
    _model().fit(x, y, batch_size=4, epochs=2, shuffle=False, verbose=0, callbacks=[backup])
    assert os.listdir(tmp_path / "backup") == ["epoch-000002.weights.h5"]  # keep=1

    resumed = _model()
    backup = ClusterBackup(tmp_path / "backup")
    assert backup.initial_epoch == 2
    history = resumed.fit(
        x, y, batch_size=4, epochs=3, initial_epoch=backup.initial_epoch, shuffle=False, verbose=0,
        callbacks=[backup],
    ).history
    assert len(history["loss"]) == 1
    for a, b in zip(resumed.get_weights(), uninterrupted.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    assert int(resumed.optimizer.iterations) == 6


def test_fit_must_start_at_the_backups_epoch(tmp_path):
    x, y = _data()
    _model().fit(x, y, epochs=1, verbose=0, callbacks=[ClusterBackup(tmp_path)])
    with pytest.raises(ValueError, match="pass `initial_epoch=backup.initial_epoch`"):
        _model().fit(x, y, epochs=2, verbose=0, callbacks=[ClusterBackup(tmp_path)])


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="`directory`"):
        ClusterBackup("")
    with pytest.raises(ValueError, match="keep"):
        ClusterBackup("backup", keep=0)
