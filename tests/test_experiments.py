"""Tests of the experiment runners (tiny settings) and the curve plot."""

import json
import math

import numpy as np
import pytest

import tf_moe
from tests import numpy_reference as ref
from tf_moe.reproduction import language_model, reports
from tf_moe.reproduction.config import Config


@pytest.fixture(scope="module")
def word_lm_results(tmp_path_factory):
    output = tmp_path_factory.mktemp("word_lm")
    config = Config(**{
        **Config.WORD_LEVEL, **Config.QUICK,
        "corpus": "ptb", "epochs": 2, "k": 4, "output": str(output), "verbose": 0,
    })
    rows = language_model.expert_sweep(config, models=("moe-4", "moe-4-h", "moe-1-wide"))
    return config, rows, output


def test_word_lm_rows_are_matched_and_complete(word_lm_results):
    config, rows, output = word_lm_results
    assert [row["model"] for row in rows] == ["moe-4", "moe-4-h", "moe-1-wide"]
    tokens_per_epoch = None
    for row in rows:
        # Every model sees the same stream: same tokens per epoch, all of them targets.
        assert len(row["curve"]) == config.epochs
        counts = [tokens for tokens, _ in row["curve"]]
        assert counts[1] == 2 * counts[0] and row["train_tokens"] == counts[-1]
        tokens_per_epoch = tokens_per_epoch or counts[0]
        assert counts[0] == tokens_per_epoch
        assert tokens_per_epoch % (config.batch_size * config.seq_len) == 0
        assert math.isclose(row["curve"][-1][1], row["valid_perplexity"], rel_tol=1e-4)
        assert 1 < row["test_perplexity"] < config.vocab_size
    moe, hierarchical, wide = rows
    # k = 4 experts of 64 against one hidden layer of 256: equal up to the gates.
    assert wide["ops_per_timestep"] < moe["ops_per_timestep"] <= wide["ops_per_timestep"] * 1.05
    assert moe["cv_load"] is not None and wide["cv_load"] is None
    saved = json.loads((output / "sweep_ptb_results.json").read_text())
    assert [row["model"] for row in saved["rows"]] == ["moe-4", "moe-4-h", "moe-1-wide"]


def test_plot_writes_a_png(word_lm_results, tmp_path):
    pytest.importorskip("matplotlib")
    _, _, output = word_lm_results
    path = reports.plot_curves([str(output / "sweep_ptb_results.json")], str(tmp_path / "c.png"))
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_bad_model_labels_are_named():
    config = Config(k=4)
    with pytest.raises(ValueError, match="moe-5-h"):
        language_model.variant_arguments("moe-5-h", config)
    with pytest.raises(ValueError, match="dense"):
        language_model.variant_arguments("dense", config)
    with pytest.raises(ValueError, match="moe-4-x"):
        language_model.variant_arguments("moe-4-x", config)
    for label in ("moe-0", "moe-3", "moe-0-h", "moe-1-h"):  # fewer experts than k
        with pytest.raises(ValueError, match=f"'{label}'.* needs at least 4"):
            language_model.variant_arguments(label, config)
    assert language_model.variant_arguments("moe-16-h", config) == dict(num_experts=16, num_groups=4, k=2)
    assert language_model.variant_arguments("moe-16", config) == dict(num_experts=16, num_groups=None)
    assert language_model.variant_arguments("moe", config) == {}
    assert language_model.variant_arguments("4xlstm", config) == dict(model="4xlstm")


def test_word_level_main_job_saves_a_stateless_model_and_its_word_vocabulary(tmp_path):
    import keras

    from tf_moe.data import WordVocabulary, load_vocabulary

    config = Config(**{
        **Config.MAIN_LM, **Config.QUICK,
        "corpus": "web", "output": str(tmp_path), "verbose": 0,
    })
    rows = language_model.train_lm(config, models=["moe"])
    vocab = load_vocabulary(str(tmp_path / "lm_vocab.json"))
    assert isinstance(vocab, WordVocabulary) and vocab.normalize  # raw Bible text
    assert vocab.vocabulary_size == config.vocab_size + 1
    model = keras.models.load_model(str(tmp_path / "lm_moe.keras"))
    assert all(not getattr(layer, "stateful", False) for layer in model.layers)
    ids = vocab.encode(["in the beginning god created", "and"])[None]
    # Any batch size: trained with batches of 16, served one text at a time.
    assert model(ids).shape == (1, ids.shape[1], vocab.vocabulary_size)
    assert rows[0]["train_tokens"] > 0


def test_verdict_names_the_model_ahead_and_by_how_much():
    moe = dict(model="moe", params=1_321_984, ops_per_timestep=526_336, valid_perplexity=48.3, cv_load=0.08)
    wide = dict(model="moe-1-wide", params=526_464, ops_per_timestep=524_288, valid_perplexity=49.3, cv_load=None)
    deep = dict(wide, model="moe-1-deep", valid_perplexity=52.0)
    ahead = reports.verdict([moe, wide, deep])
    assert "48.3 against 49.3 for moe-1-wide" in ahead and ahead.endswith("the MoE is ahead by 1.0 (2.0%).")
    behind = reports.verdict([dict(moe, valid_perplexity=51.0), wide])
    assert "the dense model is ahead by 1.7 (3.4%)" in behind and "--epochs" in behind
    assert reports.verdict([moe]) is None and reports.verdict([wide]) is None


def test_curves_to_plot_draws_each_model_once_from_the_first_results():
    long = {"rows": [{"model": "moe-16", "curve": [[10, 9.0], [20, 8.0]]}, {"model": "moe-1-wide", "curve": [[10, 9.5]]}]}
    short = {"rows": [{"model": "moe-1-wide", "curve": [[10, 9.6]]}, {"model": "moe-4", "curve": [[10, 9.9]]},
                      {"model": "moe-64-h", "curve": []}]}
    assert reports.curves_to_plot([long, short]) == [
        ("moe-16", [10, 20], [9.0, 8.0]), ("moe-1-wide", [10], [9.5]), ("moe-4", [10], [9.9]),
    ]


def test_transformer_pair_over_seeds_writes_traceable_rows(tmp_path, capsys):
    """`train lm --arch transformer --seeds 0 1 --results F`: a row per model and seed, with commit and command."""
    from tf_moe.reproduction import cli, results

    path = tmp_path / "results" / "pair.json"
    # A tuning file: each model trains at its own best learning rate and dropout.
    tuned = str(tmp_path / "tune.json")
    grid = [("moe", 2e-3, 0.0, 50.0), ("moe", 1e-3, 0.1, 60.0), ("dense", 2e-3, 0.0, 70.0), ("dense", 1e-3, 0.1, 65.0)]
    results.append_rows(tuned, [
        {"experiment": "experiment tune", "model": model, "corpus": "ptb", "seed": 0, "valid_perplexity": valid,
         "settings": {"arch": "transformer", "learning_rate": lr, "dropout": dropout}}
        for model, lr, dropout, valid in grid
    ])
    argv = ["train", "lm", "--arch", "transformer", "--quick", "--corpus", "ptb", "--progress", "0",
            "--layers", "1", "--output", str(tmp_path / "out"), "--seeds", "3", "4", "--results", str(path),
            "--tuned", tuned]
    assert cli.main(argv) == 0
    rows = results.load_rows(str(path))
    best = {"moe": (2e-3, 0.0), "dense": (1e-3, 0.1)}
    assert all((row["settings"]["learning_rate"], row["settings"]["dropout"]) == best[row["model"]] for row in rows)
    assert sorted((row["model"], row["seed"]) for row in rows) == [("dense", 3), ("dense", 4), ("moe", 3), ("moe", 4)]
    for row in rows:
        assert row["experiment"] == "train lm" and row["corpus"] == "ptb"
        assert row["command"] == "tf-moe " + " ".join(argv) or row["command"].startswith("tf-moe")
        assert row["commit"] and row["settings"]["arch"] == "transformer" and row["settings"]["layers"] == 1
        assert row["train_tokens"] > 0 and len(row["curve"]) == 1 and 1 < row["valid_perplexity"]
    moe = [row for row in rows if row["model"] == "moe"]
    dense = [row for row in rows if row["model"] == "dense"]
    # The dense twin is matched to the router and the k experts: equal ops.
    assert {row["ops_per_timestep"] for row in moe} == {row["ops_per_timestep"] for row in dense}
    assert all(row["valid_max_over_mean_load"] >= 1 for row in moe)
    out = capsys.readouterr().out
    assert reports.verdict(rows) in out and "(mean of 2 seeds)" in out and "warning: not matched" not in out


@pytest.mark.parametrize("arch", ["lstm", "transformer"])
@pytest.mark.parametrize("variant, logit_stddev, multiplier", [
    ("default", 0.01, 1.0), ("default-zero-start", 0.0, 1.0), ("default-unit-start", 1.0, 1.0),
    ("default-gate-lr-x3", 0.01, 3.0),
])
def test_diagnosis_variants_start_the_default_gate_where_they_say(arch, variant, logit_stddev, multiplier):
    config = Config(**{**Config.QUICK, "arch": arch, "experts": 16, "k": 2})
    label, overrides = language_model._diagnosis_overrides(variant, config)
    router = {} if overrides["router"] is None else {"router": overrides["router"]}
    moe = tf_moe.MoELayer(config.experts, config.k, 8, **router)
    tokens = np.random.default_rng(0).standard_normal((4096, 128)).astype("float32")
    moe(tokens)
    assert label == "moe" and type(moe.router) is tf_moe.TopKGateRouter
    assert moe.router.learning_rate_multiplier == multiplier
    logits = ref.rms_normalize(tokens) @ (moe.router.learning_rate_multiplier * np.asarray(moe.router.w_gate))
    np.testing.assert_allclose(logits.std(), logit_stddev, rtol=0.1)


@pytest.mark.parametrize("arch, labels", [("lstm", ("moe", "moe-1-wide")), ("transformer", ("moe", "dense"))])
def test_shared_experts_reach_both_models_of_a_pair_and_the_rows_settings(arch, labels):
    from tf_moe.reproduction import results

    config = Config(**{**Config.QUICK, "arch": arch, "shared_experts": 2})
    vocabulary = tf_moe.data.WordVocabulary(["<eos>", "<unk>", "the"])
    lm_data = language_model.LMData(vocabulary, make_train=None, valid=None, test=None, stateful=False)
    for label in labels:
        assert language_model._model_arguments(config, lm_data, label, {})["num_shared_experts"] == 2
    assert results.settings_of(config)["shared_experts"] == 2
    # Rows without shared experts keep the settings (and run keys) they had before the flag.
    assert "shared_experts" not in results.settings_of(Config(**Config.QUICK))
