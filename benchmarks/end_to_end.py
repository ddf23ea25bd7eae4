"""Training step time of the main job's MoE language model against its dense baseline.

Builds the `tf-moe train lm` models as the main job does
(`Config(**Config.MAIN_LM)`: the word-level protocol, LSTM LM of appendix C
with 16 experts, k=4, units 128, expert hidden 256, a 5000-word vocabulary,
stateful LSTMs on batches of 32 x 35 tokens, Adam) in one process: "moe" and
its computationally matched baseline "moe-1-wide" (one dense expert k*256
wide). Both train on the same synthetic batches (random token ids: the word
level's stream segments have no padding), in rounds of `--steps`
`train_on_batch` calls, alternating model by model, so their ratio holds on a
loaded machine. The ratio is the median over rounds of (moe time / baseline
time).

Usage:
  python benchmarks/end_to_end.py
  python benchmarks/end_to_end.py --rounds 3 --steps 10 --policy mixed_bfloat16
  python benchmarks/end_to_end.py --jit-compile
"""

import argparse
import os
import statistics
import sys
import time

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


def _model(config, label, vocab_size, jit_compile=False):
    import keras

    from tf_moe.models import lstm_lm
    from tf_moe.reproduction import language_model, runs

    keras.utils.set_random_seed(config.seed)
    settings = dict(runs.model_settings(config), vocab_size=vocab_size, name=label.replace("-", "_"))
    settings.update(language_model.variant_arguments(label, config), stateful=True, batch_size=config.batch_size)
    model = lstm_lm(**settings)
    model.compile(optimizer=runs.optimizer(config), jit_compile=jit_compile)
    return model


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs=2, default=["moe", None], metavar=("MOE", "BASELINE"),
                        help="the two model labels (default: moe and Config().baseline)")
    parser.add_argument("--steps", type=int, default=20, help="train steps per model per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--policy", default="float32", choices=["float32", "mixed_bfloat16", "mixed_float16"])
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
    config = Config(**Config.MAIN_LM)
    labels = [args.models[0], args.models[1] or config.baseline]
    vocab_size = config.vocab_size
    batches = _batches(config, vocab_size, args.steps)
    tokens = sum(int((y != 0).sum()) for _, y in batches)
    models = [_model(config, label, vocab_size, args.jit_compile) for label in labels]
    for model in models:  # trace and warm up
        for x, y in batches[:3]:
            model.train_on_batch(x, y)
    seconds = {label: [] for label in labels}
    for _ in range(args.rounds):
        for label, model in zip(labels, models):
            start = time.perf_counter()
            for x, y in batches:
                model.train_on_batch(x, y)
            seconds[label].append(time.perf_counter() - start)
    ratios = [a / b for a, b in zip(*seconds.values())]
    print(f"# tf_moe {tf_moe.__version__}, policy {args.policy}, jit_compile {args.jit_compile}, allocator "
          f"{'default' if args.default_allocator else 'configured'}; main job's sizes: {config.experts} experts, "
          f"k={config.k}, units={config.units}, expert hidden {config.expert_hidden}, batch "
          f"{config.batch_size}x{config.seq_len}; {args.rounds} rounds of {args.steps} steps")
    print("| model | ms/step | tokens/s | time / baseline's |")
    print("|---|---|---|---|")
    for label in labels:
        median = statistics.median(seconds[label])
        ratio = statistics.median(ratios) if label == labels[0] else 1.0
        print(f"| {label} | {1e3 * median / args.steps:.1f} | {tokens / median:.0f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
