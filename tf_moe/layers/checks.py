"""Argument checks shared by the layers: each error names the argument."""


def check_positive_int(name, value):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"`{name}` must be a positive int, got {value!r}.")


def check_not_above(name, value, limit_name, limit):
    """`value` <= `limit`, both already known to be positive ints."""
    if value > limit:
        raise ValueError(f"`{name}` ({value}) must not exceed `{limit_name}` ({limit}).")


def check_non_negative(name, value):
    if not value >= 0:
        raise ValueError(f"`{name}` must be >= 0, got {value!r}.")


def check_capacity_factor(capacity_factor):
    if capacity_factor is not None and not capacity_factor > 0:
        raise ValueError(
            f"`capacity_factor` must be None (dropless) or > 0, got {capacity_factor!r}."
        )
