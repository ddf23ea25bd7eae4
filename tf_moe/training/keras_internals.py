"""The one place where tf_moe.training relies on a private Keras attribute.

`keras.callbacks.BackupAndRestore` makes `fit` resume at the restored epoch
by setting `model._initial_epoch`, which `fit` reads instead of its
`initial_epoch` argument; no public API does this from a callback.
tests/test_training_keras_internals.py pins the behaviour, so a Keras
release that changes it fails there first.
"""


def set_resume_epoch(model, epoch):
    """Makes the running `fit` (called before `on_train_begin`) start at `epoch`."""
    model._initial_epoch = epoch


def clear_resume_epoch(model):
    """Lets a later `fit` on the same model start at its `initial_epoch` argument again."""
    model._initial_epoch = None
