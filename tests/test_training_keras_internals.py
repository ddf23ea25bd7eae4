"""Pins the private Keras behaviour that tf_moe.training.keras_internals relies on."""

import keras
import numpy as np

from tf_moe.training.keras_internals import clear_resume_epoch, set_resume_epoch


class _ResumeAt(keras.callbacks.Callback):
    def __init__(self, epoch):
        super().__init__()
        self.epoch, self.begun = epoch, []

    def on_train_begin(self, logs=None):
        if self.epoch is not None:
            set_resume_epoch(self.model, self.epoch)

    def on_epoch_begin(self, epoch, logs=None):
        self.begun.append(epoch)


def test_fit_starts_at_the_epoch_set_in_on_train_begin():
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile("sgd", "mse")
    x, y = np.ones((4, 2), "float32"), np.ones((4, 1), "float32")
    resume = _ResumeAt(3)
    history = model.fit(x, y, epochs=5, verbose=0, callbacks=[resume])
    assert resume.begun == [3, 4] and history.epoch == [3, 4]
    # Still set: a later fit would start there too, until cleared.
    again = _ResumeAt(None)
    model.fit(x, y, epochs=5, verbose=0, callbacks=[again])
    assert again.begun == [3, 4]
    clear_resume_epoch(model)
    model.fit(x, y, epochs=2, verbose=0, callbacks=[again])
    assert again.begun == [3, 4, 0, 1]
