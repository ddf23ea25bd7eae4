"""docs/results.md and the README show what the committed results files hold, no more and no less."""

import os
import re

import pytest

from tf_moe.reproduction import results

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "docs", "results")
PAGES = [os.path.join(ROOT, "docs", "results.md"), os.path.join(ROOT, "README.md")]
REQUIRED = ("experiment", "model", "corpus", "seed", "commit", "command", "settings", "ops_per_timestep", "params",
            "train_tokens", "valid_perplexity", "test_perplexity", "curve")


@pytest.mark.parametrize("page", PAGES, ids=os.path.basename)
def test_every_table_is_rendered_from_the_files(page):
    stale = results.report(page, RESULTS, check=True)
    assert not stale, f"{page} is out of date for {stale}: run `tf-moe report {os.path.relpath(page, ROOT)}" + (
        " --results-dir docs/results`" if "README" in page else "`")


@pytest.mark.parametrize("page", PAGES, ids=os.path.basename)
def test_every_table_has_its_file(page):
    files = re.findall(r"<!-- results file=(\S+)", open(page).read())
    for name in (name for names in files for name in names.split(",")):
        assert os.path.exists(os.path.join(RESULTS, f"{name}.json")), name


def test_every_row_is_traceable():
    files = sorted(name for name in os.listdir(RESULTS) if name.endswith(".json"))
    assert files
    for name in files:
        for row in results.load_rows(os.path.join(RESULTS, name)):
            missing = [key for key in REQUIRED if key not in row]
            assert not missing, (name, row["model"], missing)
            assert re.fullmatch(r"[0-9a-f]{40}", row["commit"]), (name, row["commit"])
            assert row["command"].startswith("tf-moe ") and "--results docs/results/" in row["command"]
