"""The benchmark scripts run end to end on tiny sizes (nothing is timed here)."""

import os
import subprocess
import sys

import pytest

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(script, *args):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("PYTHONPATH", None)
    out = subprocess.run(
        [sys.executable, os.path.join(_ROOT, "benchmarks", script), *args],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_parts_benchmark_prints_a_row_per_expert_count():
    out = _run("parts.py", "--experts", "4", "8", "--tokens", "64", "--d", "8", "--h", "16", "--repeats", "1")
    rows = [line for line in out.splitlines() if line.startswith("| 4 |") or line.startswith("| 8 |")]
    assert len(rows) == 2
    # The expert count, gate, dispatch, combine and the experts at two capacities.
    assert all(len(row.strip("|").split("|")) == 6 for row in rows)


@pytest.mark.parametrize(
    "extra", [[], pytest.param(["--jit-compile", "--methods", "moe", "moe_cf1.25"], marks=pytest.mark.slow)]
)
def test_dispatch_benchmark_measures_each_method_against_the_dense_ffn(extra):
    methods = [] if extra else ["--methods", "moe", "experts_only"]
    out = _run("dispatch.py", "--experts", "4", "--tokens", "64", "--d", "8", "--h", "16", "--repeats", "1",
               *methods, *extra)
    rows = [line for line in out.splitlines() if line.startswith("| 4 |")]
    assert len(rows) == 2
    assert not any("error" in row for row in rows), out
