"""Tests of the progress bars of the slow data steps."""

import time

from tf_moe.reproduction import progress


def test_bars_show_only_for_slow_steps(monkeypatch, capsys):
    assert list(progress.progress(range(3), "Reading", unit="book")) == [0, 1, 2]
    with progress.busy("Learning"):
        pass
    assert capsys.readouterr().err == ""  # faster than DELAY: nothing shown

    monkeypatch.setattr(progress, "DELAY", 0.0)
    assert list(progress.progress(range(3), "Reading", unit="book")) == [0, 1, 2]
    err = capsys.readouterr().err
    assert "Reading: 100%" in err and "3/3" in err
    with progress.busy("Learning"):
        time.sleep(1.5)
    assert "Learning: 00:01" in capsys.readouterr().err


def test_bars_are_the_librarys_progress_for_the_tokenizers(monkeypatch, capsys):
    monkeypatch.setattr(progress, "DELAY", 0.0)
    assert list(progress.BARS.iterate(range(2), "Counting words", total=2, unit="batch")) == [0, 1]
    assert "Counting words: 100%" in capsys.readouterr().err
    with progress.BARS.busy("Learning"):
        time.sleep(1.2)
    assert "Learning: 00:01" in capsys.readouterr().err
