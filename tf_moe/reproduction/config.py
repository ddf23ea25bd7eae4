"""The settings of one training run of the reproduction: `Config`, the `tf-moe` command's flags."""

import dataclasses

from tf_moe.layers.moe_layer import DEFAULT_ROUTER


@dataclasses.dataclass
class Config:
    """Settings of one training run (the CLI's flags)."""

    corpus: str = "web"
    level: str = "wordpiece"
    # "lstm": the paper's LSTM language model (appendix C); "transformer": a
    # decoder-only Transformer whose FFNs are MoE layers.
    arch: str = "lstm"
    experts: int = 16
    k: int = 4
    groups: int | None = None
    units: int = 128
    layers: int = 2  # Transformer blocks
    heads: int = 4  # attention heads
    expert_hidden: int = 256
    # Always-on experts of each MoE layer beside the k routed ones
    # (DeepSeekMoE); the dense baselines match them.
    shared_experts: int = 0
    # None: the model's default router (the LSTM models' `top_k_gate`);
    # else a name of tf_moe.routers.
    router: str | None = None
    baseline: str = "moe-1-wide"
    epochs: int = 3
    steps: int | None = 200
    batch_size: int = 32
    seq_len: int = 32
    vocab_size: int | None = 4000
    learning_rate: float = 3e-3
    warmup: int = 200
    dropout: float = 0.1
    # AdamW's decoupled weight decay; 0 trains with Adam.
    weight_decay: float = 0.0
    # The paper's balancing losses' weights, for the routers that use them;
    # None: MoELayer's (0.1).
    importance_weight: float | None = None
    load_weight: float | None = None
    # How much faster the paper's noisy gates learn than the rest
    # (`NoisyTopKRouter(learning_rate_multiplier=...)`; docs/results.md,
    # "Why the MoE lost"); used only with those routers, 1 is the paper's.
    gate_lr_multiplier: float = 1.0
    train_size: int | None = None
    valid_size: int | None = None
    beam_size: int = 4
    bleu_sentences: int | None = 400
    output: str = "saved_models"
    seed: int = 0
    verbose: int = 1

    # The word-level protocol's settings (`--level word`): a 10k-word
    # vocabulary (all of the Penn Treebank's), full passes over the training
    # stream in segments of 35 steps, as TensorFlow's PTB tutorial.
    WORD_LEVEL = dict(
        level="word", vocab_size=10_000, steps=None, epochs=13, seq_len=35, batch_size=32,
        learning_rate=2e-3, dropout=0.25,
    )

    # The main job (`tf-moe train lm`): the word-level protocol on the
    # embedded Bible with a 5000-word vocabulary and one full pass, where
    # the MoE is ahead of its matched dense baseline (docs/results.md).
    MAIN_LM = dict(WORD_LEVEL, vocab_size=5000, epochs=1)

    # The Transformer language model's protocol (`--arch transformer`): the
    # word-level streams, cut into independent 64-token contexts; 2 blocks
    # of width 128, 16 experts of hidden 256 with k = 2 against a dense FFN
    # of 512; AdamW; one full pass. The router is MoELayer's default, by
    # name: rows written before it changed say None (then `top_k_gate`).
    TRANSFORMER = dict(
        WORD_LEVEL, arch="transformer", router=DEFAULT_ROUTER, units=128, layers=2, heads=4, experts=16, k=2,
        expert_hidden=256, baseline="dense", epochs=1, seq_len=64, batch_size=16, learning_rate=1e-3, dropout=0.1,
        weight_decay=0.01,
    )

    # A tiny smoke-test configuration (seconds, not minutes).
    QUICK = dict(
        experts=4, k=2, units=32, expert_hidden=64, epochs=1, steps=3, batch_size=16,
        seq_len=16, vocab_size=200, warmup=5, train_size=300, valid_size=64,
        bleu_sentences=16, beam_size=2,
    )

    @classmethod
    def quick(cls, **overrides):
        """`QUICK` with `overrides` applied."""
        return cls(**{**cls.QUICK, **overrides})
