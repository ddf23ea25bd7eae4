"""configure_allocator: TensorFlow's freed CPU memory is reused, not page-faulted in again.

Each check runs in a fresh process (TensorFlow picks its CPU allocator at its
first operation) with oneDNN off, the build configuration without a pool by
default, and counts the minor page faults of one step whose large
temporaries TensorFlow allocates and frees: memory reused from a pool costs
none, a fresh mapping one per page. Nothing is timed.
"""

import json
import os
import subprocess
import sys

import pytest

import tf_moe
from tf_moe import performance

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUFFER_MIB = 128
PAGES = BUFFER_MIB * 2**20 // os.sysconf("SC_PAGE_SIZE")

# Prints whether the CPU allocator keeps statistics (pools do), the page
# faults of the last of `STEPS` steps, and the resident memory growth from
# the second step to the last.
_PROBE = f"""
import json, resource, sys
setup = sys.argv[1]
if setup == "launcher":
    import _tf_moe_launcher
    _tf_moe_launcher.prepare_process([])
import tf_moe
if setup == "helper":
    tf_moe.performance.configure_allocator()
import tensorflow as tf

x = tf.random.normal([{BUFFER_MIB} * 2**8, 1024])

@tf.function
def step(x):
    # Two {BUFFER_MIB} MiB temporaries, freed by the end of the step.
    return tf.reduce_sum(tf.sin(x) * 2.0 + tf.cos(x))

def resident():
    return int(open("/proc/self/statm").read().split()[1])

faults, sizes = [], []
for _ in range(8):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step(x)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    sizes.append(resident())
try:
    tf.config.experimental.get_memory_info("CPU:0")
    pooled = True
except ValueError:
    pooled = False
print(json.dumps({{"pooled": pooled, "faults": faults[-1], "growth": sizes[-1] - sizes[1]}}))
"""


def _run_probe(setup):
    env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="3", TF_ENABLE_ONEDNN_OPTS="0")
    env.pop("TF_CPU_ALLOCATOR_USE_BFC", None)
    result = subprocess.run(
        [sys.executable, "-c", _PROBE, setup], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_helper_and_launcher_make_steps_reuse_memory():
    default = _run_probe("default")
    # Without a pool each temporary is a fresh mapping: at least one fault
    # per huge page even where the kernel backs them with huge pages.
    assert not default["pooled"] and default["faults"] >= 2 * PAGES // 512, default
    for setup in ("helper", "launcher"):
        configured = _run_probe(setup)
        assert configured["pooled"], (setup, configured)
        assert configured["faults"] < PAGES // 100, (setup, configured, default)
        # Reused, not leaked: no growth after the first steps.
        assert configured["growth"] < PAGES // 100, (setup, configured)


def test_configure_allocator_keeps_a_users_choice(monkeypatch):
    monkeypatch.delenv("TF_CPU_ALLOCATOR_USE_BFC", raising=False)
    assert tf_moe.performance.configure_allocator() == "1"
    assert os.environ["TF_CPU_ALLOCATOR_USE_BFC"] == "1"
    monkeypatch.setenv("TF_CPU_ALLOCATOR_USE_BFC", "0")
    assert performance.configure_allocator() == "0"
    assert os.environ["TF_CPU_ALLOCATOR_USE_BFC"] == "0"
