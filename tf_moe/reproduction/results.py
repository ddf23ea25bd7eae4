"""Committed results: the rows every run writes, and the tables of docs/results.md rendered from them.

Each experiment behind docs/results.md appends one row per trained model to
`docs/results/<experiment>.json` (a JSON list): the model, corpus, seed, the
git commit and the command it ran with, its settings, size, ops, training
tokens, perplexities, validation curve and routing figures. The page's
tables are not typed by hand: each sits between two markers,

    <!-- results file=transformer_ptb columns=valid_perplexity,test_perplexity verdict=moe:dense -->
    ...
    <!-- end results -->

and `tf-moe report docs/results.md` rewrites what lies between them from
the files (`--check` only compares), grouping rows of the same model and
settings over seeds as "mean (min-max)". `tests/test_results_page.py`
fails when the page and the files disagree.
"""

import dataclasses
import json
import math
import os
import re
import shlex
import subprocess
import sys
import time

import numpy as np

from tf_moe.layers.moe_layer import DEFAULT_BALANCING_WEIGHT

# Settings that tell runs of one model apart (with the experiment, model and
# corpus); a row's seed is what varies within a group.
SETTING_KEYS = (
    "arch", "level", "units", "layers", "heads", "experts", "k", "groups", "expert_hidden", "shared_experts",
    "router", "epochs", "steps", "batch_size", "seq_len", "vocab_size", "learning_rate", "warmup", "dropout",
    "weight_decay", "importance_weight", "load_weight", "gate_lr_multiplier",
)
# Settings that rows leave out at their default (`settings_of`): rows written
# before the setting existed had it, and keep their run keys.
_OMITTED_DEFAULTS = {"shared_experts": 0}

_MARKER = re.compile(r"<!-- results (?P<spec>[^>]*?) -->\n(?P<body>.*?)<!-- end results -->", re.DOTALL)
_PERPLEXITY_DIGITS = 1


def source_commit():
    """The git commit of the code that runs, with "-dirty" if its tracked files differ; "unknown" outside git."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        head = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True, timeout=30).stdout.strip()
        changed = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no", "tf_moe"],
                                 capture_output=True, text=True, check=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("-dirty" if changed else "")


def command_line(argv=None):
    """The `tf-moe ...` command that is running, as a user would type it."""
    return shlex.join(["tf-moe", *(sys.argv[1:] if argv is None else argv)])


def settings_of(config):
    """The `SETTING_KEYS` of a `Config`."""
    values = dataclasses.asdict(config)
    settings = {key: values[key] for key in SETTING_KEYS if key in values}
    for key, default in _OMITTED_DEFAULTS.items():
        if settings.get(key) == default:
            settings.pop(key, None)
    for key in ("importance_weight", "load_weight"):
        if settings.get(key) is None:
            # The weight the layer uses, as rows written before None meant it recorded it.
            settings[key] = DEFAULT_BALANCING_WEIGHT
    return settings


def stamp(row, experiment, command=None):
    """A run's row (which holds its corpus, seed and settings) with its experiment, commit, command and date."""
    return {
        **row,
        "experiment": experiment,
        "commit": source_commit(),
        "command": command or command_line(),
        "date": time.strftime("%Y-%m-%d"),
    }


def _key(row):
    return (row["experiment"], row["model"], row["corpus"], row["seed"], json.dumps(row["settings"], sort_keys=True))


def load_rows(path):
    """The rows of a results file ([] when it does not exist yet)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        rows = json.load(f)
    if not isinstance(rows, list):
        raise ValueError(f"{path}: a results file holds a JSON list of rows.")
    return rows


def append_rows(path, rows):
    """Adds `rows` to the results file at `path`, replacing earlier rows of the same run.

    A run is its experiment, model, corpus, seed and settings: rerunning it
    replaces its row. The file is written whole, then moved over the old one.
    """
    kept = {_key(row): row for row in load_rows(path)}
    for row in rows:
        kept[_key(row)] = row
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    temporary = f"{path}.tmp"
    with open(temporary, "w") as f:
        json.dump(list(kept.values()), f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(temporary, path)


# Settings that a tuning grid searches.
TUNED_KEYS = ("learning_rate", "dropout")


def best_settings(rows, model):
    """`{learning_rate, dropout}` of `model`'s row of lowest validation perplexity (None without rows)."""
    candidates = [row for row in rows if row["model"] == model]
    if not candidates:
        return None
    best = min(candidates, key=lambda row: row["valid_perplexity"])
    return {key: best["settings"][key] for key in TUNED_KEYS}


# ------------------------------------------------------------- rendering ----


@dataclasses.dataclass
class TableSpec:
    """What one marked table shows: `file=... [where=k:v,...] [columns=...] [models=...] [verdict=a:b]`.

    `file=a,b` reads the rows of several files, e.g. a dense twin's and a
    router comparison's, for one table and its verdict.
    """

    file: str
    where: dict
    columns: tuple
    models: tuple | None
    verdict: tuple | None
    group: tuple

    @classmethod
    def parse(cls, text):
        fields = dict(item.split("=", 1) for item in text.split())
        unknown = set(fields) - {"file", "where", "columns", "models", "verdict", "group"}
        if "file" not in fields or unknown:
            raise ValueError(f"results marker {text!r}: needs file=, knows where= columns= models= verdict= group=.")
        where = dict(item.split(":", 1) for item in fields.get("where", "").split(",") if item)
        columns = tuple(fields.get("columns", "valid_perplexity,test_perplexity").split(","))
        models = tuple(fields["models"].split(",")) if "models" in fields else None
        verdict = tuple(fields["verdict"].split(":")) if "verdict" in fields else None
        group = tuple(fields.get("group", "model").split(","))
        return cls(fields["file"], where, columns, models, verdict, group)


def _value(row, key):
    """A row's value for a column or filter key, looking into its settings too."""
    if key in row:
        return row[key]
    return row.get("settings", {}).get(key, _OMITTED_DEFAULTS.get(key))


def _matches(row, where):
    return all(str(_value(row, key)) == value for key, value in where.items())


def group_rows(rows, spec):
    """`[(label, [rows])]` of the rows that `spec` selects, one group per label, in the spec's order."""
    groups = {}
    for row in rows:
        if _matches(row, spec.where):
            label = " ".join(str(_value(row, key)) for key in spec.group)
            groups.setdefault(label, []).append(row)
    order = spec.models or tuple(groups)
    return [(label, sorted(groups[label], key=lambda r: r["seed"])) for label in order if label in groups]


def _number(value, key):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    if isinstance(value, float):
        digits = _PERPLEXITY_DIGITS if "perplexity" in key or key.endswith("_ms") else 2
        return f"{value:.{digits}f}" if abs(value) < 1e5 else f"{value:,.0f}"
    return str(value)


def cell(values, key):
    """One table cell: the value, or over several seeds "mean (min-max)"."""
    present = [v for v in values if v is not None]
    if not present:
        return "-"
    if len(set(map(json.dumps, present))) == 1 or not all(isinstance(v, (int, float)) for v in present):
        return _number(present[0], key)
    mean = float(np.mean(present))
    return f"{_number(mean, key)} ({_number(float(min(present)), key)}-{_number(float(max(present)), key)})"


def spread_verdict(groups, better, worse):
    """Is `better`'s mean validation perplexity below `worse`'s by more than both spreads? And seed by seed.

    The verdict compares the means against the two models' seed ranges
    together; a second sentence compares the runs of equal seed (the same
    data order), where both models ran the same seeds.
    """
    by_label = dict(groups)
    if better not in by_label or worse not in by_label:
        return f"(verdict: no rows for {better} or {worse})"
    a = [r["valid_perplexity"] for r in by_label[better]]
    b = [r["valid_perplexity"] for r in by_label[worse]]
    gap = float(np.mean(b) - np.mean(a))
    spreads = (max(a) - min(a)) + (max(b) - min(b))
    seeds = f"{len(a)} and {len(b)} seeds"
    if len(a) < 3 or len(b) < 3:
        return (f"{better} vs {worse}: mean validation gap {gap:+.1f} over {seeds}; fewer than 3 seeds, "
                "so no claim.")
    ahead, behind = f"{better} is ahead of {worse}", f"{better} is behind {worse}"
    head = f"{ahead if gap > 0 else behind} by {abs(gap):.1f} validation perplexity (mean over {seeds}), "
    if gap > spreads:
        verdict = head + f"more than the two seed ranges together ({spreads:.1f}): reproduced."
    elif -gap > spreads:
        verdict = head + f"more than the two seed ranges together ({spreads:.1f}): {worse} is better."
    else:
        verdict = head + f"within the two seed ranges together ({spreads:.1f}): not shown."
    return verdict + _paired(by_label[better], by_label[worse], better)


def _paired(better_rows, worse_rows, better):
    """The sentence on `better`'s lead over runs of the same seed; "" where the two ran different seeds."""
    a = {r["seed"]: r["valid_perplexity"] for r in better_rows}
    b = {r["seed"]: r["valid_perplexity"] for r in worse_rows}
    if set(a) != set(b) or len(a) != len(better_rows) or len(b) != len(worse_rows):
        return ""
    leads = [b[seed] - a[seed] for seed in sorted(a)]
    wins = sum(lead > 0 for lead in leads)
    return (f" Seed by seed, {better} is ahead in {wins} of {len(leads)} "
            f"(lead {min(leads):+.1f} to {max(leads):+.1f}).")


def render_table(rows, spec):
    """The Markdown of one marked table (and its verdict line)."""
    groups = group_rows(rows, spec)
    header = ["model", "seeds", *spec.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, members in groups:
        cells = [cell([_value(r, key) for r in members], key) for key in spec.columns]
        lines.append("| " + " | ".join([label, str(len(members)), *cells]) + " |")
    if spec.verdict:
        lines += ["", spread_verdict(groups, *spec.verdict)]
    return "\n".join(lines) + "\n"


def render_page(text, results_dir):
    """`text` with every marked table rendered from the files in `results_dir`."""

    def render(match):
        spec = TableSpec.parse(match.group("spec"))
        rows = [row for name in spec.file.split(",") for row in load_rows(os.path.join(results_dir, f"{name}.json"))]
        return f"<!-- results {match.group('spec')} -->\n{render_table(rows, spec)}<!-- end results -->"

    return _MARKER.sub(render, text)


def report(page, results_dir=None, check=False):
    """Renders the tables of `page` (a Markdown file); returns the names of the files whose tables changed.

    Args:
        page: path of the page, e.g. docs/results.md.
        results_dir: where the results files are (default: `results/` beside the page).
        check: compare only; do not write.

    Returns:
        The `file=` names of the tables whose rendering differs from the page.
    """
    results_dir = results_dir or os.path.join(os.path.dirname(page), "results")
    with open(page) as f:
        text = f.read()
    rendered = render_page(text, results_dir)
    stale = [
        TableSpec.parse(old.group("spec")).file
        for old, new in zip(_MARKER.finditer(text), _MARKER.finditer(rendered))
        if old.group("body") != new.group("body")
    ]
    if stale and not check:
        with open(page, "w") as f:
            f.write(rendered)
    return stale
