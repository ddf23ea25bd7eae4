"""Routers by name: each router module registers its class here, `MoELayer` looks names up.

`tf_moe.routers` is the public view of this registry.
"""

from typing import NamedTuple

import keras

from tf_moe.layers.router import Router

# How a registered router takes `k` from `MoELayer(router=name, num_experts=n, k=k)`.
K_REQUIRED = "required"  # Router(n, k)
K_OPTIONAL = "optional"  # Router(n) when k is None, else Router(n, k)
K_ALL = "all"  # every expert: k None or n; Router(n)
K_ONE = "one"  # one expert per token: k None or 1; Router(n)
INSTANCE_ONLY = "instance"  # needs arguments of its own: only as an instance


class _Entry(NamedTuple):
    cls: type
    k: str
    usage: str | None


_ROUTERS = {}


def register_router(name, k=K_REQUIRED, usage=None):
    """Class decorator: `MoELayer(router=name)` makes this router.

    Args:
        name: the router's name, e.g. "noisy_top_k".
        k: how the router takes the MoE's `k`: `K_REQUIRED` (the
            default), `K_OPTIONAL`, `K_ALL`, `K_ONE` or `INSTANCE_ONLY`
            (then `usage`, e.g. "HierarchicalRouter(num_groups, ...)", says
            how to make one).
        usage: for `INSTANCE_ONLY`, how to construct the router.

    Example:

    >>> @register_router("my_router")
    ... class MyRouter(Router):
    ...     ...
    """
    if k not in (K_REQUIRED, K_OPTIONAL, K_ALL, K_ONE, INSTANCE_ONLY):
        raise ValueError(f"`k` must be one of the registry's K_* constants, got {k!r}.")
    if (k == INSTANCE_ONLY) != (usage is not None):
        raise ValueError("`usage` is given exactly for routers registered as INSTANCE_ONLY.")

    def register(cls):
        if name in _ROUTERS and _ROUTERS[name].cls is not cls:
            raise ValueError(f"A router is already registered as {name!r}: {_ROUTERS[name].cls.__name__}.")
        _ROUTERS[name] = _Entry(cls, k, usage)
        return cls

    return register


def router_names(k=None):
    """Sorted names that make a router from `(num_experts, k)`; with `k`, those registered with it."""
    return tuple(sorted(
        name for name, entry in _ROUTERS.items()
        if entry.k != INSTANCE_ONLY and (k is None or entry.k == k)
    ))


def get_router(identifier, num_experts=None, k=None):
    """A `Router` from a registered name, a `keras.layers.serialize` config or an instance.

    Args:
        identifier: a `Router` (returned as is), its serialized config (a
            dict), or a registered name (`tf_moe.routers.NAMES`; routers
            that need more than `num_experts` and `k`, such as the
            hierarchical one, are passed as instances).
        num_experts: int, experts of a router made by name.
        k: int, experts per token of a router made by name: None or
            `num_experts` for "softmax" (every expert on every token), None
            or 1 for "switch" and "hash"; for "expert_choice" the experts a
            token visits on average, its capacity factor c (None: 2).

    Returns:
        A `Router`.

    Example:

    >>> get_router("noisy_top_k", num_experts=8, k=2).metric_names
    ('topk_agreement', 'noise_to_signal')
    """
    if isinstance(identifier, Router):
        return identifier
    if isinstance(identifier, dict):
        router = keras.layers.deserialize(identifier)
        if not isinstance(router, Router):
            raise TypeError(f"`router` config must describe a Router, got {type(router).__name__}.")
        return router
    entry = _ROUTERS.get(identifier) if isinstance(identifier, str) else None
    if entry is None:
        raise ValueError(
            f"`router` must be a Router, its config or one of {list(router_names())}, got {identifier!r}."
        )
    if entry.k == INSTANCE_ONLY:
        raise ValueError(f"`router={identifier!r}` needs arguments of its own: pass `router={entry.usage}`.")
    if num_experts is None or (k is None and entry.k == K_REQUIRED):
        raise ValueError(f"`router={identifier!r}` needs `num_experts` and `k`.")
    if entry.k == K_ALL and k not in (None, num_experts):
        raise ValueError(
            f"The {identifier} router sends every token to every expert: `k` must be None or "
            f"`num_experts` ({num_experts}), got {k!r}."
        )
    if entry.k == K_ONE and k not in (None, 1):
        raise ValueError(f"The {identifier} router sends every token to one expert: `k` must be None or 1, got {k!r}.")
    if entry.k in (K_ALL, K_ONE) or k is None:
        return entry.cls(num_experts)
    return entry.cls(num_experts, k)
