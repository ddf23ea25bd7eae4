"""How the slow data steps (learning a vocabulary) report their progress.

The library shows no bars: `Progress` logs one line when a step starts
(logger `tf_moe.data`, level INFO). A caller that wants bars passes a
subclass, as the `tf-moe` command does with tqdm.
"""

import contextlib
import logging

_log = logging.getLogger("tf_moe.data")


class Progress:
    """Reports a slow data step: this base logs its description, a subclass may draw a bar.

    Example:

    >>> class Printed(Progress):
    ...     def iterate(self, iterable, desc, total=None, unit="it"):
    ...         print(desc)
    ...         return iterable
    >>> vocab = learn_vocabulary(texts, 1000, progress=Printed())  # doctest: +SKIP
    """

    def iterate(self, iterable, desc, total=None, unit="it"):
        """Iterates over `iterable`, a step of `total` items called `unit`, described by `desc`."""
        _log.info("%s", desc)
        return iterable

    @contextlib.contextmanager
    def busy(self, desc):
        """A context manager around a step that has no countable items, described by `desc`."""
        _log.info("%s", desc)
        yield
