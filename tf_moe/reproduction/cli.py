"""The `tf-moe` command line: train the paper's models, rerun its experiments, export them.

    tf-moe train lm            # MoE LSTM LM vs its matched dense baseline
    tf-moe train lm --arch transformer   # MoE Transformer LM vs its dense twin
    tf-moe train mt            # MoE seq2seq vs dense, BLEU on En->Es
    tf-moe experiment table6   # the six balancing-loss weightings
    tf-moe experiment experts  # 4/32/256/256-h experts vs baselines, fixed ops
    tf-moe experiment ptb      # Penn Treebank, word level: MoEs vs dense baselines
    tf-moe experiment routers  # every router on the LM at equal ops per timestep
    tf-moe experiment tune     # the same learning-rate/dropout grid for each model
    tf-moe experiment diagnose --arch transformer  # why the paper's gate loses there
    tf-moe experiment upcycle --arch transformer   # sparse upcycling vs dense training
    tf-moe plot saved_models/sweep_ptb_results.json --output docs/ptb_curves.png
    tf-moe report docs/results.md   # render its tables from docs/results/*.json
    tf-moe train lm --quick    # a smoke run of seconds
    tf-moe export lm saved_models/lm_moe.keras --vocab saved_models/lm_vocab.txt
                               # SavedModel for TF Serving (docs/serving.md)

Before training, one line says what will run and where its results go;
after it, the results table and the command that shows the TensorBoard
logs. `--seeds 0 1 2` repeats the command for each seed; `--results FILE`
appends every run's row (model, corpus, seed, settings, git commit, the
command) to a results file such as `docs/results/<experiment>.json`. Models, vocabularies and results are saved under `--output` (default
`saved_models/`), TensorBoard logs under `<output>/runs/`. An interrupted
run resumes from its last finished epoch when rerun with the same flags.

Output: `--progress` is Keras's progress display (0 none, 1 a bar, 2 a line
per epoch). `-v` adds tf_moe's debug messages, TensorFlow's C++ warnings and
errors, every Python warning and the traceback of an error; `-vv` also
TensorFlow's C++ INFO lines. (The `tf-moe` command sets TensorFlow's level
before TensorFlow loads; `python -m tf_moe.reproduction.cli` runs the same
commands with the level `TF_CPP_MIN_LOG_LEVEL` gives.)

A mistake (a flag out of its range, a missing file, a corpus that cannot be
fetched) prints one line and exits with status 2.
"""

import argparse
import dataclasses
import functools
import logging
import math
import os
import shlex
import sys
import tempfile
import warnings

import tf_moe
from tf_moe import data, export, routers
from tf_moe.reproduction import corpora, language_model, reports, results, translation
from tf_moe.reproduction.config import Config

# ------------------------------------------------------------ flag values ----
# argparse `type=` functions: each turns a flag's text into its value or says
# in one line what the flag accepts.


def _number(text, kind):
    try:
        value = kind(text)
    except ValueError:
        expected = "an integer" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def int_at_least(minimum):
    """A flag type: an integer >= `minimum`."""

    def parse(text):
        value = _number(text, int)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text!r}")
        return value

    return parse


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)


def positive_float(text):
    """A flag type: a finite number > 0."""
    value = _number(text, float)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return value


def non_negative_float(text):
    """A flag type: a finite number >= 0."""
    value = _number(text, float)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text!r}")
    return value


def rate_below_one(text):
    """A flag type: a number in [0, 1), e.g. a dropout rate."""
    value = _number(text, float)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text!r}")
    return value


def seed(text):
    """A flag type: a random seed, an integer in [0, 2**32)."""
    value = _number(text, int)
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"must be an integer in [0, 2**32), got {text!r}")
    return value


class UsageError(Exception):
    """A mistake in the command or the machine's setup: one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        # One line, not argparse's usage block: the usage of a training
        # command is a screenful.
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


# ---------------------------------------------------------------- parser ----

# What each command runs: (function of a Config, what it trains, table title).
_TRAININGS = {
    "lm": (language_model.train_lm, "an MoE language model and its computationally matched dense baseline",
           "lm: MoE vs computationally matched dense baseline"),
    "mt": (translation.train_mt, "an MoE translation model and its dense baseline",
           "mt: MoE vs computationally matched dense baseline"),
}
_EXPERIMENTS = {
    "table6": (language_model.table6, "the MoE language model at each balancing-loss weighting of Table 6",
               "Table 6: balancing-loss weights"),
    "experts": (language_model.expert_sweep,
                "MoE language models of more and more experts and dense baselines at fixed ops (Figure 2)",
                "Figure 2: experts at fixed ops per timestep"),
    "ptb": (language_model.expert_sweep,
            "word-level MoE language models and dense baselines at fixed ops (Figure 2)",
            "Penn Treebank, word level: MoEs vs computationally matched dense baselines"),
    "routers": (language_model.router_comparison,
                "the MoE language model with each router at equal ops per timestep",
                "Routers at equal ops per timestep (step_ms: median training step)"),
    "tune": (language_model.tune, "each model on the same grid of learning rates and dropout rates",
             "The same learning-rate and dropout grid for every model"),
    "diagnose": (language_model.diagnose, "the language model with each candidate change of the paper's gating",
                 "The paper's gating in the language model, one change at a time"),
    "upcycle": (language_model.upcycling,
                "a dense Transformer LM, then it and its upcycled MoE for the same extra steps",
                "Sparse upcycling against training the dense model further"),
}
# The routers `tf-moe experiment routers --routers` takes (not the dense softmax).
_COMPARED_ROUTERS = language_model.COMPARED_ROUTERS
# Experiments that set their own numbers of experts and groups (`--models`).
_SWEEPS = ("experts", "ptb")


def _is_sweep(args):
    """Whether the command is an expert sweep (`tf-moe experiment experts|ptb`)."""
    return args.command == "experiment" and args.name in _SWEEPS


def _parser():
    parser = _Parser(prog="tf-moe", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {tf_moe.__version__}")
    _add_verbosity(parser, default=0)
    # Subcommands take -v too; SUPPRESS keeps a -v given before them.
    common = _Parser(add_help=False)
    _add_verbosity(common, default=argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser("train", parents=[common], help="train a model and its matched dense baseline")
    train.add_argument("task", choices=tuple(_TRAININGS))
    _add_training_flags(train)
    train.add_argument("--models", nargs="+", metavar="MODEL",
                       help="lm: train only these of the MoE and its baseline (moe, moe-1-wide, ...; with "
                            "--arch transformer: moe, dense), e.g. each at its own tuned settings")
    train.set_defaults(run=_train)

    experiment = commands.add_parser("experiment", parents=[common], help="rerun a reproduction of docs/results.md")
    experiment.add_argument("name", choices=tuple(_EXPERIMENTS))
    _add_training_flags(experiment)
    experiment.add_argument("--models", nargs="+", metavar="MODEL",
                            help="experts/ptb: the models to train: moe-<n>, moe-<n>-h (hierarchical), "
                                 "moe-1-wide, moe-1-deep, 4xlstm")
    experiment.add_argument("--routers", nargs="+", metavar="ROUTER", choices=_COMPARED_ROUTERS,
                            help=f"routers: the routers to compare ({', '.join(_COMPARED_ROUTERS)}; "
                                 f"default {' '.join(language_model.ROUTER_COMPARISON)})")
    experiment.add_argument("--learning-rates", nargs="+", type=positive_float, metavar="RATE",
                            help="tune: peak learning rates of the grid")
    experiment.add_argument("--dropouts", nargs="+", type=rate_below_one, metavar="RATE",
                            help="tune: dropout rates of the grid")
    experiment.add_argument("--variants", nargs="+", choices=tuple(language_model.DIAGNOSIS), metavar="VARIANT",
                            help=f"diagnose: the gating variants ({', '.join(language_model.DIAGNOSIS)}; default all)")
    experiment.add_argument("--extra-steps", type=positive_int,
                            help="upcycle: steps that the dense model and its upcycled MoE train after the dense "
                                 "model's --epochs")
    experiment.set_defaults(run=_experiment)

    report = commands.add_parser("report", parents=[common],
                                 help="render the tables of a results page from its results files")
    report.add_argument("page", help="the Markdown page, e.g. docs/results.md")
    report.add_argument("--results-dir", help="the results files (default: results/ beside the page)")
    report.add_argument("--check", action="store_true", help="only say whether the page is up to date (exit 1 if not)")
    report.set_defaults(run=_report)

    plot = commands.add_parser("plot", parents=[common],
                               help="plot validation perplexity against training tokens")
    plot.add_argument("results", nargs="+", help="result JSON files written by train/experiment")
    plot.add_argument("--output", required=True, help="the PNG to write")
    plot.add_argument("--title", help="plot title")
    plot.set_defaults(run=_plot)

    export_command = commands.add_parser("export", parents=[common], help="export a trained model for TF Serving")
    _add_export_flags(export_command)
    export_command.set_defaults(run=_export)
    return parser


def _add_verbosity(parser, default):
    parser.add_argument(
        "-v", "--verbose", action="count", default=default, dest="verbosity",
        help="more output: -v tf_moe's debug messages, TensorFlow's C++ warnings and errors, "
             "Python warnings, tracebacks; -vv also TensorFlow's C++ INFO lines",
    )


def _add_training_flags(sub):
    defaults = Config()
    add = sub.add_argument
    add("--quick", action="store_true", help="tiny smoke run (seconds); other flags still apply")
    add("--arch", choices=("lstm", "transformer"),
        help="lm: the paper's LSTM language model (default) or a Transformer whose FFNs are MoE layers "
             "(its defaults: word level, 2 blocks of 128, 16 experts of 256 with k=2 against a 512-wide "
             "dense FFN, 64-token contexts, AdamW, one full pass)")
    add("--layers", type=positive_int, help=f"transformer: blocks (default {defaults.layers})")
    add("--heads", type=positive_int, help=f"transformer: attention heads (default {defaults.heads})")
    add("--router", choices=routers.NAMES,
        help="lm: the MoE's router by name (default: MoELayer's default; noisy_top_k is the paper's)")
    add("--weight-decay", type=non_negative_float,
        help=f"AdamW weight decay; 0 for Adam (default {defaults.weight_decay})")
    add("--seeds", nargs="+", type=seed, metavar="SEED",
        help="repeat the command for each of these seeds (instead of --seed)")
    add("--tuned", metavar="FILE",
        help="train each model at the learning rate and dropout of its best validation row in this results "
             "file of `tf-moe experiment tune` (the same search for every model)")
    add("--results", metavar="FILE",
        help="append every run's row (model, seed, settings, commit, command) to this JSON results file, "
             "e.g. docs/results/transformer_ptb.json")
    add("--corpus", help=f"embedded corpus (lm: {', '.join(corpora.available_corpora('lm'))}; "
                         f"mt: {', '.join(corpora.available_corpora('translation'))}); "
                         f"default {defaults.corpus} / web-sparv")
    add("--level", choices=("wordpiece", "word"),
        help="lm: wordpieces of each text on its own, or the word-level stream protocol of the Penn "
             "Treebank benchmark (10k words, <eos>, stateful LSTMs; its defaults: 13 full epochs of "
             "35-step segments). `train lm` defaults to word level with 5000 words and one epoch; "
             "the lm experiments other than ptb to wordpieces")
    add("--experts", type=positive_int, help=f"experts per MoE layer (default {defaults.experts})")
    add("--k", type=positive_int, help=f"experts per token (per level if hierarchical; default {defaults.k})")
    add("--hierarchical", type=positive_int, metavar="GROUPS", dest="groups",
        help="use a hierarchical MoE with this many groups of experts/GROUPS experts")
    add("--units", type=positive_int, help=f"LSTM/embedding width (default {defaults.units})")
    add("--expert-hidden", type=positive_int, help=f"hidden width of each expert (default {defaults.expert_hidden})")
    add("--shared-experts", type=non_negative_int,
        help="lm: always-on experts per MoE layer beside the k routed ones (DeepSeekMoE); the dense "
             f"baselines widen to match (default {defaults.shared_experts})")
    add("--baseline", choices=("moe-1-wide", "moe-1-deep", "4xlstm"),
        help=f"dense baseline of the LM (default {defaults.baseline})")
    add("--epochs", type=positive_int, help=f"epochs (default {defaults.epochs})")
    add("--steps", type=non_negative_int, help=f"steps per epoch; 0 for full passes (default {defaults.steps})")
    add("--batch-size", type=positive_int, help=f"sequences per batch (default {defaults.batch_size})")
    add("--seq-len", type=int_at_least(2), help=f"max tokens per sequence (default {defaults.seq_len})")
    add("--vocab-size", type=int_at_least(len(data.RESERVED_TOKENS) + 1),
        help=f"wordpiece vocabulary size (default {defaults.vocab_size})")
    add("--learning-rate", type=positive_float, help=f"peak Adam rate (default {defaults.learning_rate})")
    add("--warmup", type=positive_int, help=f"warm-up steps (default {defaults.warmup})")
    add("--dropout", type=rate_below_one, help=f"dropout rate (default {defaults.dropout})")
    add("--importance-weight", type=non_negative_float,
        help="weight of the paper's importance loss, for the routers that use it (noisy_top_k, top_k_gate, "
             "--hierarchical; default 0.1)")
    add("--load-weight", type=non_negative_float, help="weight of the paper's load loss, likewise (default 0.1)")
    add("--gate-lr-multiplier", type=positive_float,
        help="how much faster the paper's noisy gates (--router noisy_top_k, --hierarchical) learn than the "
             f"rest of the model (default {defaults.gate_lr_multiplier})")
    add("--train-size", type=positive_int, help="use only the first N training texts")
    add("--valid-size", type=positive_int, help="use only the first N validation texts")
    add("--beam-size", type=positive_int, help=f"mt: beam width for BLEU (default {defaults.beam_size})")
    add("--bleu-sentences", type=positive_int, help=f"mt: test sentences scored (default {defaults.bleu_sentences})")
    add("--output", help=f"where models, results and logs go (default {defaults.output})")
    add("--seed", type=seed, help=f"random seed (default {defaults.seed})")
    add("--progress", type=int, choices=(0, 1, 2), dest="verbose",
        help="Keras progress: 0 silent, 1 bar, 2 line per epoch (default 1)")


def _add_export_flags(sub):
    add = sub.add_argument
    add("kind", choices=("lm", "mt", "keras"),
        help="lm: language model; mt: seq2seq translation; keras: any model, numeric signature")
    add("model", help="trained model, a .keras file (e.g. saved_models/lm_moe.keras)")
    add("--vocab", help="lm/mt: vocabulary file (e.g. saved_models/lm_vocab.txt)")
    add("--name", help="model name in the serving layout (default: the kind)")
    add("--version", type=positive_int, help="version number (default: next free one)")
    add("--output", default=export.DEFAULT_BASE_DIR, help=f"base directory (default {export.DEFAULT_BASE_DIR})")
    add("--top-k", type=positive_int, default=5, help="lm: next tokens returned (default 5)")
    add("--max-length", type=int_at_least(3), default=64, help="mt: most source/target tokens (default 64)")
    add("--beam-size", type=positive_int, default=4,
        help="mt: width of the beam_search signature; 1 for none (default 4)")


def config_from_args(args):
    """The `Config` that command-line arguments ask for."""
    flags = {
        field.name: getattr(args, field.name)
        for field in dataclasses.fields(Config)
        if getattr(args, field.name, None) is not None
    }
    if getattr(args, "task", None) == "mt" and "corpus" not in flags:
        flags["corpus"] = "web-sparv"
    if flags.get("steps") == 0:
        flags["steps"] = None
    settings = {}
    if getattr(args, "name", None) == "ptb":
        settings.update(Config.WORD_LEVEL, corpus="ptb")
    elif flags.get("level") == "word":
        settings.update(Config.WORD_LEVEL)
    elif args.command == "train" and args.task == "lm" and "level" not in flags:
        settings.update(Config.MAIN_LM)
    if flags.get("arch") == "transformer":
        corpus = flags.get("corpus", settings.get("corpus", Config.corpus))
        # The Penn Treebank's own 10k words; the main job's 5000 on the Bibles.
        settings.update(Config.TRANSFORMER, vocab_size=10_000 if corpus == "ptb" else 5000)
    if args.quick:
        quick = dict(Config.QUICK)
        if _is_sweep(args):
            del quick["k"]  # the sweeps' hierarchical models need a square k (the default 4)
        settings.update(quick)
    return Config(**{**settings, **flags})


def check_config(args, config):
    """Raises `UsageError` for flags that are fine alone but not together."""
    kind = "translation" if getattr(args, "task", None) == "mt" else "lm"
    names = corpora.available_corpora(kind)
    if config.corpus not in names:
        raise UsageError(f"--corpus {config.corpus} is not a {kind} corpus; choose from {', '.join(names)}")
    if args.command == "experiment" and args.name == "routers" and config.groups is not None:
        raise UsageError("--hierarchical: the router comparison uses flat MoEs")
    if config.arch == "transformer":
        if kind != "lm" or config.level != "word":
            raise UsageError("--arch transformer is a word-level language model (train lm, experiment ...)")
        if config.groups is not None:
            raise UsageError("--hierarchical: the Transformer takes routers by --router")
        if config.units % config.heads:
            raise UsageError(f"--units {config.units} is not a multiple of --heads {config.heads}")
    if config.shared_experts and kind != "lm":
        raise UsageError("--shared-experts is for the language models (lm), not translation")
    if config.router is not None and config.groups is not None:
        raise UsageError("--router and --hierarchical: the hierarchical MoE has its own router")
    # The expert sweeps set their own numbers of experts and groups.
    if not _is_sweep(args):
        if config.groups is None and config.k > config.experts:
            raise UsageError(f"--k {config.k} exceeds --experts {config.experts}")
        if config.groups is not None:
            if config.experts % config.groups:
                raise UsageError(f"--experts {config.experts} is not a multiple of --hierarchical {config.groups}")
            per_group = config.experts // config.groups
            if config.k > min(config.groups, per_group):
                raise UsageError(
                    f"--k {config.k} exceeds the {config.groups} groups or the {per_group} experts per group "
                    f"(a hierarchical MoE picks k at both levels)"
                )
    # Fixed-length batches drop the remainder: too few texts leave no batch.
    for flag, size in (("--train-size", config.train_size), ("--valid-size", config.valid_size)):
        if size is not None and size < config.batch_size:
            raise UsageError(f"{flag} {size} is smaller than --batch-size {config.batch_size}: no full batch")


def check_writable_directory(what, path):
    """Raises `UsageError` unless `path` is, or can be made, a directory this process can write in."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"{what} {path} is a file, not a directory")
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as error:
        raise UsageError(f"{what} {path} cannot be written: {error.strerror or error}") from error


def check_paths(config):
    """Raises `UsageError` before training for an output or a corpus cache that cannot work.

    A read-only cache is fine (what it holds is read; a corpus it lacks is
    used without caching it), a cache path that is a file is not.
    """
    check_writable_directory("--output", config.output)
    cache = corpora.default_cache_dir()
    if corpora.uses_cache(config.corpus) and os.path.exists(cache) and not os.path.isdir(cache):
        raise UsageError(f"the corpus cache {cache} (TF_MOE_CACHE) is a file, not a directory")


def describe_run(what, config, models=None):
    """The one line printed before training: what runs, on what, for how long, and where results go."""
    moe = f"{config.experts} experts" + (f" in {config.groups} groups" if config.groups else "")
    if models:
        moe = f"the models {', '.join(models)}"
    elif what == _EXPERIMENTS["experts"][1] or what == _EXPERIMENTS["ptb"][1]:
        moe = f"the models {', '.join(language_model.SWEEP_MODELS)}"
    texts = f" (first {config.train_size} texts)" if config.train_size else ""
    steps = f"{config.steps} steps" if config.steps else "a full pass"
    vocabulary = f"{config.vocab_size}-{'word' if config.level == 'word' else 'wordpiece'} vocabulary"
    if config.arch == "transformer":
        body = f"{config.layers} Transformer blocks of {config.units} with {config.heads} heads"
    else:
        body = f"{config.units}-unit LSTMs"
    router = f"router {config.router}" if config.router else "the default router"
    shared = f" and {config.shared_experts} shared" if config.shared_experts else ""
    if config.gate_lr_multiplier != 1:
        router += f", noisy gates learning {config.gate_lr_multiplier:g}x faster"
    return (
        f"Training {what} on {config.corpus}{texts}: {'' if moe.startswith('the') else 'MoE of '}{moe}, "
        f"k={config.k}{shared}, expert hidden {config.expert_hidden}, {router}; {body}; {vocabulary}; "
        f"{config.epochs} epoch{'s' * (config.epochs != 1)} of {steps}, batches of {config.batch_size} x "
        f"{config.seq_len} tokens. Results go to {os.path.join(config.output, '')}"
    )


def ops_warning(rows, tolerance=0.01):
    """A line saying which dense rows' ops per timestep differ from the MoE's by more than `tolerance`, or None."""
    moe = next((row for row in rows if row.get("cv_load") is not None), None)
    if moe is None:
        return None
    off = [
        f"{row['model']} ({row['ops_per_timestep']:,})" for row in rows
        if row.get("cv_load") is None
        and abs(row["ops_per_timestep"] - moe["ops_per_timestep"]) > tolerance * moe["ops_per_timestep"]
    ]
    if not off:
        return None
    return (f"warning: not matched: {', '.join(off)} differ from the MoE's {moe['ops_per_timestep']:,} ops per "
            f"timestep by more than {tolerance:.0%}.")


# ------------------------------------------------------------- commands ----


def _train(args):
    if args.models and args.task != "lm":
        raise UsageError(f"--models is for `tf-moe train lm`, not {args.task}")
    return _run_training(args, *_TRAININGS[args.task], save_note=True)


def _experiment(args):
    function, what, title = _EXPERIMENTS[args.name]
    _check_experiment_flags(args)
    if args.name == "routers" and args.routers:
        function = functools.partial(function, routers=args.routers)
    elif args.name == "tune":
        function = functools.partial(function, learning_rates=args.learning_rates, dropouts=args.dropouts)
    elif args.name == "diagnose" and args.variants:
        function = functools.partial(function, variants=args.variants)
    elif args.name == "upcycle":
        function = functools.partial(function, extra_steps=args.extra_steps)
    return _run_training(args, function, what, title, save_note=False)


# The experiment flags and the experiments that take them.
_EXPERIMENT_FLAGS = {
    "models": ("experts", "ptb", "tune"),
    "routers": ("routers",),
    "learning_rates": ("tune",),
    "dropouts": ("tune",),
    "variants": ("diagnose",),
    "extra_steps": ("upcycle",),
}


def _check_experiment_flags(args):
    for flag, experiments in _EXPERIMENT_FLAGS.items():
        if getattr(args, flag) and args.name not in experiments:
            raise UsageError(f"--{flag.replace('_', '-')} is for `tf-moe experiment {' or '.join(experiments)}`, "
                             f"not {args.name}")
    if args.name == "tune" and not (args.models and args.learning_rates and args.dropouts):
        raise UsageError("tune needs --models, --learning-rates and --dropouts")
    if args.name == "upcycle" and not args.extra_steps:
        raise UsageError("upcycle needs --extra-steps")


def _tuned_jobs(args, config, models):
    """`[(config, [model])]`: each model at the learning rate and dropout of its best row in `--tuned`."""
    if args.command == "train" and args.task == "lm":
        models = models or ["moe", "dense" if config.arch == "transformer" else config.baseline]
    elif not (_is_sweep(args) and models):
        raise UsageError("--tuned is for `tf-moe train lm` and `experiment experts|ptb --models ...`")
    if not os.path.isfile(args.tuned):
        raise UsageError(f"--tuned {args.tuned}: no such file")
    rows = [row for row in results.load_rows(args.tuned) if row["settings"].get("arch", "lstm") == config.arch]
    jobs = []
    for label in models:
        best = results.best_settings(rows, label)
        if best is None:
            raise UsageError(f"--tuned {args.tuned} has no {config.arch} rows of {label}")
        jobs.append((dataclasses.replace(config, **best), [label]))
    return jobs


def _report(args):
    if not os.path.isfile(args.page):
        raise UsageError(f"{args.page}: no such file")
    try:
        stale = results.report(args.page, args.results_dir, check=args.check)
    except (OSError, ValueError) as error:
        raise UsageError(error) from error
    if args.check:
        print(f"{args.page}: {'out of date: ' + ', '.join(stale) if stale else 'up to date'}")
        return 1 if stale else 0
    print(f"{args.page}: rendered {', '.join(stale) if stale else 'nothing new'}")
    return 0


def _plot(args):
    for path in args.results:
        if not os.path.isfile(path):
            raise UsageError(f"{path}: no such file")
    try:
        print(f"Wrote {reports.plot_curves(args.results, args.output, args.title)}")
    except (ImportError, OSError, KeyError, ValueError) as error:
        raise UsageError(error) from error
    return 0


def _run_training(args, function, what, title, save_note):
    config = config_from_args(args)
    check_config(args, config)
    check_paths(config)
    models = getattr(args, "models", None)
    for label in models or (language_model.SWEEP_MODELS if _is_sweep(args) else ()):
        try:
            language_model.variant_arguments(label, config)
        except ValueError as error:
            raise UsageError(f"--models: {error}") from error
    jobs = _tuned_jobs(args, config, models) if args.tuned else [(config, models)]
    print(describe_run(what, config, models), flush=True)
    rows = []
    for seed_value in args.seeds or [config.seed]:
        for job_config, job_models in jobs:
            seeded = dataclasses.replace(job_config, seed=seed_value)
            try:
                seed_rows = function(seeded, job_models) if job_models else function(seeded)
            except (corpora.CorpusError, ImportError, OSError) as error:
                raise UsageError(error) from error
            if args.results:
                experiment = f"{args.command} {getattr(args, 'task', None) or args.name}"
                results.append_rows(args.results, [results.stamp(row, experiment) for row in seed_rows])
            rows += seed_rows
    print(f"\n{title}: validation perplexity; load balance of the MoE layers on the last epoch's"
          " training batches and (valid_*) on the validation set")
    print(reports.format_table(rows))
    for row in rows:
        if "example" in row:
            print(f"{row['model']}: {row['example']}")
    sentence = reports.verdict(rows) if args.command == "train" and args.task == "lm" else None
    if sentence:
        print(f"\n{sentence}")
    warning = ops_warning(rows) if args.command == "train" else None
    if warning:
        print(warning)
    if args.results:
        print(f"Appended {len(rows)} rows to {args.results}")
    if save_note:
        print(f"\nSaved the models, the vocabulary and the results under {os.path.join(config.output, '')}")
    runs = os.path.join(config.output, "runs")
    print(f"TensorBoard logs: {os.path.join(runs, '')}  (view them with `tensorboard --logdir {shlex.quote(runs)}`)")
    return 0


def _export(args):
    if args.kind in ("lm", "mt") and not args.vocab:
        raise UsageError(f"--vocab is required for {args.kind}: the vocabulary saved with the model "
                         f"(e.g. saved_models/{args.kind}_vocab.txt)")
    for path in (args.model, args.vocab):
        if path is not None and not os.path.isfile(path):
            raise UsageError(f"{path}: no such file")
    try:
        model = export.load_model(args.model)
        export_dir = export.version_dir(args.output, args.name or args.kind, args.version)
        if args.kind == "lm":
            export.export_language_model(model, data.load_vocabulary(args.vocab), export_dir, top_k=args.top_k)
        elif args.kind == "mt":
            export.export_translation_model(model, data.WordpieceTokenizer(args.vocab), export_dir,
                                            max_length=args.max_length, beam_size=args.beam_size)
        else:
            export.export_keras_model(model, export_dir)
    except (ValueError, OSError) as error:
        raise UsageError(error) from error
    print(f"Exported to {export_dir}")
    return 0


# ------------------------------------------------------------------ main ----


class _Formatter(logging.Formatter):
    def format(self, record):
        message = super().format(record)
        return message if record.levelno == logging.INFO else f"{record.levelname.lower()}: {message}"


def main(argv=None):
    """Entry point of `tf-moe` (through `_tf_moe_launcher`) and `python -m tf_moe.reproduction.cli`."""
    parser = _parser()
    args = parser.parse_args(argv)
    logger = logging.getLogger("tf_moe")
    handler, level = logging.StreamHandler(sys.stderr), logger.level
    handler.setFormatter(_Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if args.verbosity else logging.INFO)
    try:
        with warnings.catch_warnings():
            if not args.verbosity:
                # Keras notes that tf.data input is not reshuffled by `fit`
                # and that a validation pass ended its dataset: both intended.
                warnings.filterwarnings("ignore", message=".*shuffle=True.*")
                warnings.filterwarnings("ignore", message=".*input ran out of data.*")
            return args.run(args)
    except UsageError as error:
        if args.verbosity:
            raise
        parser.exit(2, f"tf-moe {args.command}: error: {' '.join(str(error).split())}\n")
    except KeyboardInterrupt:
        parser.exit(130, "\ntf-moe: interrupted (a training run resumes from its last finished epoch"
                         " when rerun with the same flags)\n")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


if __name__ == "__main__":
    sys.exit(main())
