"""The MoE language model of appendix C and its computationally matched baselines."""

import warnings

import keras

from tf_moe import routers
from tf_moe.layers.checks import check_non_negative_int, check_positive_int
from tf_moe.layers.hierarchical_router import HierarchicalRouter
from tf_moe.layers.moe_layer import MoELayer
from tf_moe.layers.noisy_top_k_router import NoisyTopKRouter
from tf_moe.training.model import MoEModel

BASELINES = ("moe-1-wide", "moe-1-deep", "4xlstm")

# The router of the recurrent models' flat MoE unless told: `MoELayer`'s
# default (`TopKRouter`) lost the main job (the LSTM LM on the Bible at its
# learning rate of 2e-3) by 3.5 perplexity, where this one ties its dense
# baseline (docs/results.md, "The default router").
RECURRENT_ROUTER = "top_k_gate"


def moe_layer(
    num_experts,
    k,
    hidden_units,
    num_groups=None,
    importance_weight=None,
    load_weight=None,
    capacity_factor=None,
    seed=None,
    gate_learning_rate_multiplier=1.0,
    router=None,
    num_shared_experts=0,
    name="moe",
):
    """The MoE layer of the paper's models: the paper's gate without noise, the hierarchical one, or `router`.

    With `router` None a flat MoE gets `RECURRENT_ROUTER` (the paper's gate
    without its noise, `TopKGateRouter`), and with
    `num_groups` the hierarchical noisy gating of appendix B, which splits
    `num_experts` into `num_groups` groups and uses `k` at both levels (as
    the paper's MoE-256-h with k=2; its groups get the layer's capacity
    factor). `router` is a name of `tf_moe.routers` (made with
    `num_experts` and `k`), a `Router` or its config; the paper's
    `"noisy_top_k"` by name is made with `seed` and
    `gate_learning_rate_multiplier` (its `learning_rate_multiplier`, as
    the hierarchical router's). `num_shared_experts` always-on experts
    (DeepSeekMoE) run beside the routed ones. A router that is not causal
    (expert choice) gets a warning: in a language model it lets a
    position's output depend on later tokens.
    """
    multiplier = gate_learning_rate_multiplier
    if num_groups is not None:
        if router is not None:
            raise ValueError("`router`: `num_groups` makes the hierarchical router; leave `router` None with it.")
        check_positive_int("num_groups", num_groups)
        if num_experts % num_groups:
            raise ValueError(
                f"`num_experts` ({num_experts}) must be a multiple of `num_groups` ({num_groups})."
            )
        router = HierarchicalRouter(
            num_groups, num_experts // num_groups, k, k, capacity_factor=capacity_factor, seed=seed,
            learning_rate_multiplier=multiplier,
        )
    elif router == "noisy_top_k":
        router = NoisyTopKRouter(num_experts, k, seed=seed, learning_rate_multiplier=multiplier)
    elif multiplier != 1.0:
        raise ValueError(
            "`gate_learning_rate_multiplier` is an option of the paper's noisy gates: use it with "
            "router='noisy_top_k' or `num_groups`."
        )
    elif router is None:
        router = routers.get(RECURRENT_ROUTER, num_experts, k)
    else:
        router = routers.get(router, num_experts, k)
        warn_if_not_causal(router)
    return MoELayer(
        hidden_units=hidden_units,
        router=router,
        importance_weight=importance_weight,
        load_weight=load_weight,
        capacity_factor=capacity_factor,
        num_shared_experts=num_shared_experts,
        name=name,
    )


def warn_if_not_causal(router):
    """Warns that a router which looks at the whole batch (expert choice) leaks the future in a language model."""
    if not router.causal:
        warnings.warn(
            f"{type(router).__name__} is not causal: it routes each token by looking at the whole "
            "batch, so in a language model a position's output depends on later tokens (while "
            "training and when evaluating). Use a token-choice router for autoregressive models.",
            UserWarning,
            stacklevel=3,
        )


def residual(x, y, dropout, name, add=None):
    """`x + Dropout(y)`: the dropout and residual connection of appendix C.

    `add` is the `Add` layer to use, for a builder that records it; by
    default a new one named `<name>_residual`.
    """
    y = keras.layers.Dropout(dropout, name=f"{name}_dropout")(y)
    return (add or keras.layers.Add(name=f"{name}_residual"))([x, y])


def router_inputs(router, token_ids):
    """The per-token router inputs a language model can give `router`: its `token_ids`.

    Raises a ValueError for a router that needs anything else.
    """
    missing = set(router.required_inputs) - {"token_ids"}
    if missing:
        raise ValueError(
            f"{type(router).__name__} needs the call arguments {sorted(missing)}, which this model "
            "does not have."
        )
    return {"token_ids": token_ids} if "token_ids" in router.required_inputs else {}


def _middle_block(x, tokens, kind, units, dropout, moe_kwargs, stateful):
    """The layer between the two LSTMs: an MoE or a matched dense stand-in."""
    # The dense stand-ins match the experts a token visits, shared ones included.
    visited, hidden = moe_kwargs["k"] + moe_kwargs["num_shared_experts"], moe_kwargs["hidden_units"]
    if kind == "moe":
        moe = moe_layer(name="moe", **moe_kwargs)
        return residual(x, moe(x, **router_inputs(moe.router, tokens)), dropout, "moe")
    if kind == "moe-1-wide":
        # One expert as wide as the experts a token visits: same ops.
        h = keras.layers.Dense(visited * hidden, activation="relu", name="wide_hidden")(x)
        return residual(x, keras.layers.Dense(units, name="wide_output")(h), dropout, "wide")
    if kind == "moe-1-deep":
        # One expert with a hidden layer of the experts' width per expert a token visits.
        h = x
        for i in range(visited):
            h = keras.layers.Dense(hidden, activation="relu", name=f"deep_hidden_{i + 1}")(h)
        return residual(x, keras.layers.Dense(units, name="deep_output")(h), dropout, "deep")
    if kind == "4xlstm":
        # Two more LSTMs stand in for the MoE (the paper's 4xLSTM-512).
        for name in ("lstm_extra_1", "lstm_extra_2"):
            y = keras.layers.LSTM(units, return_sequences=True, stateful=stateful, name=name)(x)
            x = residual(x, y, dropout, name)
        return x
    raise ValueError(f"`model` must be 'moe' or one of {BASELINES}, got {kind!r}.")


def _check_arguments(vocab_size, units, dropout, stateful, batch_size):
    """Raises a ValueError naming the first of `lstm_lm`'s arguments that is out of range."""
    for arg, value in (("vocab_size", vocab_size), ("units", units)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"`{arg}` must be a positive int, got {value!r}.")
    if not 0 <= dropout < 1:
        raise ValueError(f"`dropout` must be in [0, 1), got {dropout!r}.")
    if stateful and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"A stateful model needs a positive int `batch_size`, got {batch_size!r}.")


def lstm_lm(
    vocab_size,
    units=512,
    num_experts=32,
    k=4,
    expert_hidden_units=1024,
    num_groups=None,
    dropout=0.1,
    importance_weight=None,
    load_weight=None,
    capacity_factor=None,
    model="moe",
    seed=None,
    gate_learning_rate_multiplier=1.0,
    stateful=False,
    batch_size=None,
    router=None,
    num_shared_experts=0,
    name=None,
):
    """The LSTM language model with an MoE between two LSTMs (appendix C).

    `embedding -> LSTM -> MoE -> LSTM -> softmax`, all `units` wide; every
    layer but the softmax has dropout on its output and a residual
    connection. The MoE runs on all time steps at once (it flattens batch
    and time into one batch of tokens). Token id 0 is padding: it is masked
    from the embedding on, so padding does not change the logits of real
    positions, and `MoEModel` leaves it out of the loss.

    `model` selects the MoE model or one of its computationally matched
    dense baselines (the MoE layer replaced, everything else the same):
    `"moe-1-wide"` (one expert with a hidden layer `k * expert_hidden_units`
    wide), `"moe-1-deep"` (one expert with `k` hidden layers of
    `expert_hidden_units`; with shared experts `k + num_shared_experts`
    instead of `k` in both) and `"4xlstm"` (two more LSTMs instead of the
    MoE). With the paper's sizes (units 512, hidden 1024, k 4) all of them
    cost the same ops per timestep up to the gate (`ops_per_timestep`).

    Args:
        vocab_size: int, vocabulary size (id 0 is padding).
        units: int, width of the embedding, the LSTMs and the MoE output.
        num_experts: int, experts of the MoE layer.
        k: int, experts per token (per level when hierarchical).
        expert_hidden_units: int, hidden width of every expert.
        num_groups: None for a flat MoE; an int for a hierarchical one
            (`HierarchicalRouter`) of `num_groups` groups of
            `num_experts // num_groups` experts.
        dropout: float, dropout rate on every layer's output but the softmax.
        importance_weight, load_weight: the paper's balancing loss weights
            (`MoELayer`'s; None: 0.1 with the routers that use them).
        capacity_factor: None (dropless) or the MoE's static capacity factor.
        model: "moe" or one of "moe-1-wide", "moe-1-deep", "4xlstm".
        seed: optional seed of the paper's gating noise.
        gate_learning_rate_multiplier: float > 0, how much faster the
            paper's noisy gates learn than the rest (`router="noisy_top_k"`
            or `num_groups`; see `NoisyTopKRouter`); 1 is the paper's
            training.
        stateful: carry the LSTMs' state from one batch to the next, for
            training and evaluating on a token stream cut into consecutive
            segments (`tf_moe.data.lm_stream_dataset`); needs `batch_size`.
            Reset it with `tf_moe.training.ResetRecurrentState`.
        batch_size: the fixed batch size of a stateful model.
        router: None for `RECURRENT_ROUTER` (`TopKGateRouter`; the paper's
            hierarchical one with `num_groups`), or a router for the MoE: a
            name of `tf_moe.routers` (made with `num_experts` and `k`, e.g.
            "switch" with `k=1`; "noisy_top_k" is the paper's), a `Router`
            or its config. A router that
            routes by token id (`required_inputs` of "token_ids", the hash
            router) gets the model's input ids. A router that is not
            causal (expert choice) is allowed with a warning.
        num_shared_experts: int >= 0, always-on experts of the MoE beside
            the `k` routed ones (`MoELayer`'s; DeepSeekMoE, Dai et al. 2024).
        name: model name (default: `model` with dashes as underscores).

    Returns:
        A `MoEModel` mapping int token ids `[batch, time]` to float32 logits
        `[batch, time, vocab_size]`; compile it with an optimizer only.

    Example:

    >>> model = lstm_lm(vocab_size=1000, units=32, num_experts=4, k=2,
    ...                 expert_hidden_units=64)
    >>> model(np.ones((2, 7), "int32")).shape
    TensorShape([2, 7, 1000])
    """
    _check_arguments(vocab_size, units, dropout, stateful, batch_size)
    check_non_negative_int("num_shared_experts", num_shared_experts)
    moe_kwargs = dict(
        num_experts=num_experts,
        k=k,
        hidden_units=expert_hidden_units,
        num_groups=num_groups,
        importance_weight=importance_weight,
        load_weight=load_weight,
        capacity_factor=capacity_factor,
        seed=seed,
        gate_learning_rate_multiplier=gate_learning_rate_multiplier,
        router=router,
        num_shared_experts=num_shared_experts,
    )
    batch_shape = (batch_size if stateful else None, None)
    tokens = keras.Input(batch_shape=batch_shape, dtype="int32", name="tokens")

    def lstm(name):
        return keras.layers.LSTM(units, return_sequences=True, stateful=stateful, name=name)

    x = keras.layers.Embedding(vocab_size, units, mask_zero=True, name="embedding")(tokens)
    x = keras.layers.Dropout(dropout, name="embedding_dropout")(x)
    x = residual(x, lstm("lstm_1")(x), dropout, "lstm_1")
    x = _middle_block(x, tokens, model, units, dropout, moe_kwargs, stateful)
    x = residual(x, lstm("lstm_2")(x), dropout, "lstm_2")
    logits = keras.layers.Dense(vocab_size, dtype="float32", name="logits")(x)
    return MoEModel(tokens, logits, name=name or model.replace("-", "_"))
