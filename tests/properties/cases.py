"""Strategies and the harness of the property-based tests.

A case is a layer to build (any MoE layer with any router, as a `Spec`
that hypothesis prints as its constructor call), inputs of rank 2-4 with
possibly zero tokens, a mask from none to all-masked with NaN, inf or
garbage at the masked positions (and other token ids there for the hash
router), an input dtype, a dtype policy and the training flag. Every
number comes from numpy generators seeded by the case's `seed`, so
examples are cheap to draw and reproduce exactly.

Adding a router to every property is one line in `ROUTERS`. Which cases
must fail is predicted (`predicted_error`): a property requires the
documented error exactly there and a result everywhere else.
"""

import contextlib
import dataclasses
import math
import re
from typing import Any, NamedTuple

import hypothesis.strategies as st
import keras
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import event, given, settings

import tf_moe
from tests import numpy_reference as ref
from tests.layer_test_case import randomise_weights

# Each property runs under the loaded profile (tests/conftest.py; bounded
# and derandomized) and, in its slow-marked twin, under the large one, whose
# cases take longer than the suite's per-test timeout on 2 cores.
PROFILES = [
    pytest.param(None, id="default"),
    pytest.param("tf_moe_slow", id="slow", marks=[pytest.mark.slow, pytest.mark.timeout(3600)]),
]


def run_property(profile, strategy, check, share=1.0):
    """Runs `check(case)` on the cases `strategy` draws under `profile` (None: the loaded one).

    `share` scales the profile's number of examples, for properties whose
    cases cost several times more (a trace, an XLA compile, 2 replicas).
    """
    base = settings() if profile is None else settings.get_profile(profile)
    max_examples = max(1, round(base.max_examples * share))

    def counted(case):
        CASES_RUN[0] += 1
        check(case)

    settings(base, max_examples=max_examples)(given(strategy)(counted))()


# Generated cases run in this session (shrinking included), for the summary
# that tests/properties/conftest.py prints.
CASES_RUN = [0]


@dataclasses.dataclass(frozen=True, eq=False)
class Spec:
    """A layer or router to build: `factory(**kwargs)`, printed as that call."""

    factory: Any
    kwargs: dict

    def build(self, **extra):
        kwargs = {key: value.build() if isinstance(value, Spec) else value for key, value in self.kwargs.items()}
        return self.factory(**kwargs, **extra)

    def __repr__(self):
        arguments = ", ".join(f"{key}={value!r}" for key, value in self.kwargs.items())
        return f"{self.factory.__name__}({arguments})"


SEEDS = st.integers(0, 2**16)


def _drawn(draw, options, num_experts, k):
    """Draws each option: a strategy, or a function `(num_experts, k) -> strategy`."""
    return {
        key: draw(option(num_experts, k) if callable(option) else option)
        for key, option in options.items()
    }


def router_specs(router_class, k="any", max_experts=8, **options):
    """Strategy of `Spec`s of `router_class(num_experts=n, k=k, **options)`.

    Args:
        router_class: a `Router` subclass taking `num_experts` (and `k`).
        k: "any" (k drawn from 1..n), None (the router takes no `k`: it
            routes to all n, or to a number it fixes itself) or an int.
        max_experts: largest n drawn.
        **options: the router's other arguments, each a strategy or a
            function `(num_experts, k) -> strategy`.
    """

    @st.composite
    def specs(draw):
        num_experts = draw(st.integers(1, max_experts))
        kwargs = {"num_experts": num_experts}
        if k == "any":
            kwargs["k"] = draw(st.integers(1, num_experts))
        elif k is not None:
            kwargs["k"] = min(k, num_experts)
        kwargs.update(_drawn(draw, options, num_experts, kwargs.get("k", num_experts)))
        return Spec(router_class, kwargs)

    return specs()


@st.composite
def hierarchical_kwargs(draw):
    """Shape of a two-level MoE: `num_groups`, `experts_per_group` and the k of each level."""
    num_groups, experts_per_group = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    return {
        "num_groups": num_groups,
        "experts_per_group": experts_per_group,
        "k_primary": draw(st.integers(1, num_groups)),
        "k_secondary": draw(st.integers(1, experts_per_group)),
    }


# Capacity factors: None (dropless), decimals from tiny to large (as written,
# up to 6 digits), factors computed in code (long decimals) and absurdly large.
CAPACITY_FACTORS = st.one_of(
    st.none(),
    st.sampled_from([1e-4, 0.0015, 0.5, 1.0, 1.25, 8.0, 1 / 3, 1.3785516579894752, 1e300]),
    st.floats(1e-4, 8.0).map(lambda value: float(f"{value:.6g}")),
)
NOISE_EPSILONS = st.sampled_from([0.0, 1e-2, 1.0])
JITTER_EPSILONS = st.sampled_from([0.0, 1e-2, 0.5])
BALANCE_WEIGHTS = st.sampled_from([0.0, 1e-2, 1.0])
Z_LOSS_WEIGHTS = st.sampled_from([0.0, 1e-3])
# Expert choice's own factor: each expert takes T * c / E tokens.
EXPERT_CHOICE_FACTORS = st.one_of(
    st.sampled_from([1e-3, 0.5, 1.0, 2.0, 1 / 3, 100.0]),
    st.floats(0.01, 8.0).map(lambda value: float(f"{value:.6g}")),
)


@st.composite
def _hierarchical_router(draw):
    kwargs = draw(hierarchical_kwargs())
    kwargs.update(
        noisy=draw(st.booleans()),
        noise_epsilon=draw(NOISE_EPSILONS),
        capacity_factor=draw(CAPACITY_FACTORS),
        seed=draw(SEEDS),
    )
    return Spec(tf_moe.HierarchicalRouter, kwargs)


# Every router the MoE layers take: name -> strategy of router `Spec`s.
ROUTERS = {
    "noisy_top_k": router_specs(
        tf_moe.NoisyTopKRouter, noisy=st.booleans(), noise_epsilon=NOISE_EPSILONS, seed=SEEDS
    ),
    "softmax": router_specs(tf_moe.SoftmaxRouter, k=None),
    "batchwise": router_specs(
        tf_moe.BatchwiseRouter, max_experts_per_token=lambda n, k: st.none() | st.integers(1, n)
    ),
    "hierarchical": _hierarchical_router(),
    "switch": router_specs(
        tf_moe.SwitchRouter, k=None, balance_weight=BALANCE_WEIGHTS, jitter_epsilon=JITTER_EPSILONS,
        seed=SEEDS, z_loss_weight=Z_LOSS_WEIGHTS,
    ),
    "top_k": router_specs(
        tf_moe.TopKRouter, normalize=st.booleans(), balance_weight=BALANCE_WEIGHTS,
        jitter_epsilon=JITTER_EPSILONS, seed=SEEDS, z_loss_weight=Z_LOSS_WEIGHTS,
    ),
    "expert_choice": router_specs(
        tf_moe.ExpertChoiceRouter, k=None, capacity_factor=EXPERT_CHOICE_FACTORS, seed=SEEDS,
        z_loss_weight=Z_LOSS_WEIGHTS,
    ),
    "loss_free": router_specs(
        tf_moe.LossFreeRouter, affinity=st.sampled_from(["sigmoid", "softmax"]),
        bias_update_rate=st.sampled_from([0.0, 1e-3, 0.1]), balance_weight=BALANCE_WEIGHTS, seed=SEEDS,
        z_loss_weight=Z_LOSS_WEIGHTS,
    ),
    "hash": router_specs(tf_moe.HashRouter, k=None, seed=SEEDS),
    "top_k_gate": router_specs(
        tf_moe.TopKGateRouter, learning_rate_multiplier=st.sampled_from([1.0, 3.0, 10.0]),
        normalize_inputs=st.booleans(), z_loss_weight=Z_LOSS_WEIGHTS,
    ),
}

# Activations of the experts, with their numpy twins for the references.
ACTIVATIONS = {"relu": ref.relu, "tanh": np.tanh, "linear": lambda h: h}
# Those of gated experts (SwiGLU, GEGLU, GLU), named as `numpy_reference.gated_expert` takes them.
GATED_ACTIVATIONS = sorted(ref.ACTIVATIONS)


@st.composite
def _moe_arguments(draw, may_gate=False):
    """`MoELayer` arguments besides the router (`gated` experts too, where `may_gate`)."""
    gated = may_gate and draw(st.booleans())
    return {
        "hidden_units": draw(st.integers(1, 6)),
        "output_units": draw(st.none() | st.integers(1, 5)),
        **({"gated": True} if gated else {}),
        "activation": draw(st.sampled_from(GATED_ACTIVATIONS if gated else sorted(ACTIVATIONS))),
        "use_bias": draw(st.booleans()),
        "capacity_factor": draw(CAPACITY_FACTORS),
        "importance_weight": draw(st.sampled_from([0.0, 0.1, 1.0])),
        "load_weight": draw(st.sampled_from([0.0, 0.1, 1.0])),
        "num_shared_experts": draw(st.sampled_from([0, 0, 1, 2])),
    }


@st.composite
def moe_layer_specs(draw, routers):
    router = draw(routers)
    arguments = draw(_moe_arguments(may_gate=True))
    if not router.factory.uses_balancing_loss:
        # The paper's loss weights are an error with a router that balances itself.
        del arguments["importance_weight"], arguments["load_weight"]
    return Spec(tf_moe.MoELayer, {"router": router, **arguments})


@st.composite
def legacy_moe_specs(draw):
    """tf_moe 0.1's `MoE` with each of its gates."""
    num_experts = draw(st.integers(1, 8))
    kwargs = {"num_experts": num_experts, "k": draw(st.integers(1, num_experts))}
    kwargs.update(draw(_moe_arguments()))
    kwargs.update(
        gate=draw(st.sampled_from(["noisy_top_k", "softmax", "batchwise"])),
        noisy_gating=draw(st.booleans()),
        noise_epsilon=draw(NOISE_EPSILONS),
        seed=draw(SEEDS),
    )
    return Spec(tf_moe.MoE, kwargs)


@st.composite
def hierarchical_moe_specs(draw):
    kwargs = draw(hierarchical_kwargs())
    kwargs.update(draw(_moe_arguments()))
    kwargs.update(noisy_gating=draw(st.booleans()), noise_epsilon=draw(NOISE_EPSILONS), seed=draw(SEEDS))
    return Spec(tf_moe.HierarchicalMoE, kwargs)


# Every public MoE layer: `MoELayer` with each router, `MoE`, `HierarchicalMoE`.
LAYERS = {
    **{f"moe_layer[{name}]": moe_layer_specs(routers) for name, routers in ROUTERS.items()},
    "legacy_moe": legacy_moe_specs(),
    "hierarchical_moe": hierarchical_moe_specs(),
}

# What masked positions hold in the poisoned run ("garbage": a mix per position).
FILLS = ("nan", "inf", "-inf", "1e30", "garbage")
_GARBAGE = np.array([np.nan, np.inf, -np.inf, 1e30, -7e4, 3.0], np.float32)


@dataclasses.dataclass(frozen=True)
class Case:
    """One drawn example: a layer and what it is called on.

    `mask` is "none" (no mask), "all" (every token valid), "masked" (every
    token masked) or the fraction of tokens masked at random; `mask_dtype`
    the dtype it is given in (Keras masks are bool, users pass 0/1 too).
    """

    layer: Spec
    leading: tuple
    units: int
    mask: Any
    mask_dtype: str
    fill: str
    input_dtype: str
    policy: str
    training: bool
    seed: int

    @property
    def num_tokens(self):
        return math.prod(self.leading)


@st.composite
def cases(
    draw, layers, policies=("float32", "mixed_float16", "mixed_bfloat16"), max_leading=3, max_tokens=40,
    batch_multiple=1,
):
    """Cases with a layer from `layers` and inputs of rank 2 to `max_leading + 1`.

    Token counts go from zero to `max_tokens`; the first axis is a multiple
    of `batch_multiple` (to split it over replicas).
    """
    sizes = st.integers(0, 5) if max_leading > 1 else st.integers(0, max_tokens)
    leading = draw(st.lists(sizes, min_size=1, max_size=max_leading))
    leading[0] -= leading[0] % batch_multiple
    leading = tuple(leading)
    if math.prod(leading) > max_tokens:
        leading = leading[:1]
    return Case(
        layer=draw(layers),
        leading=leading,
        units=draw(st.integers(1, 6)),
        mask=draw(st.sampled_from(["none", "all", "masked"]) | st.floats(0.0, 1.0)),
        mask_dtype=draw(st.sampled_from(["bool", "int32", "float32"])),
        fill=draw(st.sampled_from(FILLS)),
        input_dtype=draw(st.sampled_from(["float32", "float16", "bfloat16"])),
        policy=draw(st.sampled_from(policies)),
        training=draw(st.booleans()),
        seed=draw(SEEDS),
    )


class Inputs(NamedTuple):
    clean: np.ndarray  # float32, zeros at masked positions
    poisoned: np.ndarray  # float32, the case's fill at masked positions
    mask: Any  # bool array of the leading shape, or None
    valid: np.ndarray  # [T] bool, the flattened mask (all True without one)
    probe: np.ndarray  # float32 weights of the outputs in the gradient objective
    router_inputs: dict  # per-token call arguments the router requires (token ids)
    poisoned_router_inputs: dict  # the same with other values at masked positions


def _router_inputs(router, leading, valid, rng):
    """`(clean, poisoned)` token ids where the router requires them (any int64, other ids when masked)."""
    if "token_ids" not in router.required_inputs:
        return {}, {}
    ids = rng.integers(-(2**40), 2**40, leading)
    poisoned = np.where(valid, ids, rng.integers(-(2**40), 2**40, leading))
    return {"token_ids": ids}, {"token_ids": poisoned}


def make_inputs(case, output_units, router):
    rng = np.random.default_rng(case.seed + 1)
    x = rng.standard_normal(case.leading + (case.units,)).astype("float32")
    if case.mask == "none" or case.mask == "all":
        valid = np.ones(case.leading, bool)
    elif case.mask == "masked":
        valid = np.zeros(case.leading, bool)
    else:
        valid = rng.random(case.leading) >= case.mask
    clean = np.where(valid[..., None], x, np.float32(0.0))
    if case.fill == "garbage":
        fill = rng.choice(_GARBAGE, size=x.shape)
    else:
        fill = np.float32(float(case.fill))
    poisoned = np.where(valid[..., None], x, fill).astype("float32")
    probe = rng.standard_normal(case.leading + (output_units,)).astype("float32")
    mask = None if case.mask == "none" else valid.astype(case.mask_dtype)
    router_inputs, poisoned_router_inputs = _router_inputs(router, case.leading, valid, rng)
    return Inputs(clean, poisoned, mask, valid.reshape(-1), probe, router_inputs, poisoned_router_inputs)


def build_layer(case):
    """The case's layer, built for its input width, with random weights."""
    layer = case.layer.build(dtype=case.policy)
    layer.build((None,) * len(case.leading) + (case.units,))
    randomise_weights(layer, case.seed)
    experts = getattr(layer, "experts", None)
    if case.seed % 2 and getattr(experts, "overflow_cost", None) is not None:
        # Every second case splits the dropless buffer wherever an expert holds
        # more than another (at these sizes the default cost never splits).
        experts.overflow_cost = 0.0
    return layer


def as_input(values, case):
    """Numpy float32 values as the case's input dtype."""
    return tf.cast(tf.constant(values), case.input_dtype)


def as_seen(values, case, layer):
    """What the layer computes on: the values in the input dtype, then the compute dtype, in float64."""
    return tf.cast(as_input(values, case), layer.compute_dtype).numpy().astype(np.float64)


def predicted_error(router, num_tokens, training):
    """The arguments a ValueError of this call must name, or () where the call is valid.

    Only batchwise gating refuses calls: while training it ranks
    `m = k * T // n` tokens per expert, T the rows it is given (masked ones
    too), and needs m >= 1.
    """
    if isinstance(router, tf_moe.BatchwiseRouter) and training and router.k * num_tokens // router.num_experts < 1:
        return ("k", "num_experts")
    return ()


def documented_error(error, predicted):
    """Checks that a ValueError was predicted and names (in backquotes) a predicted argument."""
    assert predicted, f"a ValueError in a valid case: {error}"
    named = set(re.findall(r"`(\w+)`", str(error))) & set(predicted)
    assert named, f"a ValueError that names none of {predicted}: {error}"
    event(f"ValueError naming {sorted(named)}")


def require_predicted_error(predicted):
    """Checks, after a call that raised nothing, that none was predicted."""
    assert not predicted, f"no ValueError in a case that needs {predicted}"


@contextlib.contextmanager
def recorded_routings(router):
    """Records every `Routing` the router returns while in the block."""
    routings = []
    call = router.call

    def recording(*args, **kwargs):
        routing = call(*args, **kwargs)
        routings.append(routing)
        return routing

    router.call = recording
    try:
        yield routings
    finally:
        del router.call


class Run(NamedTuple):
    outputs: np.ndarray
    losses: list
    gradients: list  # w.r.t. the inputs, then every trainable weight
    routing: Any  # the Routing, as numpy (nested)
    balance: dict  # the layer's LoadBalanceMetrics result


def run_layer(layer, case, values, inputs, gradients=True, poisoned=False):
    """Calls `layer` on `values` from the state it had when built; returns a `Run`.

    `poisoned` passes the router inputs with other values at masked positions.
    """
    layer.balance.reset_state()
    x = as_input(values, case)
    router_inputs = inputs.poisoned_router_inputs if poisoned else inputs.router_inputs
    with recorded_routings(layer.router) as routings, tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x, mask=inputs.mask, training=case.training, **router_inputs)
        losses = list(layer.losses)
        objective = tf.reduce_sum(tf.cast(y, tf.float32) * inputs.probe) + tf.add_n(losses + [tf.zeros(())])
    grads = []
    if gradients:
        grads = tape.gradient(
            objective, [x] + [w.value for w in layer.trainable_weights], unconnected_gradients=tf.UnconnectedGradients.ZERO
        )
    (routing,) = routings
    return Run(
        outputs=np.asarray(tf.cast(y, tf.float32)),
        losses=[float(loss) for loss in losses],
        gradients=[np.asarray(tf.cast(g, tf.float32)) for g in grads],
        routing=tf.nest.map_structure(np.asarray, routing),
        balance={key: float(value) for key, value in layer.balance.result().items()},
    )


def snapshot(layer):
    """The layer's variables (weights and noise seed states), to replay a call exactly."""
    values = [v.numpy() for v in layer.variables]
    return lambda: [v.assign(value) for v, value in zip(layer.variables, values)]


def expert_weights(experts):
    """`(W_in, b_in, W_out, b_out)` of a `FeedForwardExperts` (biases None without)."""
    weights = [experts.kernel_in, experts.bias_in if experts.use_bias else None,
               experts.kernel_out, experts.bias_out if experts.use_bias else None]
    return [None if w is None else np.asarray(w, np.float64) for w in weights]


def bank_reference(experts, tokens, gates):
    """`(outputs, magnitude)`: a `FeedForwardExperts` bank computed densely in numpy, weighted by `gates` [T, n]."""
    weights = expert_weights(experts)
    activation = keras.activations.serialize(experts.activation)
    if experts.gated:
        gate = [np.asarray(experts.kernel_gate, np.float64),
                np.asarray(experts.bias_gate, np.float64) if experts.use_bias else None]
        return (ref.dense_gated_moe(tokens, gates, *gate, *weights, activation),
                ref.dense_gated_moe_magnitude(tokens, gates, *gate, *weights))
    return (ref.dense_moe(tokens, gates, *weights, ACTIVATIONS[activation]),
            ref.dense_moe_magnitude(tokens, gates, *weights))


def reference_outputs(layer, case, x, routing, capacity_factor, valid):
    """The MoE's outputs from the routing, every expert computed densely in numpy.

    The shared experts (if any) add their outputs on every `valid` token.

    Returns `(outputs [T, o], magnitude [T, o], dropped, routed)`:
    magnitude bounds what rounding can change in the outputs (see
    `numpy_reference.dense_moe_magnitude`); dropped counts the assignments
    the capacity `ceil(capacity_factor * k * T / n)` drops in list
    (choice-major) order, plus those the router dropped itself.
    """
    n, num_tokens = layer.num_experts, case.num_tokens
    expert_id = routing.expert_id
    routed = expert_id < n
    if capacity_factor is None:
        kept = routed
    else:
        capacity = ref.capacity_slots(capacity_factor, layer.k * num_tokens, n)
        kept = ref.kept_by_capacity(expert_id, n, capacity)
    gates = ref.dense_gates(routing.token_id[kept], expert_id[kept], routing.weight[kept], num_tokens, n)
    tokens = x.reshape(num_tokens, case.units)
    outputs, magnitude = bank_reference(layer.experts, tokens, gates)
    if getattr(layer, "num_shared_experts", 0):
        always = np.repeat(valid[:, None], layer.num_shared_experts, axis=1).astype(np.float64)
        shared_outputs, shared_magnitude = bank_reference(layer.shared_experts, tokens, always)
        outputs, magnitude = outputs + shared_outputs, magnitude + shared_magnitude
    dropped = float(routing.dropped) + routed.sum() - kept.sum()
    return outputs, magnitude, dropped, float(routing.dropped) + routed.sum()


# Deviation allowed from the float64 reference, relative to the magnitude
# of what is summed (`reference_outputs`): float16 keeps ~3 decimal
# digits, bfloat16 ~2, and the output of a layer that sums terms of
# opposite sign can be far smaller than its rounding error.
TOLERANCE = {"float32": 1e-4, "mixed_float16": 1e-2, "mixed_bfloat16": 5e-2}
