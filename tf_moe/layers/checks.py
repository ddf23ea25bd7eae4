"""Argument checks shared by the layers: each error names the argument."""

import math
import numbers


def check_positive_int(name, value):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"`{name}` must be a positive int, got {value!r}.")


def check_not_above(name, value, limit_name, limit):
    """`value` <= `limit`, both already known to be positive ints."""
    if value > limit:
        raise ValueError(f"`{name}` ({value}) must not exceed `{limit_name}` ({limit}).")


def _is_real(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_non_negative(name, value):
    """A finite real number >= 0 (an inf weight would make the loss inf)."""
    if not (_is_real(value) and math.isfinite(value) and value >= 0):
        raise ValueError(f"`{name}` must be a finite number >= 0, got {value!r}.")


def check_positive(name, value):
    """A finite real number > 0."""
    if not (_is_real(value) and math.isfinite(value) and value > 0):
        raise ValueError(f"`{name}` must be a finite number > 0, got {value!r}.")


def check_capacity_factor(capacity_factor, name="capacity_factor"):
    if capacity_factor is not None and not (
        _is_real(capacity_factor) and math.isfinite(capacity_factor) and capacity_factor > 0
    ):
        raise ValueError(
            f"`{name}` must be None (dropless) or a finite number > 0, "
            f"got {capacity_factor!r}."
        )
