"""A decoder-only Transformer language model with MoE feed-forward blocks, and its dense twin."""

import math

import keras

from tf_moe import routers
from tf_moe.layers.checks import check_non_negative_int
from tf_moe.layers.moe_layer import MoELayer
from tf_moe.layers.position_embedding import PositionEmbedding
from tf_moe.layers.upcycling import UPCYCLING_ROUTER, load_dense_ffn
from tf_moe.models.lstm_lm import residual, router_inputs, warn_if_not_causal
from tf_moe.training.model import MoEModel

TRANSFORMER_KINDS = ("moe", "dense")


def _check_arguments(vocab_size, units, num_layers, num_heads, ffn_units, moe_every, dropout, model):
    for arg, value in (
        ("vocab_size", vocab_size), ("units", units), ("num_layers", num_layers),
        ("num_heads", num_heads), ("moe_every", moe_every),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`{arg}` must be a positive int, got {value!r}.")
    if ffn_units is not None and (isinstance(ffn_units, bool) or not isinstance(ffn_units, int) or ffn_units < 1):
        raise ValueError(f"`ffn_units` must be a positive int or None, got {ffn_units!r}.")
    if units % num_heads:
        raise ValueError(f"`units` ({units}) must be a multiple of `num_heads` ({num_heads}).")
    if not 0 <= dropout < 1:
        raise ValueError(f"`dropout` must be in [0, 1), got {dropout!r}.")
    if model not in TRANSFORMER_KINDS:
        raise ValueError(f"`model` must be one of {TRANSFORMER_KINDS}, got {model!r}.")


def _dense_ffn(x, hidden_units, units, name):
    h = keras.layers.Dense(hidden_units, activation="relu", name=f"{name}_hidden")(x)
    return keras.layers.Dense(units, name=f"{name}_output")(h)


def transformer_lm(
    vocab_size,
    units=128,
    num_layers=2,
    num_heads=4,
    num_experts=16,
    k=2,
    expert_hidden_units=256,
    ffn_units=None,
    moe_every=1,
    max_length=256,
    dropout=0.1,
    model="moe",
    router=None,
    moe_arguments=None,
    num_shared_experts=0,
    name=None,
):
    """A causal, pre-LayerNorm Transformer language model whose FFN blocks are MoE layers.

    `token + position embedding -> num_layers x [x + Attention(LN(x)), x +
    FFN(LN(x))] -> LN -> softmax`, with causal multi-head self-attention
    (Vaswani et al. 2017; pre-LayerNorm as GPT-2, Radford et al. 2019).
    With `model="moe"` the FFN of every `moe_every`-th block (the last of
    each run of `moe_every`: every block with 1, every other one with 2 as
    in GShard and the Switch Transformer) is `tf_moe.MoELayer(num_experts,
    k, expert_hidden_units)` with nothing else set unless `router` or
    `moe_arguments` say so; the other blocks keep a dense FFN of
    `ffn_units`. `model="dense"` is the computationally matched twin: every
    FFN dense and `ffn_units` wide, which by default is `(k +
    num_shared_experts) * expert_hidden_units + ceil(num_experts / 2)`: the
    multiply-adds of the experts a token visits (its k routed ones and the
    shared ones) and of the router's `d * n` logits, so both
    models cost the same ops per timestep (`tf_moe.models.ops_per_timestep`,
    up to rounding for an odd `num_experts`).

    Token id 0 is padding: it is masked from the embedding on, so padding
    changes neither the real positions' logits nor the routing, and
    `MoEModel` leaves it out of the loss.

    Args:
        vocab_size: int, vocabulary size (id 0 is padding).
        units: int, model width d.
        num_layers: int, Transformer blocks.
        num_heads: int, attention heads (`units` must be a multiple).
        num_experts: int, experts per MoE layer.
        k: int, experts per token.
        expert_hidden_units: int, hidden width of each expert.
        ffn_units: int or None, hidden width of the dense FFNs (None:
            `(k + num_shared_experts) * expert_hidden_units +
            ceil(num_experts / 2)`, the matched width).
        moe_every: int, an MoE in every `moe_every`-th block.
        max_length: int, longest sequence (learned position embeddings).
        dropout: float in [0, 1), on attention weights and on each
            sublayer's output before its residual add.
        model: "moe" or "dense".
        router: None for `MoELayer`'s default router, or a router name of
            `tf_moe.routers`, a `Router` config (a fresh router is made from
            it for each MoE block). A router that routes by token id (hash)
            gets the model's input ids.
        moe_arguments: optional dict of further `MoELayer` arguments
            (e.g. `importance_weight`).
        num_shared_experts: int >= 0, always-on experts of each MoE layer
            beside the `k` routed ones (`MoELayer`'s; DeepSeekMoE, Dai et
            al. 2024).
        name: model name (default "transformer_<model>").

    Returns:
        A `MoEModel` mapping int token ids `[batch, time]` to float32 logits
        `[batch, time, vocab_size]`; compile it with an optimizer only.

    Example:

    >>> model = transformer_lm(vocab_size=100, units=32, num_heads=2, num_experts=4,
    ...                        k=2, expert_hidden_units=32)
    >>> model(np.ones((2, 7), "int32")).shape
    TensorShape([2, 7, 100])
    """
    _check_arguments(vocab_size, units, num_layers, num_heads, ffn_units, moe_every, dropout, model)
    if isinstance(router, keras.layers.Layer):
        raise ValueError("`router`: pass a name or a config; each MoE block needs a router of its own.")
    num_shared_experts = check_non_negative_int("num_shared_experts", num_shared_experts)
    ffn_units = ffn_units or (k + num_shared_experts) * expert_hidden_units + math.ceil(num_experts / 2)
    tokens = keras.Input(shape=(None,), dtype="int32", name="tokens")
    x = keras.layers.Embedding(vocab_size, units, mask_zero=True, name="embedding")(tokens)
    x = PositionEmbedding(max_length, name="position_embedding")(x)
    x = keras.layers.Dropout(dropout, name="embedding_dropout")(x)
    for block in range(1, num_layers + 1):
        prefix = f"block_{block}"
        h = keras.layers.LayerNormalization(epsilon=1e-5, name=f"{prefix}_attention_norm")(x)
        h = keras.layers.MultiHeadAttention(
            num_heads, units // num_heads, dropout=dropout, name=f"{prefix}_attention"
        )(h, h, use_causal_mask=True)
        x = residual(x, h, dropout, f"{prefix}_attention")
        h = keras.layers.LayerNormalization(epsilon=1e-5, name=f"{prefix}_ffn_norm")(x)
        if model == "moe" and block % moe_every == 0:
            layer_router = None if router is None else routers.get(
                router if isinstance(router, str) else dict(router), num_experts, k
            )
            if layer_router is not None:
                warn_if_not_causal(layer_router)
            moe = MoELayer(
                num_experts, None if layer_router is not None else k, expert_hidden_units,
                **({} if layer_router is None else {"router": layer_router}),
                num_shared_experts=num_shared_experts, **(moe_arguments or {}), name=f"{prefix}_moe",
            )
            h = moe(h, **router_inputs(moe.router, tokens))
        else:
            h = _dense_ffn(h, ffn_units, units, f"{prefix}_ffn")
        x = residual(x, h, dropout, f"{prefix}_ffn")
    x = keras.layers.LayerNormalization(epsilon=1e-5, name="final_norm")(x)
    logits = keras.layers.Dense(vocab_size, dtype="float32", name="logits")(x)
    return MoEModel(tokens, logits, name=name or f"transformer_{model}")


def _dense_architecture(model):
    """The `transformer_lm` arguments of a dense model it built, read off its layers."""
    blocks = 0
    while f"block_{blocks + 1}_ffn_hidden" in {layer.name for layer in model.layers}:
        blocks += 1
    if not blocks or any(layer.name.endswith("_moe") for layer in model.layers):
        raise ValueError("`dense_model` must be a dense model made by `transformer_lm(model=\"dense\")`.")
    embedding = model.get_layer("embedding")
    attention = model.get_layer("block_1_attention")
    return dict(
        vocab_size=embedding.input_dim,
        units=embedding.output_dim,
        num_layers=blocks,
        num_heads=attention.num_heads,
        ffn_units=model.get_layer("block_1_ffn_hidden").units,
        max_length=model.get_layer("position_embedding").max_length,
        dropout=model.get_layer("embedding_dropout").rate,
    )


def upcycle_transformer_lm(dense_model, num_experts, k=2, router=None, moe_every=1, name=None):
    """An MoE Transformer LM started from a trained dense one (sparse upcycling).

    Komatsuzaki et al. (2023): every `moe_every`-th block's FFN becomes an
    `MoELayer` of `num_experts` experts, each a copy of that FFN (so each
    expert is as wide as the dense FFN, and a token's k experts cost k
    times its multiply-adds); the routers are new; every other weight is
    copied. Where a token's gate values sum to 1 (the paper's router,
    routers that renormalise, and the default `UPCYCLING_ROUTER`) the new
    model starts as the dense one; the default's random gates move the
    copies apart.

    Args:
        dense_model: a trained `transformer_lm(..., model="dense")`.
        num_experts: int, experts per MoE layer.
        k: int, experts per token.
        router: as `transformer_lm`'s (None: `UPCYCLING_ROUTER`,
            `TopKGateRouter`).
        moe_every: int, which blocks become MoE layers.
        name: model name (default "transformer_upcycled").

    Returns:
        A `MoEModel`, compiled by nobody yet.
    """
    architecture = _dense_architecture(dense_model)
    moe_model = transformer_lm(
        **architecture, num_experts=num_experts, k=k, expert_hidden_units=architecture["ffn_units"],
        moe_every=moe_every, router=UPCYCLING_ROUTER if router is None else router, model="moe",
        name=name or "transformer_upcycled",
    )
    for layer in moe_model.layers:
        if isinstance(layer, MoELayer):
            block = layer.name[: -len("_moe")]
            load_dense_ffn(layer, dense_model.get_layer(f"{block}_ffn_hidden"),
                           dense_model.get_layer(f"{block}_ffn_output"))
        elif layer.weights:
            layer.set_weights(dense_model.get_layer(layer.name).get_weights())
    return moe_model
