"""Smoke tests of the `tf-moe` command line on the embedded corpus."""

import json
import os

import keras
import numpy as np
import pytest

from tf_moe import cli
from tf_moe.experiments import Config
from tf_moe.models import Seq2SeqDecoder


def test_flags_map_onto_the_config():
    args = cli._parser().parse_args(
        ["train", "lm", "--experts", "32", "--k", "2", "--hierarchical", "4", "--steps", "0", "--batch-size", "8"]
    )
    config = cli.config_from_args(args)
    assert (config.experts, config.k, config.groups, config.steps, config.batch_size) == (32, 2, 4, None, 8)
    assert config.epochs == Config().epochs
    quick = cli.config_from_args(cli._parser().parse_args(["train", "mt", "--quick", "--epochs", "2"]))
    assert quick.corpus == "web-sparv" and quick.epochs == 2 and quick.steps == Config.quick().steps


def test_unknown_task_is_an_argparse_error():
    with pytest.raises(SystemExit):
        cli.main(["train", "speech"])


def test_quick_lm_run_prints_the_table_and_saves_the_models(tmp_path, capsys):
    assert cli.main(["train", "lm", "--quick", "--verbose", "0", "--output", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| moe |" in out and "| moe-1-wide |" in out and "valid_perplexity" in out
    results = json.load(open(os.path.join(tmp_path, "lm_results.json")))
    moe, wide = results["rows"]
    assert 1 < moe["valid_perplexity"] < results["config"]["vocab_size"] * 2
    assert moe["cv_load"] is not None and wide["cv_load"] is None
    assert abs(moe["ops_per_timestep"] - wide["ops_per_timestep"]) <= 0.1 * wide["ops_per_timestep"]
    model = keras.models.load_model(os.path.join(tmp_path, "lm_moe.keras"))
    vocab = open(os.path.join(tmp_path, "lm_vocab.txt")).read().split("\n")
    assert vocab[:4] == ["[PAD]", "[UNK]", "[START]", "[END]"]
    assert model(np.array([[2, 5, 6]], "int32")).shape == (1, 3, len(vocab) - 1)


@pytest.mark.slow
def test_quick_mt_run_scores_bleu_and_saves_a_decodable_model(tmp_path, capsys):
    assert cli.main(["train", "mt", "--quick", "--verbose", "0", "--output", str(tmp_path)]) == 0
    assert "test_bleu" in capsys.readouterr().out
    model = keras.models.load_model(os.path.join(tmp_path, "mt_moe.keras"))
    decoder = Seq2SeqDecoder(model, start_id=2, end_id=3, max_length=5)
    assert decoder.greedy(np.array([[2, 7, 8, 3]], "int32")).shape == (1, 5)
