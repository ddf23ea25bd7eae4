"""The reproduction's reports: the results table, the verdict sentence and the learning curves."""

import json
import os

import numpy as np

from tf_moe.models import BASELINES
from tf_moe.reproduction.runs import BALANCE


def verdict(rows):
    """One plain sentence on the MoE row against the dense rows at matched ops.

    The MoE row is the first with load-balance figures (`cv_load` not None);
    the others are its dense baselines. Returns None without both.
    """
    moe = next((row for row in rows if row.get("cv_load") is not None), None)
    dense = [row for row in rows if row.get("cv_load") is None]
    if moe is None or not dense:
        return None
    best = min(dense, key=lambda row: row["valid_perplexity"])
    gap = best["valid_perplexity"] - moe["valid_perplexity"]
    share = abs(gap) / best["valid_perplexity"]
    head = (
        f"At {moe['ops_per_timestep']:,} vs {best['ops_per_timestep']:,} ops per token, the MoE "
        f"({moe['params']:,} parameters) has validation perplexity {moe['valid_perplexity']:.1f} against "
        f"{best['valid_perplexity']:.1f} for {best['model']} ({best['params']:,} parameters): "
    )
    if gap > 0:
        return head + f"the MoE is ahead by {gap:.1f} ({share:.1%})."
    return head + (
        f"the dense model is ahead by {-gap:.1f} ({share:.1%}). With few training tokens per expert "
        "the MoE's extra parameters have not paid off yet; train longer (--epochs) to see the "
        "paper's effect (docs/results.md has the curves)."
    )


def curves_to_plot(results):
    """`(model, tokens, perplexities)` of every row with a curve, each model once.

    A model in several results (e.g. a long run and a short sweep) is
    drawn from the first that has it, so list the longest runs first.
    """
    seen, curves = set(), []
    for result in results:
        for row in result["rows"]:
            if row.get("curve") and row["model"] not in seen:
                seen.add(row["model"])
                tokens, perplexity = zip(*row["curve"])
                curves.append((row["model"], list(tokens), list(perplexity)))
    return curves


def plot_curves(results_paths, output_path, title=None):
    """Plots validation perplexity against training tokens for every model.

    Args:
        results_paths: result JSON files written by the experiments (each
            row with a `curve` of `[tokens, valid perplexity]` points); a
            model in several files is drawn from the first.
        output_path: the PNG to write.
        title: optional plot title (default: the corpora of the results).

    Returns:
        `output_path`.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.ticker
        from matplotlib import pyplot
    except ImportError as e:
        raise ImportError("Plotting needs matplotlib: `pip install matplotlib`.") from e
    figure, axes = pyplot.subplots(figsize=(7, 4.5))
    results = []
    for path in results_paths:
        with open(path) as f:
            results.append(json.load(f))
    corpora = [result["config"]["corpus"] for result in results]
    for model, tokens, perplexity in curves_to_plot(results):
        axes.plot(
            np.asarray(tokens) / 1e6, perplexity, marker="o", markersize=3,
            linestyle="--" if model.replace("_", "-") in BASELINES else "-", label=model,
        )
    axes.set_xlabel("training tokens (millions)")
    axes.set_ylabel("validation perplexity")
    axes.set_yscale("log")
    # Plain perplexities on the log axis, not powers of ten.
    for axis_formatter in (axes.yaxis.set_major_formatter, axes.yaxis.set_minor_formatter):
        axis_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    axes.set_title(title or f"MoE (solid) vs computationally matched dense (dashed): {', '.join(sorted(set(corpora)))}")
    os.makedirs(os.path.dirname(output_path) or ".", exist_ok=True)
    figure.tight_layout()
    figure.savefig(output_path, dpi=120)
    pyplot.close(figure)
    return output_path


def format_table(rows, columns=None):
    """Formats result rows as a Markdown table."""
    columns = columns or [
        key for key in ("model", "w_importance", "w_load", "params", "ops_per_timestep",
                        "valid_perplexity", "test_perplexity", "test_bleu", *BALANCE,
                        *(f"valid_{key}" for key in BALANCE), "train_seconds", "step_ms")
        if any(key in row for row in rows)
    ]

    def cell(value):
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
        return str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(key)) for key in columns) + " |" for row in rows]
    return "\n".join(lines)
