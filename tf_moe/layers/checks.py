"""Argument checks shared by the layers: each error names the argument."""

import math
import numbers

import numpy as np


def _is_int(value):
    """A Python or numpy integer, not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_positive_int(name, value):
    """An integer >= 1 (numpy's too); returns it as a Python int."""
    if not _is_int(value) or value < 1:
        raise ValueError(f"`{name}` must be a positive int, got {value!r}.")
    return int(value)


def check_non_negative_int(name, value):
    """An integer >= 0 (numpy's too); returns it as a Python int."""
    if not _is_int(value) or value < 0:
        raise ValueError(f"`{name}` must be an int >= 0, got {value!r}.")
    return int(value)


def check_bool(name, value):
    """A Python or numpy bool (not a string or a number); returns it as a Python bool."""
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"`{name}` must be True or False, got {value!r}.")
    return bool(value)


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


def check_keras_object(name, module, identifier):
    """`module.get(identifier)` for a Keras `module` (initializers, regularizers,
    activations), or a ValueError naming `name`; None stays None."""
    if identifier is None:
        return None
    try:
        return module.get(identifier)
    except (ValueError, TypeError) as error:
        raise ValueError(f"`{name}`: {error}") from None
