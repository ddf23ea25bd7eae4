"""Tests of the `tf-moe` command line: flags, mistakes, a quiet start, and real runs on the embedded corpus."""

import glob
import json
import os
import re
import subprocess
import sys

import keras
import numpy as np
import pytest

import _tf_moe_launcher
import tf_moe
from tf_moe import data
from tf_moe.reproduction import cli, corpora, language_model, reports
from tf_moe.reproduction.config import Config
from tf_moe.models import Seq2SeqDecoder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A line of TensorFlow's C++ logging (absl format), or the CUDA start-up error.
CPP_LOG_LINE = re.compile(r"^[IWEF]\d{4} |cuInit|absl::InitializeLog", re.MULTILINE)


def run_tf_moe(args, cwd, timeout=900):
    """Runs `tf-moe ARGS` from this checkout in a fresh process, as a user's shell would."""
    env = {key: value for key, value in os.environ.items() if key != "TF_CPP_MIN_LOG_LEVEL"}
    env["PYTHONPATH"] = ROOT
    return subprocess.run(
        [sys.executable, "-m", "_tf_moe_launcher", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
    )


def test_flags_map_onto_the_config():
    args = cli._parser().parse_args(
        ["train", "lm", "--experts", "32", "--k", "2", "--hierarchical", "4", "--steps", "0", "--batch-size", "8",
         "--dropout", "0.25", "--load-weight", "0", "--progress", "2", "-v"]
    )
    config = cli.config_from_args(args)
    assert (config.experts, config.k, config.groups, config.steps, config.batch_size) == (32, 2, 4, None, 8)
    assert (config.dropout, config.load_weight, config.verbose, args.verbosity) == (0.25, 0.0, 2, 1)
    # `train lm` is the main job's word-level protocol unless --level says otherwise.
    assert (config.level, config.epochs, config.vocab_size) == ("word", 1, 5000)
    wordpiece = cli.config_from_args(cli._parser().parse_args(["train", "lm", "--level", "wordpiece"]))
    assert (wordpiece.level, wordpiece.epochs, wordpiece.vocab_size) == ("wordpiece", Config().epochs, 4000)
    sweep = cli.config_from_args(cli._parser().parse_args(["experiment", "experts"]))
    assert sweep.level == "wordpiece"
    quick = cli.config_from_args(cli._parser().parse_args(["train", "mt", "--quick", "--epochs", "2"]))
    assert quick.corpus == "web-sparv" and quick.epochs == 2 and quick.steps == Config.quick().steps
    transformer = cli.config_from_args(cli._parser().parse_args(["train", "lm", "--arch", "transformer"]))
    assert (transformer.arch, transformer.level, transformer.vocab_size, transformer.k) == ("transformer", "word", 5000, 2)
    ptb = cli.config_from_args(cli._parser().parse_args(["experiment", "ptb", "--arch", "transformer", "--epochs", "2"]))
    assert (ptb.corpus, ptb.vocab_size, ptb.seq_len, ptb.epochs, ptb.weight_decay) == ("ptb", 10_000, 64, 2, 0.01)
    shared = cli.config_from_args(cli._parser().parse_args(["train", "lm", "--k", "2", "--shared-experts", "2"]))
    assert (shared.k, shared.shared_experts, Config().shared_experts) == (2, 2, 0)
    # -v before or after the command.
    assert cli._parser().parse_args(["-v", "train", "lm"]).verbosity == 1
    assert cli._parser().parse_args(["train", "lm", "-vv"]).verbosity == 2


BAD_FLAGS = [
    (["train", "lm", "--steps", "-1"], "argument --steps: must be an integer >= 0, got '-1'"),
    (["train", "lm", "--steps", "1.5"], "argument --steps: expected an integer, got '1.5'"),
    (["train", "lm", "--epochs", "0"], "argument --epochs: must be an integer >= 1, got '0'"),
    (["train", "lm", "--epochs", "-1"], "argument --epochs: must be an integer >= 1"),
    (["train", "lm", "--experts", "0"], "argument --experts: must be an integer >= 1"),
    (["train", "lm", "--k", "-2"], "argument --k: must be an integer >= 1"),
    (["train", "lm", "--hierarchical", "0"], "argument --hierarchical: must be an integer >= 1"),
    (["train", "lm", "--units", "0"], "argument --units: must be an integer >= 1"),
    (["train", "lm", "--expert-hidden", "-3"], "argument --expert-hidden: must be an integer >= 1"),
    (["train", "lm", "--batch-size", "0"], "argument --batch-size: must be an integer >= 1"),
    (["train", "lm", "--seq-len", "1"], "argument --seq-len: must be an integer >= 2"),
    (["train", "lm", "--vocab-size", "4"], "argument --vocab-size: must be an integer >= 5"),
    (["train", "lm", "--learning-rate", "0"], "argument --learning-rate: must be > 0"),
    (["train", "lm", "--learning-rate", "-0.001"], "argument --learning-rate: must be > 0"),
    (["train", "lm", "--learning-rate", "nan"], "argument --learning-rate: expected a finite number"),
    (["train", "lm", "--learning-rate", "inf"], "argument --learning-rate: expected a finite number"),
    (["train", "lm", "--learning-rate", "fast"], "argument --learning-rate: expected a number, got 'fast'"),
    (["train", "lm", "--warmup", "0"], "argument --warmup: must be an integer >= 1"),
    (["train", "lm", "--dropout", "1"], "argument --dropout: must be in [0, 1), got '1'"),
    (["train", "lm", "--dropout", "-0.1"], "argument --dropout: must be in [0, 1)"),
    (["train", "lm", "--importance-weight", "-1"], "argument --importance-weight: must be >= 0"),
    (["train", "lm", "--load-weight", "inf"], "argument --load-weight: expected a finite number"),
    (["train", "lm", "--train-size", "0"], "argument --train-size: must be an integer >= 1"),
    (["train", "lm", "--valid-size", "-5"], "argument --valid-size: must be an integer >= 1"),
    (["train", "mt", "--beam-size", "0"], "argument --beam-size: must be an integer >= 1"),
    (["train", "mt", "--bleu-sentences", "0"], "argument --bleu-sentences: must be an integer >= 1"),
    (["train", "lm", "--seed", "-1"], "argument --seed: must be an integer in [0, 2**32)"),
    (["train", "lm", "--seed", str(2**32)], "argument --seed: must be an integer in [0, 2**32)"),
    (["train", "lm", "--progress", "3"], "argument --progress: invalid choice: 3"),
    (["experiment", "table6", "--steps", "-1"], "argument --steps: must be an integer >= 0"),
    (["train", "speech"], "argument task: invalid choice: 'speech'"),
    (["train", "lm", "--unknown"], "unrecognized arguments: --unknown"),
    (["experiment", "ptb", "--models", "moe-16", "moe-5-h"], "--models: 'moe-5-h'"),
    (["experiment", "experts", "--models", "dense"], "--models: Unknown model 'dense'"),
    (["experiment", "experts", "--quick", "--models", "moe-0"], "--models: 'moe-0': an MoE of k=4 experts"),
    (["experiment", "experts", "--quick", "--k", "2"], "--models: 'moe-256-h': a hierarchical MoE here needs square"),
    (["experiment", "experts", "--models", "moe-1"], "--models: 'moe-1': an MoE of k=4 experts"),
    (["experiment", "ptb", "--models", "moe-0-h"], "--models: 'moe-0-h': a hierarchical MoE of k=4"),
    (["experiment", "routers", "--routers", "softmax"], "argument --routers: invalid choice: 'softmax'"),
    (["experiment", "routers", "--models", "moe-4"], "--models is for `tf-moe experiment experts or ptb or tune`"),
    (["experiment", "table6", "--routers", "switch"], "--routers is for `tf-moe experiment routers`"),
    (["experiment", "routers", "--extra-steps", "5"], "--extra-steps is for `tf-moe experiment upcycle`"),
    (["experiment", "tune", "--models", "moe"], "tune needs --models, --learning-rates and --dropouts"),
    (["experiment", "upcycle", "--arch", "transformer"], "upcycle needs --extra-steps"),
    (["experiment", "diagnose", "--variants", "magic"], "argument --variants: invalid choice: 'magic'"),
    (["train", "lm", "--arch", "rnn"], "argument --arch: invalid choice: 'rnn'"),
    (["train", "lm", "--arch", "transformer", "--hierarchical", "4"], "--hierarchical: the Transformer takes"),
    (["train", "lm", "--arch", "transformer", "--units", "130"], "--units 130 is not a multiple of --heads 4"),
    (["train", "lm", "--arch", "transformer", "--level", "wordpiece"], "--arch transformer is a word-level"),
    (["train", "mt", "--arch", "transformer"], "--arch transformer is a word-level language model"),
    (["train", "lm", "--router", "noisy_top_k", "--hierarchical", "4"], "--router and --hierarchical"),
    (["train", "lm", "--router", "magic"], "argument --router: invalid choice: 'magic'"),
    (["train", "lm", "--seeds", "0", "-1"], "argument --seeds: must be an integer in [0, 2**32)"),
    (["report", "no/such/page.md"], "no/such/page.md: no such file"),
    (["train", "mt", "--models", "moe"], "--models is for `tf-moe train lm`, not mt"),
    (["train", "lm", "--tuned", "no/such/tune.json"], "--tuned no/such/tune.json: no such file"),
    (["experiment", "table6", "--tuned", "t.json"], "--tuned is for `tf-moe train lm`"),
    (["train", "lm", "--arch", "transformer", "--models", "moe-1-wide"], "--models: Unknown model 'moe-1-wide' for the Transformer"),
    (["experiment", "routers", "--hierarchical", "2"], "--hierarchical: the router comparison uses flat MoEs"),
    (["train", "lm", "--level", "char"], "argument --level: invalid choice: 'char'"),
    (["plot", "missing.json", "--output", "x.png"], "missing.json: no such file"),
    (["export", "lm", "m.keras", "--vocab", "v.txt", "--version", "0"], "argument --version: must be an integer >= 1"),
    (["export", "lm", "m.keras", "--vocab", "v.txt", "--top-k", "0"], "argument --top-k: must be an integer >= 1"),
    (["export", "mt", "m.keras", "--vocab", "v.txt", "--max-length", "2"], "argument --max-length: must be an integer >= 3"),
    (["export", "mt", "m.keras", "--vocab", "v.txt", "--beam-size", "0"], "argument --beam-size: must be an integer >= 1"),
    # Flags that are fine alone but not together.
    (["train", "lm", "--k", "20"], "--k 20 exceeds --experts 16"),
    (["train", "lm", "--experts", "6", "--hierarchical", "4"], "--experts 6 is not a multiple of --hierarchical 4"),
    (["train", "lm", "--experts", "16", "--hierarchical", "8", "--k", "3"], "--k 3 exceeds the 8 groups or the 2 experts"),
    (["train", "lm", "--shared-experts", "-1"], "argument --shared-experts: must be an integer >= 0"),
    (["train", "mt", "--shared-experts", "1"], "--shared-experts is for the language models"),
    (["train", "mt", "--corpus", "ptb"], "--corpus ptb is not a translation corpus; choose from web-sparv"),
    (["train", "lm", "--corpus", "web-sparv"], "--corpus web-sparv is not a lm corpus; choose from web, kjv, ptb"),
    (["train", "lm", "--batch-size", "64", "--train-size", "10"], "--train-size 10 is smaller than --batch-size 64"),
    (["train", "lm", "--quick", "--batch-size", "128"], "--valid-size 64 is smaller than --batch-size 128"),
    (["export", "lm", "m.keras"], "--vocab is required for lm"),
    (["export", "keras", "no/such/model.keras"], "no/such/model.keras: no such file"),
]


@pytest.mark.parametrize("argv, message", BAD_FLAGS, ids=[" ".join(argv) for argv, _ in BAD_FLAGS])
def test_a_mistake_prints_one_line_and_exits_with_status_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("tf-moe") and message in err, err


def test_a_corpus_that_cannot_be_fetched_is_one_line_or_with_v_a_traceback(monkeypatch, capsys):
    def unavailable(name, split="train", cache_dir=None):
        raise corpora.CorpusUnavailableError("The Debian package `sword-text-web` is needed,\nbut apt-get is missing.")

    monkeypatch.setattr(language_model.corpora, "load_lm_corpus", unavailable)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "lm", "--quick"])
    assert exit_info.value.code == 2
    out, err = capsys.readouterr()
    assert out.startswith("Training an MoE language model") and out.count("\n") == 1  # what would have run
    assert err == "tf-moe train: error: The Debian package `sword-text-web` is needed, but apt-get is missing.\n"
    with pytest.raises(cli.UsageError, match="sword-text-web"):
        cli.main(["train", "lm", "--quick", "-v"])


def test_an_output_or_cache_that_cannot_be_written_stops_before_training(tmp_path, monkeypatch, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    temporary_file = cli.tempfile.TemporaryFile

    def refuse_read_only(*args, dir=None, **kwargs):  # as a read-only directory would, even for root
        if dir is not None and os.path.abspath(dir) == str(read_only):
            raise PermissionError(13, "Permission denied")
        return temporary_file(*args, dir=dir, **kwargs)

    monkeypatch.setattr(cli.tempfile, "TemporaryFile", refuse_read_only)
    for argv, environment, message in [
        (["--output", str(a_file)], {}, f"--output {a_file} is a file, not a directory"),
        (["--output", str(read_only)], {}, f"--output {read_only} cannot be written: Permission denied"),
        (["--output", str(tmp_path / "out")], {"TF_MOE_CACHE": str(a_file)},
         f"the corpus cache {a_file} (TF_MOE_CACHE) is a file, not a directory"),
    ]:
        for name, value in environment.items():
            monkeypatch.setenv(name, value)
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["train", "lm", "--quick", *argv])
        assert exit_info.value.code == 2
        out, err = capsys.readouterr()
        assert out == "" and err == f"tf-moe train: error: {message}\n"
        for name in environment:
            monkeypatch.delenv(name)


def test_launcher_sets_tensorflows_log_level_from_v(monkeypatch):
    assert _tf_moe_launcher.verbosity(["train", "lm", "--quick"]) == 0
    assert _tf_moe_launcher.verbosity(["-v", "train", "lm", "--verbose"]) == 2
    assert _tf_moe_launcher.verbosity(["train", "lm", "-vvv"]) == 3
    assert _tf_moe_launcher.verbosity(["export", "lm", "--", "-v"]) == 0
    assert _tf_moe_launcher.verbosity(["train", "lm", "--vocab-size", "100"]) == 0
    levels = []
    monkeypatch.setattr(cli, "main", lambda argv: levels.append(os.environ["TF_CPP_MIN_LOG_LEVEL"]) or 0)
    # Restored afterwards; that the launcher's setting works is tests/test_performance.py's.
    monkeypatch.delenv("TF_CPU_ALLOCATOR_USE_BFC", raising=False)
    for argv, environment, level in [
        ([], None, "3"),  # default: TensorFlow's C++ logs hidden
        (["-v"], None, "1"),  # warnings and errors
        (["-vv"], "3", "0"),  # everything, whatever the environment said
        ([], "1", "1"),  # no -v: the environment's level is kept
    ]:
        if environment is None:
            monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL", raising=False)
        else:
            monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", environment)
        assert _tf_moe_launcher.main(["train", "lm", *argv]) == 0
        assert levels.pop() == level
        assert os.environ["TF_CPU_ALLOCATOR_USE_BFC"] == "1"


def test_without_the_paper_extra_the_command_names_it_in_one_line(monkeypatch, capsys):
    monkeypatch.setattr(cli, "main", lambda argv: pytest.fail("the command ran without its packages"))
    monkeypatch.delenv("TF_CPU_ALLOCATOR_USE_BFC", raising=False)
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "3")
    for name in ("tqdm", "sacrebleu"):
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed
    assert _tf_moe_launcher.main(["train", "lm", "--quick"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == (
        "tf-moe: error: the command needs tf_moe's `paper` extra (missing: sacrebleu, tqdm): "
        'pip install "tf_moe[paper]"\n'
    )


def test_help_and_version_start_quietly(tmp_path):
    result = run_tf_moe(["--help"], tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr
    assert not CPP_LOG_LINE.search(result.stdout + result.stderr), result.stderr
    assert result.stderr == ""
    for command in ("train", "experiment", "export", "--verbose", "tf-moe train lm --quick"):
        assert command in result.stdout
    result = run_tf_moe(["--version"], tmp_path, timeout=300)
    assert (result.returncode, result.stdout, result.stderr) == (0, f"tf-moe {tf_moe.__version__}\n", "")


def _perplexity(model, dataset):
    """exp(mean cross-entropy of the non-padding targets), in numpy."""
    total, count = 0.0, 0
    for inputs, targets in dataset:
        logits = np.asarray(model(inputs, training=False), "float64")
        log_probs = logits - logits.max(-1, keepdims=True)
        log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
        targets = np.asarray(targets)
        nll = -np.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
        total += nll[targets != 0].sum()
        count += (targets != 0).sum()
    return float(np.exp(total / count))


def test_quick_lm_run_is_quiet_prints_its_plan_results_and_logs_and_saves_the_models(tmp_path):
    out = tmp_path / "saved"
    # The wordpiece protocol; the default word-level one is tests/test_experiments.py's.
    result = run_tf_moe(
        ["train", "lm", "--quick", "--level", "wordpiece", "--progress", "0", "--output", str(out)], tmp_path
    )
    assert result.returncode == 0, result.stderr
    # No TensorFlow C++ log line, no cuInit error: on stderr at most the
    # progress bars of slow steps and the corpus source of a new cache.
    assert not CPP_LOG_LINE.search(result.stdout + result.stderr), result.stderr
    other = [line for line in re.split(r"[\r\n]+", result.stderr)
             if line.strip() and not line.startswith(("Counting words", "Learning a vocabulary", "Reading "))
             and not re.fullmatch(r"[\w-]+: valid perplexity [\d.]+, test [\d.]+ \(\d+ training tokens, \d+ s\)", line)]
    assert not other, result.stderr
    lines = result.stdout.splitlines()
    config = Config.quick(output=str(out), verbose=0)
    assert lines[0] == cli.describe_run(cli._TRAININGS["lm"][1], config)
    assert lines[0].endswith(f"Results go to {out}{os.sep}") and "4 experts, k=2" in lines[0]

    # The printed table is the saved results, one row per model.
    results = json.load(open(out / "lm_results.json"))
    assert results["config"] == {**vars(config), "output": str(out)}
    table = reports.format_table(results["rows"]).splitlines()
    start = lines.index(table[0])
    assert lines[start:start + len(table)] == table and len(table) == 4
    assert table[0].startswith("| model | params | ops_per_timestep | valid_perplexity |")
    assert reports.verdict(results["rows"]) in lines  # which model is ahead, in words
    moe, wide = results["rows"]
    assert (moe["model"], wide["model"].replace("-", "_")) == ("moe", "moe_1_wide")
    assert moe["cv_load"] >= 0 and moe["max_over_mean_load"] >= 1 and wide["cv_load"] is None
    assert abs(moe["ops_per_timestep"] - wide["ops_per_timestep"]) <= 0.1 * wide["ops_per_timestep"]
    runs = out / "runs"
    assert lines[-1] == f"TensorBoard logs: {runs}{os.sep}  (view them with `tensorboard --logdir {runs}`)"
    for row in results["rows"]:
        name = row["model"].replace("-", "_")
        assert glob.glob(str(runs / f"lm_{name}_seed0" / "logs" / "train" / "events.out.tfevents.*"))

    # The saved models give the perplexity the table reports on the validation texts.
    tokenizer = data.WordpieceTokenizer(str(out / "lm_vocab.txt"))
    assert tokenizer.get_vocabulary()[:4] == ["[PAD]", "[UNK]", "[START]", "[END]"]
    valid = data.lm_dataset(corpora.load_lm_corpus("web", "valid")[: config.valid_size], tokenizer,
                            config.seq_len, config.batch_size, shuffle=False, fixed_length=True)
    for row in results["rows"]:
        model = keras.models.load_model(out / f"lm_{row['model'].replace('-', '_')}.keras")
        assert model.output_shape[-1] == tokenizer.vocabulary_size
        np.testing.assert_allclose(_perplexity(model, valid), row["valid_perplexity"], rtol=1e-4)


@pytest.mark.slow
def test_quick_mt_run_scores_bleu_and_saves_a_decodable_model(tmp_path, capsys):
    assert cli.main(["train", "mt", "--quick", "--progress", "0", "--output", str(tmp_path)]) == 0
    results = json.load(open(tmp_path / "mt_results.json"))
    assert [row["model"] for row in results["rows"]] == ["mt_moe", "mt_dense"]
    assert all(0 <= row["test_bleu"] <= 100 for row in results["rows"])
    assert reports.format_table(results["rows"]) in capsys.readouterr().out
    model = keras.models.load_model(tmp_path / "mt_moe.keras")
    decoder = Seq2SeqDecoder(model, start_id=2, end_id=3, max_length=5)
    assert decoder.greedy(np.array([[2, 7, 8, 3]], "int32")).shape == (1, 5)


TINY = ["--quick", "--progress", "0", "--steps", "1", "--train-size", "64", "--valid-size", "32",
        "--batch-size", "16", "--seq-len", "8", "--vocab-size", "100"]


@pytest.mark.slow
def test_experiment_table6_trains_each_weighting(tmp_path, capsys):
    assert cli.main(["experiment", "table6", *TINY, "--output", str(tmp_path)]) == 0
    (path,) = glob.glob(str(tmp_path / "table6*_results.json"))
    results = json.load(open(path))
    weights = [(row["w_importance"], row["w_load"]) for row in results["rows"]]
    assert weights == [(0.0, 0.0), (0.2, 0.0), (0.0, 0.2), (0.1, 0.1), (0.01, 0.01), (1.0, 1.0)]
    out = capsys.readouterr().out
    assert out.startswith("Training the MoE language model at each balancing-loss weighting")
    assert reports.format_table(results["rows"]) in out and "Table 6" in out
    # The same model each time: only the loss weights differ.
    assert len({(row["params"], row["ops_per_timestep"]) for row in results["rows"]}) == 1
    assert len(os.listdir(tmp_path / "runs")) == 6


@pytest.mark.slow
def test_experiment_experts_sweeps_at_fixed_ops(tmp_path, capsys):
    assert cli.main(["experiment", "experts", *TINY, "--output", str(tmp_path)]) == 0
    (path,) = glob.glob(str(tmp_path / "sweep*_results.json"))
    results = json.load(open(path))
    rows = {row["model"]: row for row in results["rows"]}
    assert list(rows) == ["moe-4", "moe-32", "moe-256", "moe-256-h", "moe-1-wide", "moe-1-deep", "4xlstm"]
    assert rows["moe-4"]["params"] < rows["moe-32"]["params"] < rows["moe-256"]["params"]
    out = capsys.readouterr().out
    assert reports.format_table(results["rows"]) in out and "Figure 2" in out


@pytest.mark.slow
def test_experiment_routers_compares_routers_at_equal_expert_ops(tmp_path, capsys):
    argv = ["experiment", "routers", *TINY, "--routers", "loss_free", "hash", "--output", str(tmp_path)]
    assert cli.main(argv) == 0
    results = json.load(open(tmp_path / "routers_web_results.json"))
    rows = {row["model"]: row for row in results["rows"]}
    assert list(rows) == ["loss_free", "hash"]
    # The hash router's one expert is k times wider: the same expert ops;
    # the routers' own d * n differ (the hash router has none).
    units, experts = results["config"]["units"], results["config"]["experts"]
    assert rows["hash"]["ops_per_timestep"] == rows["loss_free"]["ops_per_timestep"] - units * experts
    for row in rows.values():
        assert 1 < row["valid_perplexity"] < results["config"]["vocab_size"] and row["step_ms"] > 0
    out = capsys.readouterr().out
    assert out.startswith("Training the MoE language model with each router at equal ops per timestep")
    assert reports.format_table(results["rows"]) in out and "step_ms" in out
