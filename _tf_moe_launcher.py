"""Starts the `tf-moe` command: TensorFlow's log level first, then `tf_moe.reproduction.cli`.

TensorFlow reads `TF_CPP_MIN_LOG_LEVEL` once, when it loads, and importing
anything from `tf_moe` loads it (`tf_moe/__init__.py`). The level that the
command's `-v` flags ask for is therefore set here, in a module outside the
package, before the command line is imported: by default TensorFlow's C++ logs
are hidden (level 3), `-v` shows its warnings and errors (1), `-vv`
everything (0). Without `-v`, a level already set in the environment is kept.

Then, still before TensorFlow runs anything, it applies
`tf_moe.performance.configure_allocator()`: training steps reuse their large
freed buffers instead of page-faulting fresh memory each step.

The command is the paper's reproduction: without the packages of tf_moe's
`paper` extra it says in one line what to install and exits with status 2.
"""

import os
import sys

_TF_LOG_LEVELS = ("3", "1", "0")  # by number of -v


def verbosity(argv):
    """How many `-v` / `--verbose` flags `argv` holds (before any `--`)."""
    count = 0
    for arg in argv:
        if arg == "--":
            break
        if arg == "--verbose":
            count += 1
        elif arg.startswith("-v") and set(arg[1:]) == {"v"}:
            count += len(arg) - 1
    return count


def prepare_process(argv):
    """Sets TensorFlow's log level for `argv`, loads TensorFlow and configures malloc."""
    count = verbosity(argv)
    if count or "TF_CPP_MIN_LOG_LEVEL" not in os.environ:
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = _TF_LOG_LEVELS[min(count, len(_TF_LOG_LEVELS) - 1)]
    from tf_moe import performance

    performance.configure_allocator()


def main(argv=None):
    """Entry point of the `tf-moe` command."""
    argv = sys.argv[1:] if argv is None else list(argv)
    prepare_process(argv)
    from tf_moe import reproduction

    missing = reproduction.missing_modules()
    if missing:
        extra = reproduction.EXTRA
        print(f"tf-moe: error: the command needs tf_moe's `{extra}` extra (missing: {', '.join(missing)}): "
              f"pip install \"tf_moe[{extra}]\"", file=sys.stderr)
        return 2
    from tf_moe.reproduction import cli

    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
