"""Tests of tf_moe/_startup.py: TF_CPP_MIN_LOG_LEVEL also covers TensorFlow's start-up lines."""

import os
import subprocess
import sys

import pytest

from tf_moe import _startup

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CAPTURED = (
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
    "I0000 00:00:1795968523.140166    7237 port.cc:153] oneDNN custom operations are on.\n"
    "I0000 00:00:1795968523.183012    7237 cpu_feature_guard.cc:227] This TensorFlow binary is optimized.\n"
    "To enable the following instructions: AVX2 FMA, rebuild TensorFlow.\n"
    "W0000 00:00:1795968523.2    7237 loader.cc:9] a warning\n"
    "something else printed while importing\n"
    "E0000 00:00:1795968526.382388    7237 cuda_platform.cc:52] failed call to cuInit: UNKNOWN ERROR (303)\n"
    "F0000 00:00:1795968526.4    7237 main.cc:1] fatal\n"
)


def test_records_below_the_level_are_dropped_with_their_continuation_lines():
    assert _startup.filter_log_lines(CAPTURED, 0) == CAPTURED
    banner, info, info2, continuation, warning, other, error, fatal = CAPTURED.splitlines(keepends=True)
    assert _startup.filter_log_lines(CAPTURED, 1) == banner + warning + other + error + fatal
    assert _startup.filter_log_lines(CAPTURED, 2) == banner + error + fatal
    assert _startup.filter_log_lines(CAPTURED, 3) == banner + fatal
    # Without a kept record, absl's banner goes too.
    assert _startup.filter_log_lines(banner + info + info2 + continuation, 1) == ""
    assert _startup.filter_log_lines("plain output\n", 3) == "plain output\n"


@pytest.mark.parametrize("value, level", [(None, 0), ("0", 0), ("2", 2), ("3", 3), ("9", 3), ("-1", 0), ("x", 0)])
def test_min_log_level(value, level):
    assert _startup.min_log_level({} if value is None else {"TF_CPP_MIN_LOG_LEVEL": value}) == level


def _import_stderr(code, level):
    env = {key: value for key, value in os.environ.items() if key != "TF_CPP_MIN_LOG_LEVEL"}
    env.update(PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL=level)
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stderr


def test_importing_tf_moe_at_level_3_prints_nothing():
    assert _import_stderr("import tf_moe; import tensorflow as tf; tf.config.list_physical_devices()", "3") == ""


def test_tensorflows_start_up_lines_are_in_the_format_the_filter_knows():
    # Pins TensorFlow's output: everything it prints while loading (if
    # anything) is absl records or the banner, which level 3 removes.
    stderr = _import_stderr("import tensorflow", "0")
    assert _startup.filter_log_lines(stderr, 3) == "", stderr
