"""Training step time of the main job's MoE language model, or the MoE Transformer, against its dense baseline.

`--arch lstm` (the default) builds the `tf-moe train lm` models as the main
job does (`Config(**Config.MAIN_LM)`: the word-level protocol, LSTM LM of
appendix C with 16 experts, k=4, units 128, expert hidden 256, a 5000-word
vocabulary, stateful LSTMs on batches of 32 x 35 tokens, Adam): "moe" and
its computationally matched baseline "moe-1-wide" (one dense expert k*256
wide). `--arch transformer` builds the models of `tf-moe experiment lm
--arch transformer` (`Config(**Config.TRANSFORMER)`: `transformer_lm` with
2 blocks of width 128, 4 heads, 16 experts of hidden 256, k=2, a
10000-word vocabulary, batches of 16 x 64 tokens, AdamW) and its dense twin
"dense" (every FFN 2*256 + 16/2 wide: the same ops per token).

Both train on the same synthetic batches (random token ids, no padding),
in rounds: `--steps` `train_on_batch` calls of each model, then of each
again in the reverse order (a step's time is the mean of the two), so
their ratio holds on a loaded machine. The ratio is taken within each
round and reported as min / median / max over the rounds; the ms/step and
tokens/s columns are those of the round with the median ratio, so they
agree with it. "First step" is the first `train_on_batch` call, which
traces and optimises the training graph.

Usage:
  python benchmarks/end_to_end.py
  python benchmarks/end_to_end.py --arch transformer
  python benchmarks/end_to_end.py --arch transformer --router top_k --fused
  python benchmarks/end_to_end.py --rounds 3 --steps 10 --policy mixed_bfloat16
  python benchmarks/end_to_end.py --jit-compile
"""

import argparse
import os
import statistics
import sys
import time
import types

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _batches(config, vocab_size, count, seed=0):
    import numpy as np

    rng = np.random.default_rng(seed)
    shape = (config.batch_size, config.seq_len + 1)
    batches = []
    for _ in range(count):
        ids = rng.integers(1, vocab_size, shape, dtype=np.int32)
        batches.append((ids[:, :-1], ids[:, 1:]))
    return batches


def _model(config, label, vocab_size, jit_compile=False, fused=False):
    import keras

    from tf_moe.models import lstm_lm, transformer_lm
    from tf_moe.reproduction import language_model, runs
    from tf_moe.training import fused_optimizer

    keras.utils.set_random_seed(config.seed)
    # The LSTM's word-level streams are stateful; the Transformer reads independent segments.
    data = types.SimpleNamespace(
        vocabulary=types.SimpleNamespace(vocabulary_size=vocab_size), stateful=config.arch == "lstm"
    )
    settings = language_model._model_arguments(config, data, label, {})
    model = (transformer_lm if config.arch == "transformer" else lstm_lm)(**settings)
    optimizer = runs.optimizer(config)
    model.compile(optimizer=fused_optimizer(optimizer) if fused else optimizer, jit_compile=jit_compile)
    return model


def _median_round(seconds, labels):
    """The index of the round with the median ratio of the first model's time to the second's."""
    ratios = [a / b for a, b in zip(seconds[labels[0]], seconds[labels[1]])]
    return sorted(range(len(ratios)), key=ratios.__getitem__)[len(ratios) // 2], ratios


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="lstm", choices=["lstm", "transformer"])
    parser.add_argument("--models", nargs=2, default=["moe", None], metavar=("MOE", "BASELINE"),
                        help="the two model labels (default: moe and the configuration's baseline)")
    parser.add_argument("--router", default=None, help="the MoE's router (default: MoELayer's)")
    parser.add_argument("--steps", type=int, default=10, help="train steps per model, twice per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--policy", default="float32", choices=["float32", "mixed_bfloat16", "mixed_float16"])
    parser.add_argument("--fused", action="store_true",
                        help="both models' optimizers through tf_moe.training.fused_optimizer")
    parser.add_argument("--jit-compile", action="store_true",
                        help="compile both models' train steps with XLA (the main job does not)")
    parser.add_argument("--default-allocator", action="store_true",
                        help="leave TensorFlow's CPU allocator as the build chose it (no configure_allocator)")
    args = parser.parse_args()

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tf_moe
    from tf_moe import performance

    if not args.default_allocator:
        performance.configure_allocator()
    import keras

    from tf_moe.reproduction.config import Config

    keras.mixed_precision.set_global_policy(args.policy)
    base = Config.TRANSFORMER if args.arch == "transformer" else Config.MAIN_LM
    config = Config(**dict(base, router=args.router))
    labels = [args.models[0], args.models[1] or config.baseline]
    vocab_size = config.vocab_size
    batches = _batches(config, vocab_size, args.steps)
    tokens = sum(int((y != 0).sum()) for _, y in batches)
    models = [_model(config, label, vocab_size, args.jit_compile, args.fused) for label in labels]
    first_step = {}
    for label, model in zip(labels, models):  # trace and warm up
        start = time.perf_counter()
        model.train_on_batch(*batches[0])
        first_step[label] = time.perf_counter() - start
        for x, y in batches[1:3]:
            model.train_on_batch(x, y)
    load = os.getloadavg()
    seconds = {label: [] for label in labels}
    for _ in range(args.rounds):
        # Both models, then both in the reverse order: a load that changes
        # during the round weighs on both alike.
        spent = dict.fromkeys(labels, 0.0)
        for label, model in list(zip(labels, models)) + list(zip(labels, models))[::-1]:
            start = time.perf_counter()
            for x, y in batches:
                model.train_on_batch(x, y)
            spent[label] += time.perf_counter() - start
        for label in labels:
            seconds[label].append(spent[label] / 2)
    median, ratios = _median_round(seconds, labels)
    sizes = (f"{config.layers} blocks of {config.units}, {config.heads} heads" if args.arch == "transformer"
             else f"units={config.units}")
    print(f"# tf_moe {tf_moe.__version__}, {args.arch}, policy {args.policy}, jit_compile {args.jit_compile}, "
          f"allocator {'default' if args.default_allocator else 'configured'}, optimizer "
          f"{type(models[0].optimizer).__name__}, router {config.router or 'default'}; {config.experts} experts, "
          f"k={config.k}, {sizes}, expert hidden {config.expert_hidden}, vocabulary {vocab_size}, batch "
          f"{config.batch_size}x{config.seq_len}; {args.rounds} rounds of 2 x {args.steps} steps; load average "
          f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (1, 5, 15 min) before the rounds")
    print("| model | ms/step | tokens/s | time / baseline's (min / median / max) | first step s |")
    print("|---|---|---|---|---|")
    for label in labels:
        round_seconds = seconds[label][median]
        spread = (" / ".join(f"{r:.2f}" for r in (min(ratios), ratios[median], max(ratios)))
                  if label == labels[0] else "1.00")
        print(f"| {label} | {1e3 * round_seconds / args.steps:.1f} | {tokens / round_seconds:.0f} | {spread} "
              f"| {first_step[label]:.1f} |")


if __name__ == "__main__":
    main()
