"""The main job and the small-scale reproductions of the paper's claims.

`train_lm` and `train_mt` train an MoE model and its computationally matched
dense baseline on the embedded Bible corpora and return their validation
perplexity (and test BLEU for translation) with the MoE layers' load
balance. `table6` and `expert_sweep` rerun the language model at several
settings (PAPER.md section 3, table 6; section 6, figure 2). The command
line (`tf_moe.cli`) prints their tables; docs/results.md reports them.
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
from tf_moe.layers.moe_layer import MoELayer
from tf_moe.models import BASELINES, Seq2SeqDecoder, lstm_lm, ops_per_timestep, seq2seq
from tf_moe.training import (
    ResetRecurrentState,
    WarmupInverseSqrtDecay,
    default_callbacks,
    delete_backup,
    epoch_stream,
)

_BALANCE = ("cv_importance", "cv_load", "max_over_mean_load")
_log = logging.getLogger(__name__)


@dataclasses.dataclass
class Config:
    """Settings of one training run (the CLI's flags)."""

    corpus: str = "web"
    level: str = "wordpiece"
    experts: int = 16
    k: int = 4
    groups: int | None = None
    units: int = 128
    expert_hidden: int = 256
    baseline: str = "moe-1-wide"
    epochs: int = 3
    steps: int | None = 200
    batch_size: int = 32
    seq_len: int = 32
    vocab_size: int | None = 4000
    learning_rate: float = 3e-3
    warmup: int = 200
    dropout: float = 0.1
    importance_weight: float = 0.1
    load_weight: float = 0.1
    # The gates learn 10x faster than the rest (see docs/results.md, "Gate
    # learning rate"); 1 is the paper's training.
    gate_lr_multiplier: float = 10.0
    train_size: int | None = None
    valid_size: int | None = None
    beam_size: int = 4
    bleu_sentences: int | None = 400
    output: str = "saved_models"
    seed: int = 0
    verbose: int = 1

    # The word-level protocol's settings (`--level word`): a 10k-word
    # vocabulary (all of the Penn Treebank's), full passes over the training
    # stream in segments of 35 steps, as TensorFlow's PTB tutorial.
    WORD_LEVEL = dict(
        level="word", vocab_size=10_000, steps=None, epochs=13, seq_len=35, batch_size=32,
        learning_rate=2e-3, dropout=0.25,
    )

    # The main job (`tf-moe train lm`): the word-level protocol on the
    # embedded Bible with a 5000-word vocabulary and one full pass, where
    # the MoE is ahead of its matched dense baseline (docs/results.md).
    MAIN_LM = dict(WORD_LEVEL, vocab_size=5000, epochs=1)

    # A tiny smoke-test configuration (seconds, not minutes).
    QUICK = dict(
        experts=4, k=2, units=32, expert_hidden=64, epochs=1, steps=3, batch_size=16,
        seq_len=16, vocab_size=200, warmup=5, train_size=300, valid_size=64,
        bleu_sentences=16, beam_size=2,
    )

    @classmethod
    def quick(cls, **overrides):
        """`QUICK` with `overrides` applied."""
        return cls(**{**cls.QUICK, **overrides})


def _subset(items, size):
    return items if size is None else items[:size]


def _optimizer(config):
    schedule = WarmupInverseSqrtDecay(config.learning_rate, config.warmup)
    return keras.optimizers.Adam(schedule, clipnorm=1.0)


def _params(model):
    """Parameters without the embedding and the softmax, as in Table 1."""
    return sum(
        int(np.prod(w.shape))
        for layer in model.layers
        if layer.name not in ("embedding", "logits")
        for w in layer.weights
    )


def _fit(model, config, make_train, valid, run_dir, test=None, callbacks=()):
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
    model.compile(optimizer=_optimizer(config))
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
        "params": _params(model),
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
    for key in _BALANCE:
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


def _model_settings(config):
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
        split: _subset(data.load_lm_corpus(config.corpus, split),
                       config.train_size if split == "train" else config.valid_size)
        for split in data.SPLITS
    }
    if config.level == "word":
        vocab = data.WordVocabulary.from_texts(
            texts["train"], max_size=config.vocab_size,
            normalize=config.corpus not in data.WORD_TOKENIZED_CORPORA,
        )
        make_train, valid, test = (
            functools.partial(data.lm_stream_dataset, vocab.encode(texts[split]), config.batch_size, config.seq_len)
            for split in data.SPLITS
        )
        return LMData(vocab, make_train, valid(), test(), stateful=True)
    tokenizer = data.WordpieceTokenizer.from_texts(texts["train"], config.vocab_size)
    make_train, valid, test = (
        functools.partial(data.lm_dataset, texts[split], tokenizer, config.seq_len, config.batch_size,
                          shuffle=split == "train", seed=config.seed, fixed_length=True)
        for split in data.SPLITS
    )
    return LMData(tokenizer, make_train, valid(), test(), stateful=False)


def variant_arguments(label, config):
    """`lstm_lm` arguments of a model label.

    "moe" is the MoE of `config` (flat, or hierarchical with `config.groups`);
    "moe-<n>" a flat MoE of n experts with `config.k` per token; "moe-<n>-h"
    a hierarchical one of sqrt(n) groups with sqrt(k) experts per level (so
    a token still visits k experts); or one of the dense `BASELINES`.
    """
    if label in BASELINES:
        return dict(model=label)
    if label == "moe":
        return {}
    parts = label.split("-")
    if parts[0] != "moe" or len(parts) not in (2, 3) or not parts[1].isdigit() or parts[2:] not in ([], ["h"]):
        raise ValueError(f"Unknown model {label!r}: expected moe, moe-<n>, moe-<n>-h or one of {BASELINES}.")
    experts = int(parts[1])
    if len(parts) == 2:
        return dict(num_experts=experts, num_groups=None)
    groups = int(round(math.sqrt(experts)))
    level_k = int(round(math.sqrt(config.k)))
    if groups * groups != experts or level_k * level_k != config.k:
        raise ValueError(f"{label!r}: a hierarchical MoE here needs square numbers of experts and k.")
    return dict(num_experts=experts, num_groups=groups, k=level_k)


def _train_lm_variant(config, lm_data, label, run_name, callbacks=(), **overrides):
    """Builds the model `label`, trains it on `lm_data`; returns `(model, row)`.

    `callbacks` are added to the run's; `overrides` replace `lstm_lm`
    arguments. Every model starts from `config.seed`, whether or not the
    ones before it trained in this process or were restored from their
    backups. A model trained statefully on a stream is returned as its
    stateless copy (same weights, any batch size), the model to save and
    serve.
    """
    keras.utils.set_random_seed(config.seed)
    settings = dict(_model_settings(config), vocab_size=lm_data.vocabulary.vocabulary_size,
                    name=label.replace("-", "_"))
    settings.update(variant_arguments(label, config), **overrides)
    if lm_data.stateful:
        settings.update(stateful=True, batch_size=config.batch_size)
    model = lstm_lm(**settings)
    callbacks = ([ResetRecurrentState()] if lm_data.stateful else []) + list(callbacks)
    row = _fit(model, config, lm_data.make_train, lm_data.valid, _run_dir(config, run_name), lm_data.test, callbacks)
    if lm_data.stateful:
        trained, model = model, lstm_lm(**{**settings, "stateful": False, "batch_size": None})
        model.set_weights(trained.get_weights())
    row["model"] = label
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
        _write_json(os.path.join(config.output, "lm_results.json"), config, rows)
    _delete_backups(config, run_names)
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
    _write_json(os.path.join(config.output, f"table6_{config.corpus}_results.json"), config, rows)
    _delete_backups(config, run_names)
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
    _write_json(os.path.join(config.output, f"sweep_{config.corpus}_results.json"), config, rows)
    _delete_backups(config, run_names)
    return rows


# The routers `router_comparison` trains by default: the paper's and the later ones.
ROUTER_COMPARISON = ("noisy_top_k", "switch", "top_k", "expert_choice", "loss_free", "hash")


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

    Every model is `config`'s MoE LM with a router of `tf_moe.routers` by
    name: token-choice routers send each token to `config.k` experts of
    `config.expert_hidden` units (expert choice: `config.k` on average, its
    capacity factor), and the one-expert routers (switch, hash) to one
    expert `config.k` times as wide, so every model spends the same expert
    multiply-adds per token (the routers' own `d * n` differ: the hash
    router has none). Expert choice is not causal (see
    `ExpertChoiceRouter`): its perplexity is of a model whose positions see
    a little of the batch's future.

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
        if name not in routers_module.NAMES or name == "softmax":
            choices = [n for n in routers_module.NAMES if n != "softmax"]
            raise ValueError(f"Unknown router {name!r} for the comparison: choose from {choices}.")
    lm_data = _lm_data(config)
    rows, run_names = [], []
    for name in routers:
        one_expert = name in routers_module.ONE_EXPERT
        timer = StepTimer()
        run_names.append(f"routers_{name}")
        # The paper's router is the models' default, with the gates' learning
        # rate multiplier; the others by name, at their papers' settings.
        router = {} if name == "noisy_top_k" else dict(router=name, gate_learning_rate_multiplier=1.0)
        _, row = _train_lm_variant(
            config, lm_data, "moe", run_names[-1], callbacks=[timer], **router,
            k=1 if one_expert else config.k,
            expert_hidden_units=config.expert_hidden * (config.k if one_expert else 1),
        )
        row.update(model=name, step_ms=timer.median_ms)
        rows.append(row)
    _write_json(os.path.join(config.output, f"routers_{config.corpus}_results.json"), config, rows)
    _delete_backups(config, run_names)
    return rows


def _mt_data(config):
    train_pairs = _subset(data.load_translation_pairs(config.corpus, "train"), config.train_size)
    valid_pairs = _subset(data.load_translation_pairs(config.corpus, "valid"), config.valid_size)
    test_pairs = _subset(data.load_translation_pairs(config.corpus, "test"), config.bleu_sentences)
    tokenizer = data.WordpieceTokenizer.from_translation_pairs(train_pairs, config.vocab_size)
    make_train = functools.partial(
        data.translation_dataset, train_pairs, tokenizer, config.seq_len, config.batch_size, seed=config.seed,
        fixed_length=True,
    )
    valid = data.translation_dataset(valid_pairs, tokenizer, config.seq_len, config.batch_size, shuffle=False, fixed_length=True)
    return tokenizer, make_train, valid, test_pairs


def translate(decoder, tokenizer, sources, batch_size=64, beam_size=4):
    """Translates a list of strings with a `Seq2SeqDecoder`; returns normalised text."""
    outputs = []
    for start in range(0, len(sources), batch_size):
        batch = [[data.START_ID, *ids[: decoder.max_length - 2], data.END_ID]
                 for ids in tokenizer.tokenize(sources[start : start + batch_size]).to_list()]
        source = tf.ragged.constant(batch, dtype=tf.int32).to_tensor()
        if beam_size > 1:
            ids = decoder.beam_search(source, beam_size=beam_size, length_penalty=0.6)
        else:
            ids = decoder.greedy(source)
        outputs += [text.decode("utf-8") for text in tokenizer.detokenize(ids).numpy()]
    return outputs


def bleu(hypotheses, references, tokenizer):
    """Corpus BLEU (sacrebleu) against references normalised as the tokenizer does."""
    import sacrebleu

    references = [text.decode("utf-8") for text in tokenizer.normalize(references).numpy()]
    return sacrebleu.corpus_bleu(hypotheses, [references]).score


def train_mt(config, save=True):
    """Trains the MoE seq2seq model and its dense baseline on En->Es; returns rows with BLEU."""
    keras.utils.set_random_seed(config.seed)
    tokenizer, make_train, valid, test_pairs = _mt_data(config)
    sources = [source for source, _ in test_pairs]
    references = [target for _, target in test_pairs]
    rows, run_names = [], []
    for use_moe in (True, False):
        keras.utils.set_random_seed(config.seed)
        model = seq2seq(
            tokenizer.vocabulary_size,
            use_moe=use_moe,
            name="mt_moe" if use_moe else "mt_dense",
            **_model_settings(config),
        )
        run_names.append(model.name)
        row = _fit(model, config, make_train, valid, _run_dir(config, model.name))
        decoder = Seq2SeqDecoder(model, data.START_ID, data.END_ID, max_length=config.seq_len)
        hypotheses = translate(decoder, tokenizer, sources, beam_size=config.beam_size)
        row["test_bleu"] = bleu(hypotheses, references, tokenizer)
        row["example"] = f"{sources[0]} => {hypotheses[0]}"
        rows.append(row)
        if save:
            model.save(os.path.join(config.output, f"{model.name}.keras"))
    if save:
        tokenizer.save_vocabulary(os.path.join(config.output, "mt_vocab.txt"))
        _write_json(os.path.join(config.output, "mt_results.json"), config, rows)
    _delete_backups(config, run_names)
    return rows


def verdict(rows):
    """One plain sentence on the MoE row against the dense rows at matched ops.

    The MoE row is the first with load-balance figures (`cv_load` not None);
    the others are its dense baselines. Returns None without both.
    """
    moe = next((row for row in rows if row.get("cv_load") is not None), None)
    dense = [row for row in rows if row.get("cv_load") is None]
    if moe is None or not dense:
        return None
    best = min(dense, key=lambda row: row["valid_perplexity"])
    gap = best["valid_perplexity"] - moe["valid_perplexity"]
    share = abs(gap) / best["valid_perplexity"]
    head = (
        f"At {moe['ops_per_timestep']:,} vs {best['ops_per_timestep']:,} ops per token, the MoE "
        f"({moe['params']:,} parameters) has validation perplexity {moe['valid_perplexity']:.1f} against "
        f"{best['valid_perplexity']:.1f} for {best['model']} ({best['params']:,} parameters): "
    )
    if gap > 0:
        return head + f"the MoE is ahead by {gap:.1f} ({share:.1%})."
    return head + (
        f"the dense model is ahead by {-gap:.1f} ({share:.1%}). With few training tokens per expert "
        "the MoE's extra parameters have not paid off yet; train longer (--epochs) to see the "
        "paper's effect (docs/results.md has the curves)."
    )


def _run_dir(config, run_name):
    return os.path.join(config.output, "runs", run_name)


def _delete_backups(config, run_names):
    # Only once the command's models and results are saved: a rerun after a
    # crash before that restores the finished models instead of retraining.
    for run_name in run_names:
        delete_backup(_run_dir(config, run_name))


def _write_json(path, config, rows):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump({"config": dataclasses.asdict(config), "rows": rows}, f, indent=2)


def curves_to_plot(results):
    """`(model, tokens, perplexities)` of every row with a curve, each model once.

    A model in several results (e.g. a long run and a short sweep) is
    drawn from the first that has it, so list the longest runs first.
    """
    seen, curves = set(), []
    for result in results:
        for row in result["rows"]:
            if row.get("curve") and row["model"] not in seen:
                seen.add(row["model"])
                tokens, perplexity = zip(*row["curve"])
                curves.append((row["model"], list(tokens), list(perplexity)))
    return curves


def plot_curves(results_paths, output_path, title=None):
    """Plots validation perplexity against training tokens for every model.

    Args:
        results_paths: result JSON files written by the experiments (each
            row with a `curve` of `[tokens, valid perplexity]` points); a
            model in several files is drawn from the first.
        output_path: the PNG to write.
        title: optional plot title (default: the corpora of the results).

    Returns:
        `output_path`.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.ticker
        from matplotlib import pyplot
    except ImportError as e:
        raise ImportError("Plotting needs matplotlib: `pip install matplotlib`.") from e
    figure, axes = pyplot.subplots(figsize=(7, 4.5))
    results = []
    for path in results_paths:
        with open(path) as f:
            results.append(json.load(f))
    corpora = [result["config"]["corpus"] for result in results]
    for model, tokens, perplexity in curves_to_plot(results):
        axes.plot(
            np.asarray(tokens) / 1e6, perplexity, marker="o", markersize=3,
            linestyle="--" if model.replace("_", "-") in BASELINES else "-", label=model,
        )
    axes.set_xlabel("training tokens (millions)")
    axes.set_ylabel("validation perplexity")
    axes.set_yscale("log")
    # Plain perplexities on the log axis, not powers of ten.
    for axis_formatter in (axes.yaxis.set_major_formatter, axes.yaxis.set_minor_formatter):
        axis_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    axes.set_title(title or f"MoE (solid) vs computationally matched dense (dashed): {', '.join(sorted(set(corpora)))}")
    os.makedirs(os.path.dirname(output_path) or ".", exist_ok=True)
    figure.tight_layout()
    figure.savefig(output_path, dpi=120)
    pyplot.close(figure)
    return output_path


def format_table(rows, columns=None):
    """Formats result rows as a Markdown table."""
    columns = columns or [
        key for key in ("model", "w_importance", "w_load", "params", "ops_per_timestep",
                        "valid_perplexity", "test_perplexity", "test_bleu", *_BALANCE,
                        *(f"valid_{key}" for key in _BALANCE), "train_seconds", "step_ms")
        if any(key in row for row in rows)
    ]

    def cell(value):
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
        return str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(key)) for key in columns) + " |" for row in rows]
    return "\n".join(lines)
