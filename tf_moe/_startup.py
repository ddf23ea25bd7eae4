"""Imports TensorFlow so that `TF_CPP_MIN_LOG_LEVEL` also covers its start-up lines.

TensorFlow reads `TF_CPP_MIN_LOG_LEVEL` (0: everything, 1: no INFO, 2: no
WARNING, 3: no ERROR) when it loads, but the lines its C++ libraries print
while loading, before absl logging is initialised ("oneDNN custom operations
are on", "Could not find cuda drivers", "This TensorFlow binary is
optimized ..."), ignore it. `import_tensorflow` captures the process's
standard error (file descriptor 2, where C++ writes) during the import and
writes back every line the level lets through. Unset or 0 changes nothing:
no capture at all.

The log line format (`I0000 00:00:... file.cc:12] message`) is absl's, which
TensorFlow uses; tests/test_startup.py pins it.
"""

import os
import re
import sys
import tempfile

# `<severity><MMDD> <time> <thread> <file>:<line>] `: severity is I, W, E or F.
_RECORD = re.compile(r"[IWEF]\d{4} [\d:.]+\s+\d+ [^\]\s]+:\d+\] ")
_SEVERITY_LEVEL = {"I": 0, "W": 1, "E": 2, "F": 3}
_EARLY_BANNER = "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"


def min_log_level(environ=None):
    """TensorFlow's C++ log level from `TF_CPP_MIN_LOG_LEVEL` (0 when unset or invalid)."""
    value = (os.environ if environ is None else environ).get("TF_CPP_MIN_LOG_LEVEL", "0")
    try:
        return min(max(int(value), 0), 3)
    except ValueError:
        return 0


def filter_log_lines(text, level):
    """Drops the C++ log records below `level` from captured standard error.

    A record is a line in absl's format and the lines after it up to the
    next record (multi-line messages). Records of severity INFO (I), WARNING
    (W), ERROR (E) are kept when their level (0, 1, 2) is at least `level`;
    FATAL always. absl's banner about early messages is kept only if a record
    is. Every other line is kept as it is.

    Args:
        text: captured output.
        level: int, `TF_CPP_MIN_LOG_LEVEL`.

    Returns:
        The kept lines, in order, as one string.

    Example:

    >>> filter_log_lines("I0000 00:00:1.5   7 port.cc:153] oneDNN\\nhello\\n", 1)
    ''
    """
    kept, keep_record, any_record_kept = [], True, False
    for line in text.splitlines(keepends=True):
        if line.rstrip("\r\n") == _EARLY_BANNER:
            continue
        if _RECORD.match(line):
            keep_record = line[0] == "F" or _SEVERITY_LEVEL[line[0]] >= level
            any_record_kept |= keep_record
        if keep_record:
            kept.append(line)
    if any_record_kept:
        kept.insert(0, _EARLY_BANNER + "\n")
    return "".join(kept)


def import_tensorflow():
    """Imports TensorFlow, holding back the start-up lines its log level hides."""
    level = min_log_level()
    saved = _duplicate_stderr() if level and "tensorflow" not in sys.modules else None
    if saved is None:
        import tensorflow  # noqa: F401

        return
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import tensorflow  # noqa: F401
        finally:
            _flush_stderr()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            text = filter_log_lines(captured.read().decode("utf-8", "replace"), level)
            if text:
                os.write(2, text.encode("utf-8"))


def _duplicate_stderr():
    """A copy of file descriptor 2, or None where there is none (a GUI or service process)."""
    _flush_stderr()
    try:
        return os.dup(2)
    except OSError:
        return None


def _flush_stderr():
    try:
        sys.stderr.flush()
    except (AttributeError, OSError, ValueError):  # sys.stderr is None or closed
        pass
