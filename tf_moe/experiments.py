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
import math
import os
import time

import keras
import numpy as np
import tensorflow as tf

from tf_moe import data
from tf_moe.layers.moe import MoE
from tf_moe.models import Seq2SeqDecoder, lstm_lm, ops_per_timestep, seq2seq
from tf_moe.training import WarmupInverseSqrtDecay, default_callbacks, delete_backup, epoch_stream

_BALANCE = ("cv_importance", "cv_load", "max_over_mean_load")


@dataclasses.dataclass
class Config:
    """Settings of one training run (the CLI's flags)."""

    corpus: str = "web"
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
    vocab_size: int = 4000
    learning_rate: float = 3e-3
    warmup: int = 200
    dropout: float = 0.1
    importance_weight: float = 0.1
    load_weight: float = 0.1
    train_size: int | None = None
    valid_size: int | None = None
    beam_size: int = 4
    bleu_sentences: int | None = 400
    output: str = "saved_models"
    seed: int = 0
    verbose: int = 1

    @classmethod
    def quick(cls, **overrides):
        """A tiny smoke-test configuration (seconds, not minutes)."""
        settings = dict(
            experts=4, k=2, units=32, expert_hidden=64, epochs=1, steps=3, batch_size=16,
            seq_len=16, vocab_size=200, warmup=5, train_size=300, valid_size=64,
            bleu_sentences=16, beam_size=2,
        )
        settings.update(overrides)
        return cls(**settings)


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


def _fit(model, config, make_train, valid, run_dir):
    """Trains `model` on `make_train()`, resuming from `run_dir`'s backup; returns its row.

    The backup is kept after training (the caller deletes it once the
    command's results are saved), so a rerun after a later crash restores
    this model instead of training it again. `make_train` builds the data
    afresh, so that a resumed run reads the same batches as an
    uninterrupted one (`epoch_stream`).
    """
    model.compile(optimizer=_optimizer(config))
    probe = next(iter(valid))[0]
    callbacks = default_callbacks(run_dir, probe, keep_backup=True)
    backup = callbacks[0]
    # Full passes (`steps` None): one epoch is the batches of one pass.
    steps = config.steps or int(make_train().reduce(0, lambda count, _: count + 1))
    start = time.time()
    model.fit(
        epoch_stream(make_train(), steps, backup.initial_epoch),
        epochs=config.epochs,
        steps_per_epoch=steps,
        validation_data=valid,
        callbacks=callbacks,
        verbose=config.verbose,
    )
    seconds = time.time() - start
    logs = model.evaluate(valid, verbose=0, return_dict=True)
    row = {
        "model": model.name,
        "params": _params(model),
        "ops_per_timestep": ops_per_timestep(model),
        "valid_perplexity": float(logs["perplexity"]),
        "train_seconds": round(seconds, 1),
    }
    moe_names = [layer.name for layer in model.layers if isinstance(layer, MoE)]
    # The paper's balance figures are of training batches (noisy gates);
    # the validation ones are of the deterministic inference routing.
    for key in _BALANCE:
        train_values = [backup.epoch_logs[-1][f"{name}_{key}"] for name in moe_names]
        valid_values = [float(logs[f"{name}_{key}"]) for name in moe_names]
        row[key] = float(np.mean(train_values)) if moe_names else None
        row[f"valid_{key}"] = float(np.mean(valid_values)) if moe_names else None
    return row


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
        seed=config.seed,
    )


def _lm_model(config, kind, vocab_size, **overrides):
    settings = dict(_model_settings(config), vocab_size=vocab_size, model=kind)
    settings.update(overrides)
    return lstm_lm(**settings)


def _lm_data(config):
    train_texts = _subset(data.load_lm_corpus(config.corpus, "train"), config.train_size)
    valid_texts = _subset(data.load_lm_corpus(config.corpus, "valid"), config.valid_size)
    tokenizer = data.WordpieceTokenizer.from_texts(train_texts, config.vocab_size)
    make_train = functools.partial(
        data.lm_dataset, train_texts, tokenizer, config.seq_len, config.batch_size, seed=config.seed, fixed_length=True
    )
    valid = data.lm_dataset(valid_texts, tokenizer, config.seq_len, config.batch_size, shuffle=False, fixed_length=True)
    return tokenizer, make_train, valid


def train_lm(config, models=None, save=True):
    """Trains the MoE language model and its matched baseline; returns the table rows.

    Args:
        config: a `Config`.
        models: list of `lstm_lm` kinds to train (default: "moe" and
            `config.baseline`).
        save: save each model as `<output>/lm_<kind>.keras` and the
            vocabulary as `<output>/lm_vocab.txt`.

    Returns:
        A list of dicts, one per model: name, params (without embedding and
        softmax), ops per timestep, validation perplexity, training seconds
        and the MoE layers' load balance (mean over MoE layers) on the last
        epoch's training batches and, under `valid_`, on the validation set.
    """
    keras.utils.set_random_seed(config.seed)
    tokenizer, make_train, valid = _lm_data(config)
    rows, run_dirs = [], []
    for kind in models or ["moe", config.baseline]:
        # Each model's start is the same whether or not the ones before it
        # trained in this process or were restored from their backups.
        keras.utils.set_random_seed(config.seed)
        model = _lm_model(config, kind, tokenizer.vocabulary_size)
        name = kind.replace("-", "_")
        run_dirs.append(os.path.join(config.output, "runs", f"lm_{name}"))
        rows.append(_fit(model, config, make_train, valid, run_dirs[-1]))
        if save:
            model.save(os.path.join(config.output, f"lm_{name}.keras"))
    if save:
        tokenizer.save_vocabulary(os.path.join(config.output, "lm_vocab.txt"))
        _write_json(os.path.join(config.output, "lm_results.json"), config, rows)
    _delete_backups(run_dirs)
    return rows


def table6(config, settings=((0.0, 0.0), (0.2, 0.0), (0.0, 0.2), (0.1, 0.1), (0.01, 0.01), (1.0, 1.0))):
    """The MoE LM at each (w_importance, w_load) of the paper's Table 6."""
    keras.utils.set_random_seed(config.seed)
    tokenizer, make_train, valid = _lm_data(config)
    rows, run_dirs = [], []
    for w_importance, w_load in settings:
        keras.utils.set_random_seed(config.seed)
        model = _lm_model(config, "moe", tokenizer.vocabulary_size,
                          importance_weight=w_importance, load_weight=w_load)
        run_dirs.append(os.path.join(config.output, "runs", f"table6_{w_importance}_{w_load}"))
        row = _fit(model, config, make_train, valid, run_dirs[-1])
        row.update(w_importance=w_importance, w_load=w_load)
        rows.append(row)
    _write_json(os.path.join(config.output, "table6_results.json"), config, rows)
    _delete_backups(run_dirs)
    return rows


def expert_sweep(config, experts=(4, 32, 256), hierarchical=(16, 16)):
    """Figure 2 at fixed ops: flat MoEs of growing size, a hierarchical one, baselines.

    Every MoE model sends each token to `config.k` experts (k = 4: the
    hierarchical one uses 2 at each level, so also 4) of the same width,
    so all cost the same ops per timestep up to their gates; the dense
    baselines are matched to them.
    """
    keras.utils.set_random_seed(config.seed)
    tokenizer, make_train, valid = _lm_data(config)
    variants = [(f"moe-{n}", dict(num_experts=n)) for n in experts]
    groups, per_group = hierarchical
    level_k = int(round(math.sqrt(config.k)))
    variants.append(
        (f"moe-{groups * per_group}-h", dict(num_experts=groups * per_group, num_groups=groups, k=level_k))
    )
    variants += [(kind, dict(model=kind)) for kind in ("moe-1-wide", "moe-1-deep", "4xlstm")]
    rows, run_dirs = [], []
    for label, overrides in variants:
        keras.utils.set_random_seed(config.seed)
        model = _lm_model(config, overrides.pop("model", "moe"), tokenizer.vocabulary_size, **overrides)
        run_dirs.append(os.path.join(config.output, "runs", f"sweep_{label}"))
        row = _fit(model, config, make_train, valid, run_dirs[-1])
        row["model"] = label
        rows.append(row)
    _write_json(os.path.join(config.output, "sweep_results.json"), config, rows)
    _delete_backups(run_dirs)
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
    rows, run_dirs = [], []
    for use_moe in (True, False):
        keras.utils.set_random_seed(config.seed)
        model = seq2seq(
            tokenizer.vocabulary_size,
            use_moe=use_moe,
            name="mt_moe" if use_moe else "mt_dense",
            **_model_settings(config),
        )
        run_dirs.append(os.path.join(config.output, "runs", model.name))
        row = _fit(model, config, make_train, valid, run_dirs[-1])
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
    _delete_backups(run_dirs)
    return rows


def _delete_backups(run_dirs):
    # Only now that the command's models and results are saved.
    for run_dir in run_dirs:
        delete_backup(run_dir)


def _write_json(path, config, rows):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump({"config": dataclasses.asdict(config), "rows": rows}, f, indent=2)


def format_table(rows, columns=None):
    """Formats result rows as a Markdown table."""
    columns = columns or [
        key for key in ("model", "w_importance", "w_load", "params", "ops_per_timestep",
                        "valid_perplexity", "test_bleu", *_BALANCE,
                        *(f"valid_{key}" for key in _BALANCE), "train_seconds")
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
