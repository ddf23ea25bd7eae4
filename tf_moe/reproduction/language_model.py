"""The language-model experiments: the main job and the small-scale reproductions of the paper.

`train_lm` trains the MoE LSTM language model and its computationally
matched dense baseline on an embedded corpus and returns their validation
perplexity with the MoE layers' load balance. `table6` and `expert_sweep`
rerun the language model at several settings (Shazeer et al. 2017, Table 6
and Figure 2); `router_comparison` trains it with each router. The command
line (`tf_moe.reproduction.cli`) prints their tables; docs/results.md
reports them.
"""

import dataclasses
import functools
import json
import logging
import math
import os
import time
import typing

import keras
import numpy as np
import tensorflow as tf

from tf_moe import data
from tf_moe import routers as routers_module
from tf_moe.models import BASELINES, TRANSFORMER_KINDS, lstm_lm, transformer_lm, upcycle_transformer_lm
from tf_moe.layers.hierarchical_router import HierarchicalRouter
from tf_moe.reproduction import corpora, results, runs
from tf_moe.reproduction.progress import BARS
from tf_moe.training import ResetRecurrentState

_log = logging.getLogger(__name__)


class LMData(typing.NamedTuple):
    """The data of one language-modelling protocol, and how models must use it."""

    vocabulary: typing.Any  # WordpieceTokenizer or WordVocabulary
    make_train: typing.Callable[[], tf.data.Dataset]  # the training data, built afresh
    valid: tf.data.Dataset
    test: tf.data.Dataset | None
    stateful: bool  # stream segments: the models carry LSTM state across batches


def _lm_data(config):
    """The data of `config.level`'s protocol on `config.corpus`.

    "wordpiece": every text (verse) on its own, `[START]` ... `[END]`,
    WordPieces learned from the training texts, cut at `seq_len`. "word":
    the word-level protocol of the Penn Treebank benchmark (Mikolov et al.
    2010): words split on whitespace (raw text, e.g. the Bibles, first
    case-folded with punctuation split off, `data.normalize_words`; PTB comes
    tokenised), `<eos>` after each sentence, the
    `vocab_size` most frequent training words, and each split one stream
    cut into consecutive segments of `seq_len` for truncated
    backpropagation through stateful LSTMs.
    """
    texts = {
        split: runs.subset(corpora.load_lm_corpus(config.corpus, split),
                       config.train_size if split == "train" else config.valid_size)
        for split in corpora.SPLITS
    }
    if config.level == "word":
        vocab = data.WordVocabulary.from_texts(
            texts["train"], max_size=config.vocab_size,
            normalize=config.corpus not in corpora.WORD_TOKENIZED_CORPORA,
        )
        make_train, valid, test = (
            functools.partial(data.lm_stream_dataset, vocab.encode(texts[split]), config.batch_size, config.seq_len)
            for split in corpora.SPLITS
        )
        return LMData(vocab, make_train, valid(), test(), stateful=True)
    tokenizer = data.WordpieceTokenizer.from_texts(texts["train"], config.vocab_size, progress=BARS)
    make_train, valid, test = (
        functools.partial(data.lm_dataset, texts[split], tokenizer, config.seq_len, config.batch_size,
                          shuffle=split == "train", seed=config.seed, fixed_length=True)
        for split in corpora.SPLITS
    )
    return LMData(tokenizer, make_train, valid(), test(), stateful=False)


def variant_arguments(label, config):
    """`lstm_lm` (or, with `config.arch` "transformer", `transformer_lm`) arguments of a model label.

    For the Transformer: "moe" or its dense twin "dense". For the LSTM:
    "moe" is the MoE of `config` (flat, or hierarchical with `config.groups`);
    "moe-<n>" a flat MoE of n experts with `config.k` per token; "moe-<n>-h"
    a hierarchical one of sqrt(n) groups with sqrt(k) experts per level (so
    a token still visits k experts); or one of the dense `BASELINES`.
    """
    if config.arch == "transformer":
        if label not in TRANSFORMER_KINDS:
            raise ValueError(f"Unknown model {label!r} for the Transformer: expected one of {TRANSFORMER_KINDS}.")
        return dict(model=label)
    if label in BASELINES:
        return dict(model=label)
    if label == "moe":
        return {}
    parts = label.split("-")
    if parts[0] != "moe" or len(parts) not in (2, 3) or not parts[1].isdigit() or parts[2:] not in ([], ["h"]):
        raise ValueError(f"Unknown model {label!r}: expected moe, moe-<n>, moe-<n>-h or one of {BASELINES}.")
    experts = int(parts[1])
    if len(parts) == 2:
        if experts < config.k:
            raise ValueError(f"{label!r}: an MoE of k={config.k} experts per token needs at least {config.k}.")
        return dict(num_experts=experts, num_groups=None)
    groups = int(round(math.sqrt(experts)))
    level_k = int(round(math.sqrt(config.k)))
    if groups * groups != experts or level_k * level_k != config.k:
        raise ValueError(f"{label!r}: a hierarchical MoE here needs square numbers of experts and k.")
    if groups < level_k:
        raise ValueError(f"{label!r}: a hierarchical MoE of k={config.k} needs at least {config.k} experts.")
    return dict(num_experts=experts, num_groups=groups, k=level_k)


def _model_arguments(config, lm_data, label, overrides):
    """The arguments of `lstm_lm` or `transformer_lm` for the model `label` of `config`."""
    name = label.replace("-", "_")
    if config.arch == "transformer":
        settings = dict(
            vocab_size=lm_data.vocabulary.vocabulary_size, units=config.units, num_layers=config.layers,
            num_heads=config.heads, num_experts=config.experts, k=config.k,
            expert_hidden_units=config.expert_hidden, max_length=config.seq_len, dropout=config.dropout,
            router=config.router, num_shared_experts=config.shared_experts, name=name,
        )
    else:
        settings = dict(runs.model_settings(config), vocab_size=lm_data.vocabulary.vocabulary_size,
                        router=config.router, num_shared_experts=config.shared_experts, name=name)
        if lm_data.stateful:
            settings.update(stateful=True, batch_size=config.batch_size)
    settings.update(variant_arguments(label, config), **overrides)
    return settings


def _train_lm_variant(config, lm_data, label, run_name, callbacks=(), **overrides):
    """Builds the model `label`, trains it on `lm_data`; returns `(model, row)`.

    `callbacks` are added to the run's; `overrides` replace `lstm_lm` (or
    `transformer_lm`) arguments. Every model starts from `config.seed`,
    whether or not the ones before it trained in this process or were
    restored from their backups. An LSTM model trained statefully on a
    stream is returned as its stateless copy (same weights, any batch
    size), the model to save and serve; a Transformer reads each segment
    on its own.
    """
    keras.utils.set_random_seed(config.seed)
    settings = _model_arguments(config, lm_data, label, overrides)
    build = transformer_lm if config.arch == "transformer" else lstm_lm
    model = build(**settings)
    stateful = settings.get("stateful", False)
    callbacks = ([ResetRecurrentState()] if stateful else []) + list(callbacks)
    run_dir = runs.run_dir(config, run_name)
    row = runs.fit(model, config, lm_data.make_train, lm_data.valid, run_dir, lm_data.test, callbacks)
    if stateful:
        trained, model = model, lstm_lm(**{**settings, "stateful": False, "batch_size": None})
        model.set_weights(trained.get_weights())
    row.update(model=label, corpus=config.corpus, seed=config.seed, settings=results.settings_of(config))
    if overrides:
        row["overrides"] = json.loads(json.dumps(overrides, default=str))
    _log.info(
        "%s: valid perplexity %.1f, test %.1f (%d training tokens, %.0f s)",
        label, row["valid_perplexity"], row["test_perplexity"], row["train_tokens"], row["train_seconds"],
    )
    return model, row


def train_lm(config, models=None, save=True):
    """Trains the MoE language model and its matched baseline; returns the table rows.

    Args:
        config: a `Config`.
        models: model labels to train (default: "moe" and `config.baseline`;
            see `variant_arguments`).
        save: save each model as `<output>/lm_<label>.keras` and the
            vocabulary as `<output>/lm_vocab.txt` (wordpieces) or
            `lm_vocab.json` (a `WordVocabulary`, `--level word`).

    Returns:
        A list of dicts, one per model: name, params (without embedding and
        softmax), ops per timestep, validation and test perplexity, training
        seconds, the validation curve and the MoE layers' load balance (mean
        over MoE layers) on the last epoch's training batches and, under
        `valid_`, on the validation set.
    """
    lm_data = _lm_data(config)
    rows, run_names = [], []
    for label in models or ["moe", config.baseline]:
        name = label.replace("-", "_")
        run_names.append(f"lm_{name}")
        model, row = _train_lm_variant(config, lm_data, label, run_names[-1])
        rows.append(row)
        if save:
            model.save(os.path.join(config.output, f"lm_{name}.keras"))
    if save:
        suffix = ".json" if isinstance(lm_data.vocabulary, data.WordVocabulary) else ".txt"
        lm_data.vocabulary.save_vocabulary(os.path.join(config.output, f"lm_vocab{suffix}"))
        runs.write_json(os.path.join(config.output, "lm_results.json"), config, rows)
    runs.delete_backups(config, run_names)
    return rows


def table6(config, settings=((0.0, 0.0), (0.2, 0.0), (0.0, 0.2), (0.1, 0.1), (0.01, 0.01), (1.0, 1.0))):
    """The MoE LM at each (w_importance, w_load) of the paper's Table 6."""
    lm_data = _lm_data(config)
    rows, run_names = [], []
    for w_importance, w_load in settings:
        run_names.append(f"table6_{w_importance}_{w_load}")
        _, row = _train_lm_variant(config, lm_data, "moe", run_names[-1],
                                   importance_weight=w_importance, load_weight=w_load)
        row.update(w_importance=w_importance, w_load=w_load)
        rows.append(row)
    runs.write_json(os.path.join(config.output, f"table6_{config.corpus}_results.json"), config, rows)
    runs.delete_backups(config, run_names)
    return rows



# Figure 2 at fixed ops: flat MoEs of growing size, a hierarchical one, and
# the three dense baselines matched to them.
SWEEP_MODELS = ("moe-4", "moe-32", "moe-256", "moe-256-h", *BASELINES)


def expert_sweep(config, models=SWEEP_MODELS):
    """Figure 2 at fixed ops: MoEs of growing size against the dense baselines.

    Every MoE model sends each token to `config.k` experts of the same width
    (see `variant_arguments`), so all cost the same ops per timestep up to their
    gates; the dense baselines are matched to them.
    """
    lm_data = _lm_data(config)
    run_names = [f"sweep_{label}" for label in models]
    rows = [_train_lm_variant(config, lm_data, label, run_name)[1] for label, run_name in zip(models, run_names)]
    runs.write_json(os.path.join(config.output, f"sweep_{config.corpus}_results.json"), config, rows)
    runs.delete_backups(config, run_names)
    return rows


# The routers `router_comparison` trains by default: MoELayer's default, the
# paper's and the later ones; "hierarchical" is the paper's two-level gate
# (appendix B).
ROUTER_COMPARISON = (
    "top_k_gate", "noisy_top_k", "top_k", "switch", "expert_choice", "loss_free", "hash", "batchwise", "hierarchical",
)


def comparison_router(name, config):
    """`(router, k, expert_hidden)` of the router `name` at `config`'s expert multiply-adds per token.

    Token-choice routers send each token to `config.k` experts of
    `config.expert_hidden` units (expert choice and batchwise: `config.k` on
    average); the one-expert routers (switch, hash) to one expert `config.k`
    times as wide; "hierarchical" picks `config.k` of `sqrt(n)` groups, then
    one expert in each (a `HierarchicalRouter` config).
    """
    if name == "hierarchical":
        groups = int(round(math.sqrt(config.experts)))
        if groups * groups != config.experts or config.k > groups:
            raise ValueError("The hierarchical router here needs a square number of experts and k <= its root.")
        router = HierarchicalRouter(groups, groups, config.k, 1)
        return keras.layers.serialize(router), None, config.expert_hidden
    if name in routers_module.ONE_EXPERT:
        return name, 1, config.expert_hidden * config.k
    return name, config.k, config.expert_hidden


class StepTimer(keras.callbacks.Callback):
    """Wall time of each training step; `median_ms` leaves out the first (tracing) step."""

    def __init__(self):
        super().__init__()
        self.seconds = []

    def on_train_batch_begin(self, batch, logs=None):
        self._start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.seconds.append(time.perf_counter() - self._start)

    @property
    def median_ms(self):
        steps = self.seconds[1:] or self.seconds
        return 1000 * float(np.median(steps)) if steps else None


def router_comparison(config, routers=ROUTER_COMPARISON):
    """The MoE language model with each router, at equal ops per timestep.

    Every model is `config`'s MoE LM (`config.arch`) with a router at the
    same expert multiply-adds per token (`comparison_router`; the routers'
    own `d * n` differ: the hash router has none), each at its papers'
    settings and its own defaults, every learned gate at the model's rate.
    Expert choice and batchwise routing are not causal while
    training (see `ExpertChoiceRouter`): their perplexities are of models
    whose positions see a little of the batch's future.

    Args:
        config: a `Config` (flat MoE: `groups` must be None).
        routers: router names (not "softmax", which runs every expert).

    Returns:
        A list of dicts as `train_lm`'s, with `model` the router's name and
        `step_ms`, the median wall time of a training step (the first left
        out).
    """
    if config.groups is not None:
        raise ValueError("The router comparison uses flat MoEs: leave `groups` (--hierarchical) unset.")
    for name in routers:
        if name not in COMPARED_ROUTERS:
            raise ValueError(f"Unknown router {name!r} for the comparison: choose from {list(COMPARED_ROUTERS)}.")
    lm_data = _lm_data(config)
    rows, run_names = [], []
    for name in routers:
        timer = StepTimer()
        run_names.append(f"routers_{name}")
        router, k, hidden = comparison_router(name, config)
        variant = dataclasses.replace(config, k=k or config.k, expert_hidden=hidden)
        _, row = _train_lm_variant(variant, lm_data, "moe", run_names[-1], callbacks=[timer], router=router)
        row.update(model=name, step_ms=timer.median_ms)
        rows.append(row)
    runs.write_json(os.path.join(config.output, f"routers_{config.corpus}_results.json"), config, rows)
    runs.delete_backups(config, run_names)
    return rows


# Every router the comparison can train.
COMPARED_ROUTERS = tuple(name for name in routers_module.NAMES if name != "softmax") + ("hierarchical",)


def tune(config, models, learning_rates, dropouts):
    """The same grid of peak learning rates and dropout rates for every model; returns a row per point.

    Each row's `settings` hold its learning rate and dropout, so a results
    file records the whole search and its validation perplexities, and the
    same search is given to the MoE and to its dense baseline.
    """
    lm_data = _lm_data(config)
    rows, run_names = [], []
    for label in models:
        for learning_rate in learning_rates:
            for dropout in dropouts:
                point = dataclasses.replace(config, learning_rate=learning_rate, dropout=dropout)
                run_names.append(f"tune_{label}_lr{learning_rate:g}_dropout{dropout:g}")
                rows.append(_train_lm_variant(point, lm_data, label, run_names[-1])[1])
    runs.write_json(os.path.join(config.output, f"tune_{config.corpus}_results.json"), config, rows)
    runs.delete_backups(config, run_names)
    return rows


def _router_config(class_name, module, **options):
    return {"module": f"tf_moe.layers.{module}", "class_name": class_name,
            "registered_name": f"tf_moe>{class_name}", "config": options}


def _noisy(**options):
    return lambda n, k: _router_config("NoisyTopKRouter", "noisy_top_k_router", num_experts=n, k=k, **options)


# The candidate causes of the paper's router losing, each a change of its
# gating, from the paper's exact gate to MoELayer's default and the
# softmax-then-top-k routers; "dense" is the computationally matched model.
# Each entry: the router (a name, or a function of (n, k) giving a config),
# balancing-loss weights, or the model.
DIAGNOSIS = {
    "paper": dict(router="noisy_top_k"),
    "paper-gate-lr-x10": dict(router=_noisy(learning_rate_multiplier=10.0)),
    "paper-losses-x0.1": dict(router="noisy_top_k", importance_weight=0.01, load_weight=0.01),
    "paper-no-noise": dict(router=_noisy(noisy=False)),
    # The "default" variants are TopKGateRouter (no noise, normalised input),
    # MoELayer's default when they were named; "top-k" is today's.
    "default": dict(router="top_k_gate"),
    # The default's gate started elsewhere than near zero: at zero (the
    # paper's start, ties to the lowest experts) or with logits of standard
    # deviation 1 on normalised tokens (normal, 1 / sqrt(d)).
    "default-zero-start": dict(router=lambda n, k: _router_config(
        "TopKGateRouter", "top_k_gate_router", num_experts=n, k=k, gate_initializer="zeros")),
    "default-unit-start": dict(router=lambda n, k: _router_config(
        "TopKGateRouter", "top_k_gate_router", num_experts=n, k=k, gate_initializer={
            "class_name": "VarianceScaling",
            "config": {"scale": 1.0, "mode": "fan_in", "distribution": "untruncated_normal"}})),
    # The default's gate learning 3x faster than the model (the previous
    # default; `default-gate-lr-x1` in results files is today's default).
    "default-gate-lr-x3": dict(router=lambda n, k: _router_config(
        "TopKGateRouter", "top_k_gate_router", num_experts=n, k=k, learning_rate_multiplier=3.0)),
    "top-k-renormalized": dict(router=lambda n, k: _router_config(
        "TopKRouter", "top_k_router", num_experts=n, k=k, normalize=True)),
    "top-k": dict(router="top_k"),
    "dense": dict(model=None),
}


def _diagnosis_overrides(name, config):
    """The model arguments of the diagnosis variant `name` for `config.arch`; `(label, overrides)`."""
    variant = DIAGNOSIS[name]
    if "model" in variant:
        return ("dense" if config.arch == "transformer" else config.baseline), {}
    router = variant["router"]
    overrides = {"router": router(config.experts, config.k) if callable(router) else router}
    weights = {key: variant[key] for key in ("importance_weight", "load_weight") if key in variant}
    if config.arch == "transformer":
        overrides["moe_arguments"] = weights
    else:
        overrides.update(weights)
    return "moe", overrides


def diagnose(config, variants=tuple(DIAGNOSIS)):
    """The LM (`config.arch`) with each gating variant of `DIAGNOSIS`: why the paper's router loses."""
    if config.groups is not None:
        raise ValueError("The gating diagnosis uses flat MoEs: leave `groups` (--hierarchical) unset.")
    lm_data = _lm_data(config)
    rows, run_names = [], []
    for name in variants:
        label, overrides = _diagnosis_overrides(name, config)
        run_names.append(f"diagnose_{name}")
        _, row = _train_lm_variant(config, lm_data, label, run_names[-1], **overrides)
        row["model"] = name
        rows.append(row)
    runs.write_json(os.path.join(config.output, f"diagnose_{config.corpus}_results.json"), config, rows)
    runs.delete_backups(config, run_names)
    return rows


def upcycling(config, extra_steps):
    """Sparse upcycling of a trained dense Transformer LM against training it further.

    Trains the dense twin for `config.epochs`, then from its weights trains
    (a) the dense model and (b) its upcycled MoE (`upcycle_transformer_lm`:
    every expert a copy of the block's FFN, routers fresh) for `extra_steps`
    more steps on the same batches, each with a fresh optimizer on the same
    schedule. Returns the rows "dense" (the starting point),
    "dense+<steps>" and "upcycled+<steps>".
    """
    if config.arch != "transformer":
        raise ValueError("Upcycling is measured on the Transformer LM: use --arch transformer.")
    lm_data = _lm_data(config)
    base, base_row = _train_lm_variant(config, lm_data, "dense", "upcycle_dense")
    more = dataclasses.replace(config, epochs=1, steps=extra_steps)
    rows, run_names = [base_row], ["upcycle_dense"]
    for label, make in (
        ("dense", lambda: _dense_copy(base)),
        ("upcycled", lambda: upcycle_transformer_lm(base, config.experts, config.k)),
    ):
        name = f"{label}+{extra_steps}"
        run_names.append(f"upcycle_{label}_more")
        keras.utils.set_random_seed(config.seed)
        model = make()
        row = runs.fit(model, more, lm_data.make_train, lm_data.valid, runs.run_dir(more, run_names[-1]), lm_data.test)
        row.update(model=name, corpus=config.corpus, seed=config.seed, settings=results.settings_of(config),
                   extra_steps=extra_steps)
        rows.append(row)
    runs.write_json(os.path.join(config.output, f"upcycle_{config.corpus}_results.json"), config, rows)
    runs.delete_backups(config, run_names)
    return rows


def _dense_copy(model):
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    return copy
