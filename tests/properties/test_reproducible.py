"""The property suite draws the same examples whatever the session has imported.

Derandomized hypothesis draws from a fixed seed, but (from 6.131) it also
mixes in constants from the source of every local module imported so far;
tests/conftest.py turns that off. Here a module full of constants is
imported between two draws of the same strategy: the examples must not
change.
"""

import importlib
import sys

from hypothesis import given, settings
from hypothesis.internal.conjecture import providers

from tests.properties.cases import LAYERS, cases


def _examples(strategy, count=30):
    drawn = []

    @settings(max_examples=count, derandomize=True, database=None)
    @given(strategy)
    def collect(value):
        drawn.append(repr(value))

    collect()
    return drawn


def test_examples_do_not_depend_on_the_imported_modules(tmp_path, monkeypatch):
    strategy = cases(LAYERS["moe_layer[noisy_top_k]"])
    before = _examples(strategy)
    # Integers and floats in the ranges the cases draw from.
    (tmp_path / "bait_constants.py").write_text(
        "VALUES = [" + ", ".join(str(v) for v in [3, 5, 7, 11, 4097, 12345, 54321, 0.375, 2.5, 6.25]) + "]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.import_module("bait_constants")
    try:
        assert providers._get_local_constants() == providers._local_constants
        assert len(providers._local_constants) == 0
        assert _examples(strategy) == before
    finally:
        del sys.modules["bait_constants"]
