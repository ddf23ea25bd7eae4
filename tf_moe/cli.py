"""The `tf-moe` command line: train the paper's models, rerun its experiments.

    tf-moe train lm            # MoE LSTM LM vs its matched dense baseline
    tf-moe train mt            # MoE seq2seq vs dense, BLEU on En->Es
    tf-moe experiment table6   # the six balancing-loss weightings
    tf-moe experiment experts  # 4/32/256/256-h experts vs baselines, fixed ops
    tf-moe experiment ptb      # Penn Treebank, word level: MoEs vs dense baselines
    tf-moe plot saved_models/sweep_ptb_results.json --output docs/ptb_curves.png
    tf-moe train lm --quick    # a smoke run of seconds
    tf-moe export lm saved_models/lm_moe.keras --vocab saved_models/lm_vocab.txt
                               # SavedModel for TF Serving (docs/serving.md)

Models are saved under `--output` (default `saved_models/`), TensorBoard logs
under `<output>/runs/`. An interrupted run resumes from its last finished
epoch when rerun with the same flags.
"""

import argparse
import dataclasses
import os
import sys
import warnings


def _parser():
    from tf_moe.experiments import Config

    defaults = Config()
    parser = argparse.ArgumentParser(prog="tf-moe", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    def add_flags(sub):
        sub.add_argument("--quick", action="store_true", help="tiny smoke run (seconds); other flags still apply")
        sub.add_argument("--corpus", help=f"embedded corpus (lm: web, kjv, ptb; mt: web-sparv); default {defaults.corpus} / web-sparv")
        sub.add_argument("--level", choices=("wordpiece", "word"),
                         help="lm: wordpieces of each text alone (default), or the word-level "
                              "stream protocol of the Penn Treebank benchmark (10k words, <eos>, "
                              "stateful LSTMs; sets its defaults: 13 epochs, segments of 35)")
        sub.add_argument("--experts", type=int, help=f"experts per MoE layer (default {defaults.experts})")
        sub.add_argument("--k", type=int, help=f"experts per token (per level if hierarchical; default {defaults.k})")
        sub.add_argument("--hierarchical", type=int, metavar="GROUPS", dest="groups",
                         help="use a hierarchical MoE with this many groups of experts/GROUPS experts")
        sub.add_argument("--units", type=int, help=f"LSTM/embedding width (default {defaults.units})")
        sub.add_argument("--expert-hidden", type=int, help=f"hidden width of each expert (default {defaults.expert_hidden})")
        sub.add_argument("--baseline", choices=("moe-1-wide", "moe-1-deep", "4xlstm"),
                         help=f"dense baseline of the LM (default {defaults.baseline})")
        sub.add_argument("--epochs", type=int, help=f"epochs (default {defaults.epochs})")
        sub.add_argument("--steps", type=int, help=f"steps per epoch; 0 for full passes (default {defaults.steps})")
        sub.add_argument("--batch-size", type=int, help=f"default {defaults.batch_size}")
        sub.add_argument("--seq-len", type=int, help=f"max tokens per sequence (default {defaults.seq_len})")
        sub.add_argument("--vocab-size", type=int, help=f"wordpiece vocabulary size (default {defaults.vocab_size})")
        sub.add_argument("--learning-rate", type=float, help=f"peak Adam rate (default {defaults.learning_rate})")
        sub.add_argument("--warmup", type=int, help=f"warm-up steps (default {defaults.warmup})")
        sub.add_argument("--train-size", type=int, help="use only the first N training texts")
        sub.add_argument("--beam-size", type=int, help=f"mt: beam width for BLEU (default {defaults.beam_size})")
        sub.add_argument("--bleu-sentences", type=int, help=f"mt: test sentences scored (default {defaults.bleu_sentences})")
        sub.add_argument("--output", help=f"where models, results and logs go (default {defaults.output})")
        sub.add_argument("--seed", type=int, help="random seed (default 0)")
        sub.add_argument("--verbose", type=int, choices=(0, 1, 2), help="Keras progress: 0 silent, 1 bar, 2 line per epoch")

    train = commands.add_parser("train", help="train a model and its matched dense baseline")
    train.add_argument("task", choices=("lm", "mt"))
    add_flags(train)
    experiment = commands.add_parser("experiment", help="rerun a reproduction of docs/results.md")
    experiment.add_argument("name", choices=("table6", "experts", "ptb"))
    add_flags(experiment)
    experiment.add_argument("--models", nargs="+", metavar="MODEL",
                            help="experts/ptb: models to train: moe-<n>, moe-<n>-h (hierarchical), "
                                 "moe-1-wide, moe-1-deep, 4xlstm")
    plot = commands.add_parser("plot", help="plot validation perplexity against training tokens")
    plot.add_argument("results", nargs="+", help="result JSON files written by train/experiment")
    plot.add_argument("--output", required=True, help="the PNG to write")
    plot.add_argument("--title", help="plot title")
    from tf_moe.export import add_arguments as add_export_arguments

    add_export_arguments(commands.add_parser("export", help="export a trained model for TF Serving"))
    return parser


def config_from_args(args):
    """The `Config` that command-line arguments ask for."""
    from tf_moe.experiments import Config

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
    elif getattr(args, "level", None) == "word":
        settings.update(Config.WORD_LEVEL)
    if args.quick:
        settings.update(Config.QUICK)
    return Config(**{**settings, **flags})


def main(argv=None):
    """Entry point of `tf-moe` and `python -m tf_moe.cli`."""
    args = _parser().parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # Keras warns that tf.data input is not reshuffled by `fit` and that a
    # validation pass ended its dataset: both are intended here.
    warnings.filterwarnings("ignore", message=".*shuffle=True.*")
    warnings.filterwarnings("ignore", message=".*input ran out of data.*")
    if args.command == "export":
        from tf_moe.export import run

        run(args)
        return 0
    if args.command == "plot":
        from tf_moe.experiments import plot_curves

        print(f"Wrote {plot_curves(args.results, args.output, args.title)}")
        return 0
    from tf_moe import experiments

    config = config_from_args(args)
    if args.command == "train":
        rows = experiments.train_lm(config) if args.task == "lm" else experiments.train_mt(config)
        title = f"{args.task}: MoE vs computationally matched dense baseline"
    elif args.name == "table6":
        rows = experiments.table6(config)
        title = "Table 6: balancing-loss weights"
    else:
        rows = experiments.expert_sweep(config, *([args.models] if args.models else []))
        title = f"Figure 2 on {config.corpus} ({config.level} level): experts at fixed ops per timestep"
    print(f"\n{title}: validation perplexity; load balance of the MoE layers on the last epoch's"
          " training batches and (valid_*) on the validation set")
    print(experiments.format_table(rows))
    for row in rows:
        if "example" in row:
            print(f"{row['model']}: {row['example']}")
    if args.command == "train":
        print(f"\nSaved the models and vocabulary under {config.output}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
