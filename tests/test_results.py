"""Committed results files and the tables rendered from them (tf_moe.reproduction.results)."""

import json
import os
import subprocess
import sys

import pytest

from tf_moe.reproduction import results

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _row(model, seed, valid, corpus="ptb", lr=1e-3, **extra):
    return {
        "experiment": "train lm", "model": model, "corpus": corpus, "seed": seed, "valid_perplexity": valid,
        "test_perplexity": valid - 5, "params": 100 if model == "moe" else 50, "ops_per_timestep": 1000,
        "settings": {"learning_rate": lr, "arch": "transformer"}, "commit": "abc", "command": "tf-moe x", **extra,
    }


def test_append_replaces_the_same_run_and_keeps_the_others(tmp_path):
    path = str(tmp_path / "r.json")
    results.append_rows(path, [_row("moe", 0, 100.0), _row("dense", 0, 110.0)])
    results.append_rows(path, [_row("moe", 0, 99.0), _row("moe", 1, 101.0), _row("moe", 0, 98.0, lr=2e-3)])
    rows = results.load_rows(path)
    assert sorted((r["model"], r["seed"], r["settings"]["learning_rate"], r["valid_perplexity"]) for r in rows) == [
        ("dense", 0, 1e-3, 110.0), ("moe", 0, 1e-3, 99.0), ("moe", 0, 2e-3, 98.0), ("moe", 1, 1e-3, 101.0),
    ]
    assert not os.path.exists(path + ".tmp")


def test_cells_are_mean_and_range_over_seeds():
    assert results.cell([100.0, 102.0, 104.5], "valid_perplexity") == "102.2 (100.0-104.5)"
    assert results.cell([1234567, 1234567], "params") == "1,234,567"
    assert results.cell([None, None], "valid_cv_load") == "-"
    assert results.cell([0.25], "valid_cv_load") == "0.25"


@pytest.mark.parametrize(
    "moe, dense, expected",
    [
        ([100, 101, 102], [110, 111, 112], "moe is ahead of dense by 10.0 validation perplexity (mean over 3 and 3 "
                                           "seeds), more than the two seed ranges together (4.0): reproduced."),
        ([100, 104, 102], [103, 105, 107], "moe is ahead of dense by 3.0 validation perplexity (mean over 3 and 3 "
                                           "seeds), within the two seed ranges together (8.0): not shown."),
        ([110, 111, 112], [100, 101, 102], "moe is behind dense by 10.0 validation perplexity (mean over 3 and 3 "
                                           "seeds), more than the two seed ranges together (4.0): dense is better."),
        ([100, 101], [110, 111], "fewer than 3 seeds, so no claim"),
        ([100, 104, 102], [103, 105, 107], "Seed by seed, moe is ahead in 3 of 3 (lead +1.0 to +5.0)."),
        ([100, 106, 102], [103, 105, 107], "Seed by seed, moe is ahead in 2 of 3 (lead -1.0 to +5.0)."),
    ],
)
def test_verdict_needs_three_seeds_and_a_gap_beyond_both_ranges(moe, dense, expected):
    groups = [("moe", [_row("moe", i, v) for i, v in enumerate(moe)]),
              ("dense", [_row("dense", i, v) for i, v in enumerate(dense)])]
    assert expected in results.spread_verdict(groups, "moe", "dense")


def _page(tmp_path, rows, spec="file=pair where=corpus:ptb columns=valid_perplexity,params verdict=moe:dense"):
    os.makedirs(tmp_path / "results", exist_ok=True)
    results.append_rows(str(tmp_path / "results" / "pair.json"), rows)
    page = tmp_path / "page.md"
    page.write_text(f"# Title\n\nText.\n\n<!-- results {spec} -->\nstale\n<!-- end results -->\n\nMore text.\n")
    return str(page)


def test_report_renders_the_marked_tables_and_check_finds_drift(tmp_path):
    rows = [_row(m, s, v) for m, base in (("moe", 100.0), ("dense", 110.0)) for s, v in enumerate([base, base + 1, base + 2])]
    rows.append(_row("moe", 0, 50.0, corpus="web"))  # filtered out by where=corpus:ptb
    page = _page(tmp_path, rows)
    assert results.report(page, check=True) == ["pair"]
    assert open(page).read().count("stale") == 1  # --check writes nothing
    assert results.report(page) == ["pair"]
    text = open(page).read()
    assert "| moe | 3 | 101.0 (100.0-102.0) | 100 |" in text
    assert "| dense | 3 | 111.0 (110.0-112.0) | 50 |" in text
    assert "reproduced." in text and text.startswith("# Title") and text.endswith("More text.\n")
    assert results.report(page, check=True) == []
    # A changed file makes the page stale again.
    results.append_rows(str(tmp_path / "results" / "pair.json"), [_row("moe", 2, 150.0)])
    assert results.report(page, check=True) == ["pair"]


def test_models_order_and_grouping_by_settings(tmp_path):
    rows = [_row("moe", 0, 100.0, lr=1e-3), _row("moe", 0, 90.0, lr=2e-3), _row("dense", 0, 95.0)]
    page = _page(tmp_path, rows, "file=pair group=model,learning_rate columns=valid_perplexity")
    results.report(page)
    lines = [line for line in open(page).read().splitlines() if line.startswith("| ") and "seeds" not in line]
    assert lines == ["| moe 0.001 | 1 | 100.0 |", "| moe 0.002 | 1 | 90.0 |", "| dense 0.001 | 1 | 95.0 |"]


def test_a_table_reads_several_files(tmp_path):
    rows = [_row("dense", s, v) for s, v in enumerate([110.0, 111.0, 112.0])]
    page = _page(tmp_path, rows, "file=pair,other models=top_k,dense verdict=top_k:dense")
    results.append_rows(str(tmp_path / "results" / "other.json"),
                        [_row("top_k", s, v) for s, v in enumerate([100.0, 101.0, 102.0])])
    results.report(page)
    text = open(page).read()
    assert "| top_k | 3 | 101.0 (100.0-102.0) |" in text and "| dense | 3 | 111.0 (110.0-112.0) |" in text
    assert "top_k is ahead of dense by 10.0" in text


def test_bad_markers_are_named(tmp_path):
    page = _page(tmp_path, [_row("moe", 0, 1.0)], "where=corpus:ptb")
    with pytest.raises(ValueError, match="needs file="):
        results.report(page)


def test_source_commit_is_this_checkouts_head():
    head = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    if not head:
        pytest.skip("not a git checkout")
    assert results.source_commit().split("-")[0] == head


def test_command_line_is_what_a_user_types():
    assert results.command_line(["train", "lm", "--results", "docs/results/x y.json"]) == (
        "tf-moe train lm --results 'docs/results/x y.json'"
    )
    assert json.loads(json.dumps(results.stamp({"model": "m"}, "train lm", command="tf-moe")))["commit"]
    assert sys.argv  # stamp reads sys.argv by default


def test_best_settings_are_each_models_lowest_validation_row():
    rows = [_row("moe", 0, 100.0, lr=1e-3), _row("moe", 0, 90.0, lr=2e-3), _row("dense", 0, 95.0, lr=1e-3)]
    for row in rows:
        row["settings"]["dropout"] = 0.1
    assert results.best_settings(rows, "moe") == {"learning_rate": 2e-3, "dropout": 0.1}
    assert results.best_settings(rows, "dense") == {"learning_rate": 1e-3, "dropout": 0.1}
    assert results.best_settings(rows, "wide") is None
