"""The router contract of `MoELayer`: the `Router` base layer and its `Routing`."""

import inspect
from typing import NamedTuple

import keras
import tensorflow as tf

from tf_moe.layers.checks import check_non_negative, check_not_above, check_positive_int
from tf_moe.ops.gating import router_z_loss
from tf_moe.ops.replicas import cross_replica_sum


def check_per_token(name, value, inputs, own_axes=True):
    """`value` as a tensor, checked to be per token of `inputs`.

    Its leading axes must be those of `inputs` without its last: exactly
    those, or followed by axes of its own where `own_axes` (e.g. noise
    draws [..., n] for inputs [..., d]). Checked statically where both
    shapes are known (a ValueError naming `name`), else when the graph runs
    (an InvalidArgumentError with the same message).
    """
    value = tf.convert_to_tensor(value)
    leading = inputs.shape[:-1]
    rank = len(leading)
    message = f"`{name}` must have the shape of `inputs` without its last axis"
    if own_axes:
        message += " (then axes of its own)"
    if value.shape.rank is not None and (
        value.shape.rank < rank
        or (not own_axes and value.shape.rank != rank)
        or not value.shape[:rank].is_compatible_with(leading)
    ):
        raise ValueError(f"{message}; got {name} shape {value.shape} for inputs shape {inputs.shape}.")
    if not (value.shape[:rank].is_fully_defined() and leading.is_fully_defined()):
        check = tf.debugging.assert_equal(tf.shape(value)[:rank], tf.shape(inputs)[:-1], message=message)
        with tf.control_dependencies([check]):
            value = tf.identity(value)
    return value


class Routing(NamedTuple):
    """One batch's routing, as every `Router` returns it.

    A flat list of A assignments `(token_id, expert_id, weight)` plus the
    per-expert totals that the balancing loss of Shazeer et al. 2017
    (section 4) needs, and the router's own losses and metrics. A NamedTuple
    of tensors and dicts, so `tf.nest` and `keras.tree` walk it like any
    nested structure (it can cross `tf.function` and `strategy.run`).

    Assignments earlier in the list win the slots when an expert's capacity
    runs out, so a token-choice router lists all first choices before all
    second choices.

    Fields:
        token_id: [A] int32, the token (row of the router's [T, d] input)
            of each assignment.
        expert_id: [A] int32, its expert; `num_experts` means not routed
            (a masked token, a choice below a threshold, ...).
        weight: [A] float32, its gate value: the expert's output is
            multiplied by it. 0 where not routed.
        importance: [num_experts] float32, `Importance(X)`: the sum of each
            expert's gate values over the batch.
        load: [num_experts] float32, `Load(X)`: tokens per expert, or a
            smooth estimate of it (appendix A) where the router has one.
        dropped: float32 scalar, assignments the router dropped itself
            (e.g. for a capacity of its own); the MoE counts its own
            capacity drops and reports both as `<layer>_dropped_fraction`.
        losses: dict name -> float32 scalar, the router's own auxiliary
            losses, keys among `router.loss_names`; the MoE adds their sum
            while training. Same keys on every call (0 where a loss is only
            defined while training).
        metrics: dict name -> float32 scalar, the router's diagnostics; its
            keys are `router.metric_names` on every call. The MoE logs their
            batch averages as `<layer>_<name>`.
    """

    token_id: tf.Tensor
    expert_id: tf.Tensor
    weight: tf.Tensor
    importance: tf.Tensor
    load: tf.Tensor
    dropped: tf.Tensor
    losses: dict
    metrics: dict


class Router(keras.layers.Layer):
    """Base layer of the routers (gating networks) of `MoELayer`.

    A router decides which experts process which tokens. The contract every
    router implements:

    * `num_experts` and `k` attributes: the number of experts it routes to
      and the assignments per token that size the MoE's static capacity
      `ceil(capacity_factor * k * tokens / num_experts)`.
    * `call(inputs, training=None, mask=None, **kwargs)` maps a [T, d]
      batch of tokens to one `Routing`. Masked tokens get no assignment
      (expert id `num_experts`), count in neither importance nor load, and
      whatever they hold (NaN from a padded attention row) must reach no
      output, loss or gradient: `masked_tokens` zeroes them first. Extra
      keyword arguments are per-token router inputs (e.g. token ids for a
      router that hashes them), which `MoELayer` checks (`check_per_token`)
      and forwards flattened to [T, ...] like the tokens; one passed as
      None is not forwarded (the router sees its default).
    * A NaN or inf in an unmasked token must not change the routing of
      the others: a router that ranks the whole batch leaves such tokens
      out of the ranking (`MoELayer` gives them a NaN output).
    * `metric_names`: the keys of `Routing.metrics`, fixed per router.
    * `loss_names`: every key `Routing.losses` may hold (a loss whose
      weight is 0 may be left out, as the z-loss is).
    * `uses_balancing_loss`: whether `MoELayer` adds the paper's
      `w_importance * CV(Importance)^2 + w_load * CV(Load)^2` (section 4)
      for this router; a router with a loss of its own may turn it off and
      return its loss in `Routing.losses`.
    * `ops_per_token(input_units)`: multiply-adds per token at inference,
      as the paper's Table 1 counts them; the base counts one gate matmul
      `x W_g` (`input_units * num_experts`), a router without it overrides.
    * `has_logits`: whether the router computes logits; such a router takes
      `z_loss_weight` and returns `z_losses(logits, valid)` among its
      losses (the router z-loss of Zoph et al. 2022, section 3.1, under the
      key "z_loss" when the weight is not 0).
    * `causal`: whether a token's routing depends on that token alone (and
      so never on later tokens of the batch). A router that looks at the
      whole batch (expert choice) is not causal: models warn or refuse it
      where that leaks the future (language models, step-by-step decoding).
    * `required_inputs`: the names of per-token call arguments the router
      cannot route without (e.g. the hash router's `token_ids`); models that
      build an MoE pass those they have.
    * `supports_jit` (Keras's layer attribute, True by default): False for
      a router whose shapes depend on the routing (XLA cannot compile it);
      `MoELayer` then reports False too, so Keras does not jit the model.

    `get_config` holds `num_experts` and `k` wherever the router's
    constructor takes them by name (one that fixes `k`, like
    `SoftmaxRouter(num_experts)`, leaves it out), and `z_loss_weight` where
    the router has logits, so a subclass adds only its own arguments.

    A router may keep state outside the gradient (e.g. per-expert biases)
    in non-trainable variables updated in `call` while training (and only
    then), once per call: under data parallelism from totals summed over
    replicas (`tf_moe.ops.replicas.cross_replica_sum`), into a variable
    created with `aggregation="only_first_replica"`, so that the update
    every replica computes is applied once per step, not once per replica.
    Losses and statistics of the batch are those of the global batch the
    same way. Routers compute in float32 whatever the dtype policy (`dtype`
    defaults to float32).

    Args:
        num_experts: int, number of experts n.
        k: int, assignments per token, 1 <= k <= num_experts.
        z_loss_weight: finite float >= 0, weight of the router z-loss (only
            for routers with logits); 0 adds no loss.
        **kwargs: base layer arguments (`name`, ...).
    """

    # Whether MoELayer adds the importance and load CV^2 losses of section 4.
    uses_balancing_loss = True
    # Keys of `Routing.metrics`.
    metric_names = ()
    # Keys `Routing.losses` may hold: the z-loss of a router with logits.
    loss_names = ("z_loss",)
    # Whether the router computes logits (and so takes a z-loss).
    has_logits = True
    # Whether a token's routing depends on that token alone.
    causal = True
    # Per-token call arguments the router needs.
    required_inputs = ()

    def __init__(self, num_experts, k, z_loss_weight=0.0, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        num_experts = check_positive_int("num_experts", num_experts)
        k = check_positive_int("k", k)
        check_not_above("k", k, "num_experts", num_experts)
        check_non_negative("z_loss_weight", z_loss_weight)
        if z_loss_weight and not self.has_logits:
            raise ValueError(f"`z_loss_weight`: {type(self).__name__} has no logits to put a z-loss on.")
        self.num_experts = num_experts
        self.k = k
        self.z_loss_weight = float(z_loss_weight)
        # Takes a token mask as an argument; its Routing output carries none.
        self.supports_masking = True

    def check_input_shape(self, input_shape):
        """Raises a ValueError unless `input_shape` is [tokens, d] with known d."""
        if len(input_shape) != 2 or input_shape[-1] is None:
            raise ValueError(
                f"`inputs` of {type(self).__name__} must be [tokens, d] with known d, "
                f"got {input_shape}."
            )

    def masked_tokens(self, inputs, mask=None):
        """`(tokens, valid)`: float32 [T, d] tokens with masked rows zeroed, [T] bool mask or None.

        Zeroing (with `tf.where`) before any maths keeps a NaN or inf at a
        masked position out of every value and every gradient.
        """
        x = tf.cast(inputs, tf.float32)
        if mask is None:
            return x, None
        valid = tf.reshape(tf.cast(mask, tf.bool), [-1])
        return tf.where(valid[:, None], x, 0.0), valid

    def rankable_tokens(self, x, valid=None):
        """[T] bool: the tokens a router that ranks the batch may rank.

        Unmasked and finite: a NaN or inf in one token would otherwise
        reorder the ranking, and so change other tokens' routing.
        """
        finite = tf.reduce_all(tf.math.is_finite(x), axis=-1)
        return finite if valid is None else tf.logical_and(finite, valid)

    def z_losses(self, logits, valid=None):
        """`{"z_loss": z_loss_weight * L_z}`, or `{}` when `z_loss_weight` is 0.

        `L_z` is `tf_moe.ops.gating.router_z_loss` of the global batch: the
        mean over the valid rows of all replicas.

        Args:
            logits: [..., tokens, n] float32 router logits.
            valid: optional bool of the shape of `logits` without its last axis.
        """
        if not self.z_loss_weight:
            return {}
        if valid is None:
            count = tf.cast(tf.size(logits) // tf.shape(logits)[-1], tf.float32)
        else:
            count = tf.reduce_sum(tf.cast(valid, tf.float32))
        total, count = cross_replica_sum([router_z_loss(logits, valid) * count, count])
        return {"z_loss": self.z_loss_weight * total / tf.maximum(count, 1.0)}

    def call(self, inputs, training=None, mask=None):
        raise NotImplementedError(f"{type(self).__name__} must implement `call` returning a Routing.")

    def ops_per_token(self, input_units):
        """Multiply-adds the router spends on one token of width `input_units` at inference.

        The gate matmul `x W_g` of a router with `num_experts` logits per
        token; routers that compute something else override this.
        """
        return input_units * self.num_experts

    def compute_mask(self, inputs, mask=None):
        return None

    def get_config(self):
        config = super().get_config()
        # A subclass whose constructor fixes or derives one of them must
        # not get it back from its config.
        arguments = inspect.signature(type(self).__init__).parameters
        config.update({key: getattr(self, key) for key in ("num_experts", "k") if key in arguments})
        if self.has_logits:
            config["z_loss_weight"] = self.z_loss_weight
        return config
