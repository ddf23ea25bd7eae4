"""One training run of the reproduction: fit a model, resume it after a crash, and its result row.

Every experiment (`language_model`, `translation`) trains its models
through `fit`, which resumes from the run's backup under
`<output>/runs/<run name>/`, and writes its rows with `write_json`.
"""

import dataclasses
import json
import os
import time

import keras
import numpy as np

from tf_moe.layers.moe_layer import MoELayer
from tf_moe.models import ops_per_timestep
from tf_moe.training import WarmupInverseSqrtDecay, default_callbacks, delete_backup, epoch_stream

# The load-balance figures of the MoE layers that each result row holds.
BALANCE = ("cv_importance", "cv_load", "max_over_mean_load")


def subset(items, size):
    return items if size is None else items[:size]


def optimizer(config):
    schedule = WarmupInverseSqrtDecay(config.learning_rate, config.warmup)
    return keras.optimizers.Adam(schedule, clipnorm=1.0)


def params(model):
    """Parameters without the embedding and the softmax, as in Table 1."""
    return sum(
        int(np.prod(w.shape))
        for layer in model.layers
        if layer.name not in ("embedding", "logits")
        for w in layer.weights
    )


def fit(model, config, make_train, valid, run_dir, test=None, callbacks=()):
    """Trains `model` on `make_train()`, resuming from `run_dir`'s backup; returns its row.

    The row: sizes, validation (and test) perplexity, the MoE layers'
    balance, and the `curve` of validation perplexity after every epoch
    against the training tokens (targets) seen so far. The backup is kept
    after training (the caller deletes it once the command's results are
    saved), so a rerun after a later crash restores this model instead of
    training it again. `make_train` builds the data afresh, so that a
    resumed run reads the same batches as an uninterrupted one
    (`epoch_stream`). `callbacks` are used in training and evaluation.
    """
    model.compile(optimizer=optimizer(config))
    probe = next(iter(valid))[0]
    backup, *summaries = default_callbacks(run_dir, probe, keep_backup=True)
    # Full passes (`steps` None): one epoch is the batches of one pass.
    steps = config.steps or int(make_train().reduce(0, lambda count, _: count + 1))
    start = time.time()
    model.fit(
        epoch_stream(make_train(), steps, backup.initial_epoch),
        epochs=config.epochs,
        steps_per_epoch=steps,
        validation_data=valid,
        # The token counter writes into the epoch's logs before the backup keeps them.
        callbacks=[*callbacks, TokenCounter(), backup, *summaries],
        verbose=config.verbose,
    )
    seconds = time.time() - start
    logs = model.evaluate(valid, verbose=0, return_dict=True, callbacks=list(callbacks))
    seen = np.cumsum([epoch["train_tokens"] for epoch in backup.epoch_logs]).tolist()
    row = {
        "model": model.name,
        "params": params(model),
        "ops_per_timestep": ops_per_timestep(model),
        "valid_perplexity": float(logs["perplexity"]),
        "train_seconds": round(seconds, 1),
        "train_tokens": int(seen[-1]),
        "curve": [[int(count), epoch["val_perplexity"]] for count, epoch in zip(seen, backup.epoch_logs)],
    }
    if test is not None:
        test_logs = model.evaluate(test, verbose=0, return_dict=True, callbacks=list(callbacks))
        row["test_perplexity"] = float(test_logs["perplexity"])
    moe_names = [layer.name for layer in model.layers if isinstance(layer, MoELayer)]
    # The paper's balance figures are of training batches (noisy gates);
    # the validation ones are of the deterministic inference routing.
    for key in BALANCE:
        train_values = [backup.epoch_logs[-1][f"{name}_{key}"] for name in moe_names]
        valid_values = [float(logs[f"{name}_{key}"]) for name in moe_names]
        row[key] = float(np.mean(train_values)) if moe_names else None
        row[f"valid_{key}"] = float(np.mean(valid_values)) if moe_names else None
    return row


class TokenCounter(keras.callbacks.Callback):
    """Adds `train_tokens`, the epoch's training targets (non-padding), to the epoch's logs.

    Kept in the logs, the count survives in `CrashSafeBackup.epoch_logs`
    when a run resumes.
    """

    def on_train_batch_end(self, batch, logs=None):
        # The task-loss tracker's total weight is the number of targets of
        # the epoch so far (`fit` resets it every epoch).
        self._tokens = int(self.model.task_loss_tracker.count.numpy())

    def on_epoch_begin(self, epoch, logs=None):
        self._tokens = 0

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["train_tokens"] = self._tokens


def model_settings(config):
    """The model arguments the LM and translation experiments share."""
    return dict(
        units=config.units,
        num_experts=config.experts,
        k=config.k,
        expert_hidden_units=config.expert_hidden,
        num_groups=config.groups,
        dropout=config.dropout,
        importance_weight=config.importance_weight,
        load_weight=config.load_weight,
        gate_learning_rate_multiplier=config.gate_lr_multiplier,
        seed=config.seed,
    )


def run_dir(config, run_name):
    return os.path.join(config.output, "runs", run_name)


def delete_backups(config, run_names):
    # Only once the command's models and results are saved: a rerun after a
    # crash before that restores the finished models instead of retraining.
    for run_name in run_names:
        delete_backup(run_dir(config, run_name))


def write_json(path, config, rows):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump({"config": dataclasses.asdict(config), "rows": rows}, f, indent=2)
