"""The benchmark scripts run end to end on tiny sizes (nothing is timed here)."""

import os
import subprocess
import sys

import pytest

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _process(script, *args):
    """The finished run of `benchmarks/<script>` on this checkout (PYTHONPATH unset)."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("PYTHONPATH", None)
    return subprocess.run(
        [sys.executable, os.path.join(_ROOT, "benchmarks", script), *args],
        capture_output=True, text=True, env=env, timeout=600,
    )


def _run(script, *args):
    out = _process(script, *args)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


@pytest.mark.parametrize("router", [[], ["--router", "top_k_gate"]])
def test_parts_benchmark_prints_a_row_per_expert_count(router):
    out = _run("parts.py", "--experts", "4", "8", "--tokens", "64", "--d", "8", "--h", "16", "--repeats", "1", *router)
    rows = [line for line in out.splitlines() if line.startswith("| 4 |") or line.startswith("| 8 |")]
    assert len(rows) == 2
    # The expert count, gate, dispatch, combine, the experts split, at two capacities, and the dense FFN.
    assert all(len(row.strip("|").split("|")) == 8 for row in rows)
    assert f"router={router[1] if router else 'noisy_top_k'}" in out


def test_parts_benchmark_names_a_router_it_cannot_time():
    out = _process("parts.py", "--router", "hash")
    assert out.returncode == 2 and "--router" in out.stderr


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


@pytest.mark.slow  # 25 s: three child processes
def test_step_benchmark_times_each_update_against_the_dense_ffn_and_its_floor():
    out = _run("step.py", "--experts", "4", "--tokens", "64", "--d", "8", "--h", "16", "--rounds", "1",
               "--optimizers", "sgd", "adam")
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in out.splitlines()
            if line.startswith("| 4 |")]
    assert not any("error" in cell for row in rows for cell in row), out
    # Whole steps (experts, optimizer, update, MoE ms, dense ms, ratio, roofline ms, ratio to it),
    # then the expert bank's update alone (..., bytes per parameter, update, ms, floor ms, ratio).
    assert [(row[1], row[2]) for row in rows[:4]] == [("sgd", "keras"), ("sgd", "fused"), ("adam", "keras"),
                                                      ("adam", "fused")]
    assert [(row[1], row[3], row[4]) for row in rows[4:]] == [
        ("sgd", "12", "keras"), ("sgd", "12", "fused"), ("adam", "28", "keras"), ("adam", "28", "fused")
    ]
    assert all(len(row) == 8 for row in rows)


def test_update_kernels_benchmark_prints_each_update_against_its_floor_and_its_arithmetic():
    out = _run("update_kernels.py", "--bank", "0.01", "--rounds", "1", "--optimizers", "sgd", "adam")
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in out.splitlines()
            if line.startswith("| sgd |") or line.startswith("| adam |")]
    assert [row[0] for row in rows] == ["sgd", "adam"] and [row[1] for row in rows] == ["12", "28"]
    # Floor, bank time, its ratio, the one-core arithmetic and its share of the floor: all positive numbers.
    assert all(float(row[i].split()[0]) > 0 for row in rows for i in range(2, 7)), out
