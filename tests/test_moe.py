"""Tests of the MoE layer against dense references."""

import keras
import numpy as np
import pytest

import tf_moe
from tests.layer_test_case import run_layer_test


def test_layer_citizenship_dropless():
    run_layer_test(
        tf_moe.MoE,
        dict(num_experts=4, k=2, hidden_units=8, output_units=6),
        input_shape=(3, 5, 10),
        expected_output_shape=(3, 5, 6),
    )
