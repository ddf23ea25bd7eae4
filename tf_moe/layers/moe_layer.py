"""The sparsely-gated Mixture-of-Experts layer (Shazeer et al. 2017)."""

import keras
import numpy as np
import tensorflow as tf

from tf_moe._internals import in_xla_compilation
from tf_moe.layers.checks import (
    check_bool,
    check_capacity_factor,
    check_keras_object,
    check_non_negative,
    check_non_negative_int,
    check_positive_int,
)
from tf_moe.layers.experts import Experts
from tf_moe.layers.feed_forward_experts import FeedForwardExperts
from tf_moe.layers.replica_losses import use_thread_local_losses
from tf_moe.layers.router import check_per_token
from tf_moe.layers.router_registry import get_router
from tf_moe.metrics import LoadBalanceMetrics
from tf_moe.ops import dispatch as dispatch_ops
from tf_moe.ops.gating import cv_squared
from tf_moe.ops.replicas import cross_replica_sum

# MoELayer's arguments that describe its default FeedForwardExperts, with their defaults.
_FEED_FORWARD_ARGUMENTS = dict(
    hidden_units=None, output_units=None, activation="relu", gated=False, use_bias=True,
    kernel_initializer=None, bias_initializer="zeros", kernel_regularizer=None, bias_regularizer=None,
)


# The router of `MoELayer(num_experts, k, hidden_units)`; docs/results.md
# measures it against the matched dense models.
DEFAULT_ROUTER = "top_k"

# The weight of each of the paper's balancing losses when none is given
# (as in the paper's experiments, Table 6).
DEFAULT_BALANCING_WEIGHT = 0.1


def flatten_tokens(inputs, mask):
    """Flattens [..., d] inputs (and [...] mask) into one batch of tokens.

    The mask's shape is checked against `inputs.shape[:-1]` (see
    `check_per_token`).

    Returns `(tokens [T, d], valid [T] bool or None, num_tokens)`, with
    `num_tokens` a Python int when the leading shape is static.
    """
    leading = inputs.shape[:-1]
    if mask is not None:
        mask = check_per_token("mask", mask, inputs, own_axes=False)
    tokens = tf.reshape(inputs, [-1, inputs.shape[-1]])
    if leading.is_fully_defined():
        num_tokens = int(np.prod(leading, dtype=np.int64))
    else:
        num_tokens = tf.shape(tokens)[0]
    valid = None if mask is None else tf.reshape(tf.cast(mask, tf.bool), [-1])
    return tokens, valid, num_tokens


def flatten_router_inputs(router_inputs, inputs):
    """Per-token router inputs [*leading, ...] -> [T, ...], each checked against `inputs`.

    Inputs given as None are left out, so the router sees its default.
    """
    leading_rank = len(inputs.shape) - 1

    def flatten(name, value):
        value = check_per_token(name, value, inputs)
        rest = [
            d if d is not None else tf.shape(value)[leading_rank + i]
            for i, d in enumerate(value.shape[leading_rank:])
        ]
        return tf.reshape(value, [-1] + rest)

    return {
        name: tf.nest.map_structure(lambda part, name=name: flatten(name, part), value)
        for name, value in router_inputs.items()
        if value is not None
    }


def _not_finite_to_nan(tokens, valid, outputs):
    """NaN outputs for the unmasked tokens that hold NaN or inf, whatever routed them.

    Token-choice routing passes the NaN on by itself, but a token that a
    router left unrouted (or a capacity dropped) would otherwise get 0.
    """
    not_finite = tf.logical_not(tf.reduce_all(tf.math.is_finite(tokens), axis=-1))
    if valid is not None:
        not_finite = tf.logical_and(not_finite, valid)
    return tf.where(not_finite[:, None], tf.constant(np.nan, outputs.dtype), outputs)


class _RoutingRecord:
    """The last eager `Routing` of each replica of a layer.

    A plain object, so Keras and TensorFlow do not track it: it is no state
    to save (a tracked dict of tensors would break `SavedModel` export).
    """

    def __init__(self):
        self.by_replica = {}


def _replica_id():
    """The id of the replica this eager code runs on (0 outside a replica context)."""
    context = tf.distribute.get_replica_context()
    return 0 if context is None else int(context.replica_id_in_sync_group)


@keras.saving.register_keras_serializable(package="tf_moe")
class MoELayer(keras.layers.Layer):
    """Sparsely-gated Mixture-of-Experts layer (Shazeer et al. 2017).

    `y = sum_i G(x)_i E_i(x)` (section 2): a router sends each token to a
    few of `num_experts` feed-forward experts, and only those experts run
    on it. All leading axes of the input are flattened into one batch of
    tokens (the paper's "convolutionality", section 3.1), so an MoE after an
    LSTM runs on every time step at once. The router is pluggable (see
    `tf_moe.routers`):

    * `"top_k"` (default, `TopKRouter`): a softmax over all experts, each
      token sent to its k most probable, weighted by their probabilities,
      with the `f · P` load-balancing loss (Lepikhin et al. 2020; Fedus et
      al. 2022); docs/results.md measures it against the matched dense FFN
      in a Transformer and an LSTM language model;
    * `"noisy_top_k"`: the paper's noisy top-k gating exactly, section 2.1;
    * `"top_k_gate"` (`TopKGateRouter`): the paper's gate without its
      noise, on RMS-normalised tokens (the default before `"top_k"`);
    * `"softmax"`: the dense softmax baseline, every expert on every token;
    * `"batchwise"`: strictly balanced gating, appendix F;
    * `HierarchicalRouter(...)`: the two-level hierarchical MoE, appendix B;
    * `"switch"`: softmax top-1 routing with the `f · P` loss (Fedus et al.
      2022);
    * `"expert_choice"`: each expert takes its top tokens (Zhou et al. 2022);
    * `"loss_free"`: top-k balanced by per-expert biases (Wang et al. 2024;
      DeepSeek-V3);
    * `"hash"`: a fixed map of the token ids (Roller et al. 2021), which it
      needs as a call argument: `moe(x, token_ids=ids)`;
    * any `tf_moe.routers.Router` subclass.

    While training it adds the router's own losses (the default's `f · P`
    loss) and, for routers whose `uses_balancing_loss` is True (the
    paper's), `importance_weight * CV(Importance)^2 + load_weight *
    CV(Load)^2` (section 4; Importance and Load summed over replicas under
    data parallelism) with `add_loss`. It reports in the `fit` logs (and,
    through `evaluate` and `fit` validation, for the noise-free inference
    routing under `val_`) `<name>_cv_importance`, `<name>_cv_load`,
    `<name>_max_over_mean_load`, `<name>_aux_loss`,
    `<name>_dropped_fraction`, `<name>_unrouted_fraction` (tokens that got
    no expert at all) and each router metric as `<name>_<metric>` (the noisy
    top-k router's `topk_agreement` and `noise_to_signal`).

    `num_shared_experts` adds always-on experts (DeepSeekMoE, Dai et al.
    2024, section 3.2): experts of the same architecture, with their own
    stacked weights, that run on every unmasked token and whose outputs are
    added to the routed mixture, `y = sum_j S_j(x) + sum_i G(x)_i E_i(x)`.

    The experts are a `FeedForwardExperts` bank made from `hidden_units`,
    `activation`, `gated` (SwiGLU with `activation="silu"`) and the other
    feed-forward arguments, or any expert bank passed as `experts`: a
    `tf_moe.Experts` layer mapping `[num_experts, slots, d]` to
    `[num_experts, slots, out]` (see `Experts` for the contract).

    A NaN or inf in an unmasked token stays in that token: its output is
    NaN (so is the loss, which `keras.callbacks.TerminateOnNaN` and loss
    scaling see), never a silent 0, and it changes no other token's
    routing or output beyond taking its own assignments' slots like any
    token: routers that rank the whole batch (expert choice, batchwise
    while training) leave it out of the ranking, so the others are routed
    as if it were masked. Mask the token to drop it.

    Args:
        num_experts: int, number of experts n (None: the router's).
        k: int, experts per token (None: the router's).
        hidden_units: int, hidden width of each expert (required unless
            `experts` is given).
        output_units: int or None, output width (None: the input width).
        activation: activation of the experts' hidden layer (of its gate
            when `gated`).
        gated: bool, gated linear unit experts (`FeedForwardExperts`).
        router: a router name (one of `tf_moe.routers.NAMES`, listed
            above), a `Router` instance (e.g. `NoisyTopKRouter(n, k,
            seed=0)` or `HierarchicalRouter(...)`) or its serialized
            config. A name needs `num_experts` and `k` (see
            `tf_moe.routers.get` for the routers whose `k` is fixed).
        importance_weight: finite float >= 0, w_importance of the paper's
            balancing losses, for the routers that use them
            (`uses_balancing_loss`: `"noisy_top_k"`, `"top_k_gate"`,
            `"softmax"`, `"batchwise"`, hierarchical); None: 0.1. A router
            that balances itself has its own weight (`TopKRouter(n, k,
            balance_weight=...)`): setting this with one is an error, not
            a no-op.
        load_weight: finite float >= 0, w_load, likewise.
        capacity_factor: None for exact, dropless dispatch (each expert's
            buffer grows to its token count: a dynamic shape; with
            `FeedForwardExperts`, only the fullest experts get the slots
            beyond those every expert needs, see
            `tf_moe.ops.dispatch.split_dispatch`; compiled by
            XLA, the buffer instead takes the smallest of a few static
            sizes that holds every expert, and the backward pass reruns
            the experts' forward pass, see
            `tf_moe.ops.dispatch.dropless_static`). A finite
            float > 0 gives every expert a static capacity of
            `ceil(capacity_factor * k * tokens / num_experts)` slots
            (computed exactly, at least one for a non-empty batch), the
            path that compiles with XLA and runs on TPUs; assignments over
            capacity contribute zero and are counted as dropped. Used
            while training (and, unless `eval_capacity_factor` is given,
            at inference).
        eval_capacity_factor: None (the default: as `capacity_factor`) or
            a finite float > 0, the capacity factor at inference
            (`training=False`: `evaluate`, `predict`, exports). Mesh
            TensorFlow and Flaxformer evaluate with a larger factor than
            they train with (e.g. 2.0 against 1.25), so that inference
            drops fewer tokens. With `capacity_factor=None` and this set,
            training is dropless and inference static.
        num_shared_experts: int >= 0, experts applied to every unmasked
            token besides the routed ones (DeepSeekMoE); 0 for none.
        use_bias: whether the experts' layers have biases.
        kernel_initializer, bias_initializer, kernel_regularizer,
            bias_regularizer: for the experts' weights.
        experts: None (a `FeedForwardExperts` bank from the arguments
            above), or an expert bank: a `tf_moe.Experts` layer of
            `num_experts` experts or its serialized config. With a bank, leave
            the feed-forward arguments above at their defaults.
        **kwargs: base layer arguments (`name`, `dtype`, ...).

    Call arguments:
        inputs: [..., d] tensor of rank >= 2.
        training: bool, enables the router's training behaviour (noise, the
            smooth load) and the losses.
        mask: optional bool tensor of shape `inputs.shape[:-1]` (Keras masks
            are used automatically): masked tokens are not routed, their
            output is zero, they count in neither importance nor load, and
            what they hold (even NaN) reaches no output, loss or gradient.
        inputs_mask: where Keras puts the mask of `inputs` when the layer
            is called with router inputs too (it passes `mask` only to
            layers called with one tensor); used when `mask` is None.
        **router_inputs: per-token inputs of the router, of shape
            `inputs.shape[:-1] + ...`, flattened like the tokens (e.g.
            `noise` draws for the noisy top-k router, `token_ids` for the
            hash router).
        return_routing: bool, also return the call's `Routing` (as
            `keras.layers.MultiHeadAttention` returns its attention scores).

    Returns:
        [..., output_units or d], or `(outputs, routing)` with
        `return_routing=True`. An eager call also keeps its `Routing` in
        `last_routing`, for inspection tools (`tf_moe.training.expert_loads`).

    Example:

    >>> inputs = keras.Input((None, 64))
    >>> outputs = MoELayer(num_experts=8, k=2, hidden_units=128)(inputs)
    >>> model = keras.Model(inputs, outputs)
    >>> model(np.zeros((2, 5, 64), "float32")).shape
    TensorShape([2, 5, 64])
    >>> hierarchical = MoELayer(
    ...     hidden_units=128, router=HierarchicalRouter(num_groups=4, experts_per_group=4))
    """

    # Layer class of the expert bank; the expert-parallel subclass shards it.
    experts_class = FeedForwardExperts
    # Prefix of unnamed layers' names (Keras would derive "mo_e_layer" from the class).
    default_name = "moe"

    def __init__(
        self,
        num_experts=None,
        k=None,
        hidden_units=None,
        output_units=None,
        activation="relu",
        router=DEFAULT_ROUTER,
        importance_weight=None,
        load_weight=None,
        capacity_factor=None,
        eval_capacity_factor=None,
        num_shared_experts=0,
        use_bias=True,
        kernel_initializer=None,
        bias_initializer="zeros",
        kernel_regularizer=None,
        bias_regularizer=None,
        gated=False,
        experts=None,
        **kwargs,
    ):
        if "name" not in kwargs:
            uid = keras.backend.get_uid(self.default_name)
            kwargs["name"] = self.default_name if uid == 1 else f"{self.default_name}_{uid - 1}"
        super().__init__(**kwargs)
        feed_forward = dict(
            hidden_units=hidden_units, output_units=output_units, activation=activation, gated=gated,
            use_bias=use_bias, kernel_initializer=kernel_initializer, bias_initializer=bias_initializer,
            kernel_regularizer=kernel_regularizer, bias_regularizer=bias_regularizer,
        )
        experts = _expert_bank(experts, feed_forward)
        if experts is None:
            hidden_units, output_units, gated = _checked_bank_shape(hidden_units, output_units, gated)
        check_capacity_factor(capacity_factor)
        check_capacity_factor(eval_capacity_factor, "eval_capacity_factor")
        num_shared_experts = check_non_negative_int("num_shared_experts", num_shared_experts)
        self.router = _router_for(router, num_experts, k)
        self.num_experts = self.router.num_experts
        self.k = self.router.k
        if experts is not None and experts.num_experts != self.num_experts:
            raise ValueError(
                f"`experts` holds {experts.num_experts} experts, the router routes to {self.num_experts}."
            )
        # The bank given, or None until `build` makes the default one.
        self.experts = experts
        self.gated = gated
        self.hidden_units = hidden_units
        self.output_units = output_units
        self.activation = check_keras_object("activation", keras.activations, activation)
        self.importance_weight, self.load_weight = _balancing_weights(
            self.router, importance_weight=importance_weight, load_weight=load_weight
        )
        self.capacity_factor = None if capacity_factor is None else float(capacity_factor)
        self.eval_capacity_factor = None if eval_capacity_factor is None else float(eval_capacity_factor)
        self.num_shared_experts = num_shared_experts
        self.use_bias = check_bool("use_bias", use_bias)
        _check_initializers_and_regularizers(feed_forward)
        self.kernel_initializer = kernel_initializer
        self.bias_initializer = bias_initializer
        self.kernel_regularizer = kernel_regularizer
        self.bias_regularizer = bias_regularizer
        self.supports_masking = True
        # Dropless dispatch compiles (`dispatch_ops.dropless_static`); a router
        # whose own buffers are sized by the routing does not, and Keras's
        # default `jit_compile="auto"` then leaves the model unjitted.
        self.supports_jit = self.router.supports_jit
        use_thread_local_losses(self)
        self._last_routings = _RoutingRecord()
        self.balance = LoadBalanceMetrics(name=self.name, router_metrics=self.router.metric_names)

    @property
    def gate(self):
        """The router, under the name tf_moe 0.1 gave it.

        Its weights are saved under this name too (Keras saves a sublayer
        under the first attribute, alphabetically, that holds it), so
        `.keras` and `.weights.h5` files of either version load.
        """
        return self.router

    def build(self, input_shape):
        if len(input_shape) < 2:
            raise ValueError(
                f"`inputs` of {type(self).__name__} must have rank >= 2 ([..., d]), got shape "
                f"{input_shape}."
            )
        input_units = input_shape[-1]
        if input_units is None:
            raise ValueError(f"The last axis of `inputs` must be known, got shape {input_shape}.")
        self.input_spec = keras.layers.InputSpec(min_ndim=2, axes={-1: input_units})
        if not self.router.built:
            self.router.build((None, input_units))
        self.experts = self._build_experts(self.num_experts, input_units)
        self.shared_experts = None
        if self.num_shared_experts:
            # Never sharded: every token needs them on its own replica.
            self.shared_experts = self._feed_forward_bank(
                FeedForwardExperts, self.num_shared_experts, input_units, "shared_experts"
            )

    def _build_experts(self, num_experts, input_units):
        """Builds the routed expert bank: the one given, or a new one (subclasses may shard it)."""
        if self.experts is not None:
            if not self.experts.built:
                self.experts.build((num_experts, None, input_units))
            return self.experts
        return self._feed_forward_bank(self.experts_class, num_experts, input_units, "experts")

    def _feed_forward_bank(self, experts_class, num_experts, input_units, name):
        """A built bank of `num_experts` experts like the routed ones (a copy of a given bank's config)."""
        if self.hidden_units is None:  # a bank given as `experts`: one more of its kind
            config = {**self.experts.get_config(), "num_experts": num_experts, "name": name}
            experts = type(self.experts).from_config(config)
        else:
            experts = experts_class(
                num_experts,
                self.hidden_units,
                self.output_units or input_units,
                activation=self.activation,
                use_bias=self.use_bias,
                gated=self.gated,
                kernel_initializer=self.kernel_initializer,
                bias_initializer=self.bias_initializer,
                kernel_regularizer=self.kernel_regularizer,
                bias_regularizer=self.bias_regularizer,
                dtype=self.dtype_policy,
                name=name,
            )
        experts.build((num_experts, None, input_units))
        return experts

    def call(self, inputs, training=None, mask=None, inputs_mask=None, return_routing=False, **router_inputs):
        if mask is None:
            mask = inputs_mask
        tokens, valid, num_tokens = flatten_tokens(inputs, mask)
        router_inputs = flatten_router_inputs(router_inputs, inputs)
        routing = self.router(tokens, training=training, mask=valid, **router_inputs)
        if tf.executing_eagerly():
            self._last_routings.by_replica[_replica_id()] = routing
        if set(routing.metrics) != set(self.router.metric_names):
            raise ValueError(
                f"{type(self.router).__name__} returned the metrics {sorted(routing.metrics)}, "
                f"not its `metric_names` {sorted(self.router.metric_names)}."
            )
        if not set(routing.losses) <= set(self.router.loss_names):
            raise ValueError(
                f"{type(self.router).__name__} returned the losses {sorted(routing.losses)}, "
                f"not among its `loss_names` {sorted(self.router.loss_names)}."
            )
        capacity_factor = self.capacity_factor if training else self.inference_capacity_factor
        if capacity_factor is None and in_xla_compilation():
            # Dropless with static shapes: XLA cannot compile a capacity read from the data.
            outputs = dispatch_ops.dropless_static(
                tokens, routing.token_id, routing.expert_id, routing.weight, self.num_experts,
                num_tokens, self.experts,
            )
            kept = routing.expert_id < self.num_experts
        elif capacity_factor is None and self.experts.overflow_cost is not None:
            outputs, kept = self._split_dropless(tokens, routing, num_tokens)
        else:
            capacity = None
            if capacity_factor is not None:
                capacity = dispatch_ops.static_capacity(capacity_factor, self.k * num_tokens, self.num_experts)
            buffer, slot, kept, _ = dispatch_ops.dispatch(
                tokens, routing.token_id, routing.expert_id, self.num_experts, capacity
            )
            outputs = dispatch_ops.combine(
                self.experts(buffer), slot, kept, routing.token_id, routing.weight, num_tokens
            )
        if self.shared_experts is not None:
            outputs = outputs + self._shared_outputs(tokens, valid)
        outputs = _not_finite_to_nan(tokens, valid, outputs)
        self._add_losses_and_track(routing, kept, valid, num_tokens, training)
        outputs = tf.reshape(outputs, tf.concat([tf.shape(inputs)[:-1], [outputs.shape[-1]]], 0))
        return (outputs, routing) if return_routing else outputs

    def _split_dropless(self, tokens, routing, num_tokens):
        """Dropless dispatch that pads only the fullest experts (`dispatch_ops.split_dispatch`): (outputs, kept)."""
        split = dispatch_ops.split_dispatch(
            tokens, routing.token_id, routing.expert_id, self.num_experts, self.experts.overflow_cost
        )
        outputs, overflow_outputs = self.experts.call_split(split.buffer, split.overflow, split.overflow_experts)
        units = outputs.shape[-1]
        flat = tf.concat([tf.reshape(outputs, [-1, units]), tf.reshape(overflow_outputs, [-1, units])], axis=0)
        outputs = dispatch_ops.combine(flat, split.slot, split.kept, routing.token_id, routing.weight, num_tokens)
        return outputs, split.kept

    @property
    def last_routing(self):
        """The `Routing` of the layer's last eager call on this replica (None before one).

        Calls traced in a `tf.function` (`fit`, `predict`) keep none. Under a
        distribution strategy each replica keeps its own: read it in the
        replica context of the call.
        """
        return self._last_routings.by_replica.get(_replica_id())

    @property
    def inference_capacity_factor(self):
        """The capacity factor used at inference: `eval_capacity_factor`, else `capacity_factor`."""
        return self.capacity_factor if self.eval_capacity_factor is None else self.eval_capacity_factor

    def _shared_outputs(self, tokens, valid):
        """`sum_j S_j(x)` of the shared experts on every token; 0 on masked ones.

        A bank that `broadcasts_tokens` (`FeedForwardExperts`) takes the
        [1, T, d] tokens as they are: one batched matmul against the
        stacked kernels, no copy of the tokens per expert; any other bank
        gets them repeated to [S, T, d], its contract's buffer. Masked
        tokens are zeroed first, so what they hold reaches nothing.
        """
        if valid is not None:
            tokens = tf.where(valid[:, None], tokens, tf.zeros((), tokens.dtype))
        tokens = tokens[None]
        if not self.shared_experts.broadcasts_tokens:
            tokens = tf.tile(tokens, [self.num_shared_experts, 1, 1])
        outputs = tf.reduce_sum(self.shared_experts(tokens), axis=0)
        if valid is not None:
            outputs = tf.where(valid[:, None], outputs, tf.zeros((), outputs.dtype))
        return outputs

    def _add_losses_and_track(self, routing, kept, valid, num_tokens, training):
        importance, load = cross_replica_sum([routing.importance, routing.load])
        losses = list(routing.losses.values())
        if self.router.uses_balancing_loss:
            balancing = self.importance_weight * cv_squared(importance) + self.load_weight * cv_squared(load)
            losses.insert(0, balancing)
        aux_loss = tf.add_n(losses) if losses else tf.zeros(())
        if training:
            self.add_loss(aux_loss)
        routed = tf.reduce_sum(tf.cast(routing.expert_id < self.num_experts, tf.float32)) + routing.dropped
        dropped = routed - tf.reduce_sum(tf.cast(kept, tf.float32))
        reached = tf.math.unsorted_segment_sum(tf.cast(kept, tf.float32), routing.token_id, num_tokens)
        if valid is None:
            tokens = tf.cast(num_tokens, tf.float32)
        else:
            tokens = tf.reduce_sum(tf.cast(valid, tf.float32))
        unrouted = tokens - tf.reduce_sum(tf.cast(reached > 0, tf.float32))
        self.balance.update_state(
            importance, load, dropped, routed, aux_loss, unrouted, tokens, routing.metrics
        )

    def ops_per_token(self):
        """Multiply-adds one token costs at inference: the router, its `k` experts and the shared ones.

        Counted as the paper's Table 1 counts ops/timestep. Needs the layer
        built.
        """
        if not self.built:
            raise ValueError(f"{self.name} must be built before counting its ops.")
        input_units = self.input_spec.axes[-1]
        experts = self.k + self.num_shared_experts
        return self.router.ops_per_token(input_units) + experts * self.experts.ops_per_token()

    def compute_output_shape(self, input_shape):
        if self.experts is not None:
            return tuple(input_shape[:-1]) + (self.experts.output_units or input_shape[-1],)
        return tuple(input_shape[:-1]) + (self.output_units or input_shape[-1],)

    def compute_output_spec(self, *args, return_routing=False, **kwargs):
        if return_routing:
            # Traced: which losses a `Routing` holds depends on the router.
            return keras.Operation.compute_output_spec(self, *args, return_routing=True, **kwargs)
        return super().compute_output_spec(*args, **kwargs)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_experts": self.num_experts,
                "k": self.k,
                "hidden_units": self.hidden_units,
                "output_units": self.output_units,
                "activation": keras.activations.serialize(self.activation),
                "router": keras.layers.serialize(self.router),
                "importance_weight": self.importance_weight,
                "load_weight": self.load_weight,
                "capacity_factor": self.capacity_factor,
                "eval_capacity_factor": self.eval_capacity_factor,
                "num_shared_experts": self.num_shared_experts,
                "use_bias": self.use_bias,
                "kernel_initializer": _serialize(keras.initializers, self.kernel_initializer),
                "bias_initializer": _serialize(keras.initializers, self.bias_initializer),
                "kernel_regularizer": _serialize(keras.regularizers, self.kernel_regularizer),
                "bias_regularizer": _serialize(keras.regularizers, self.bias_regularizer),
                "gated": self.gated,
                "experts": None,
            }
        )
        if self.hidden_units is None:
            # A given bank: it carries the feed-forward settings itself.
            config.update(_FEED_FORWARD_ARGUMENTS, experts=keras.layers.serialize(self.experts))
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        if isinstance(config.get("router"), dict):
            config["router"] = get_router(config["router"])
            if not config["router"].uses_balancing_loss:
                # Files saved before the weights could be None hold 0.1 for every router.
                for key in ("importance_weight", "load_weight"):
                    if config.get(key) == DEFAULT_BALANCING_WEIGHT:
                        config[key] = None
        return super().from_config(config)


def _balancing_weights(router, **weights):
    """`(importance_weight, load_weight)` for `router`: floats if it uses the CV^2 losses, else None.

    A weight given for a router that balances itself would do nothing: it
    is an error naming the argument.
    """
    resolved = []
    for name, value in weights.items():
        if router.uses_balancing_loss:
            value = DEFAULT_BALANCING_WEIGHT if value is None else value
            check_non_negative(name, value)
            value = float(value)
        elif value is not None:
            raise ValueError(
                f"`{name}` weighs the CV^2 balancing losses of the routers that use them; "
                f"{type(router).__name__} balances itself (its own loss weight, e.g. `balance_weight`, "
                f"sets that): leave `{name}` None."
            )
        resolved.append(value)
    return tuple(resolved)


def _checked_bank_shape(hidden_units, output_units, gated):
    """`(hidden_units, output_units, gated)` of the default bank, checked (`hidden_units` is required)."""
    if hidden_units is None:
        raise ValueError("`hidden_units` (the experts' hidden width) is required.")
    hidden_units = check_positive_int("hidden_units", hidden_units)
    if output_units is not None:
        output_units = check_positive_int("output_units", output_units)
    return hidden_units, output_units, check_bool("gated", gated)


def _router_for(router, num_experts, k):
    """The `Router` that `router` names; `num_experts` and `k`, where given, must be its own."""
    router = get_router(router, num_experts, k)
    for arg, value, routers_value in (("num_experts", num_experts, router.num_experts), ("k", k, router.k)):
        if value is not None and value != routers_value:
            raise ValueError(
                f"`{arg}` ({value!r}) differs from the router's ({routers_value}); pass None to use the router's."
            )
    return router


def _check_initializers_and_regularizers(feed_forward):
    """Fails, naming the argument, on an initializer or regularizer Keras cannot read.

    The layer keeps them as given (the experts resolve them; None: their own
    default), so a bad one would otherwise fail only at the first call.
    """
    for arg, module in (
        ("kernel_initializer", keras.initializers),
        ("bias_initializer", keras.initializers),
        ("kernel_regularizer", keras.regularizers),
        ("bias_regularizer", keras.regularizers),
    ):
        check_keras_object(arg, module, feed_forward[arg])


def _serialize(module, value):
    return None if value is None else module.serialize(module.get(value))


def _expert_bank(experts, feed_forward):
    """The `Experts` layer that `experts` (None, a bank or its config) names, checked against `feed_forward`.

    A given bank replaces the feed-forward arguments: any of them set away
    from its default is an error rather than silently ignored.
    """
    if experts is None:
        return None
    if isinstance(experts, dict):
        experts = keras.layers.deserialize(experts)
    if not isinstance(experts, Experts):
        raise ValueError(
            f"`experts` must be None, a tf_moe.Experts layer or its config, got {type(experts).__name__}."
        )
    conflicting = [name for name, value in feed_forward.items() if value != _FEED_FORWARD_ARGUMENTS[name]]
    if conflicting:
        raise ValueError(
            f"`experts` is given, so the feed-forward arguments {conflicting} must be left at their "
            "defaults: set them on the expert bank."
        )
    return experts
