"""Progress bars for the slow data steps: fetching and cleaning corpora, learning vocabularies.

A bar appears only when its step takes longer than `DELAY` seconds, on
standard error. `TQDM_DISABLE=1` turns them all off (tqdm reads `TQDM_*`
variables as its defaults). `BARS` gives the library's tokenizers the same
bars (`WordpieceTokenizer.from_texts(..., progress=BARS)`).
"""

import contextlib
import threading
import time

from tqdm import tqdm

from tf_moe.data import Progress

DELAY = 2.0  # seconds a step runs before its bar shows


def progress(iterable, desc, total=None, unit="it"):
    """Iterates over `iterable` with a progress bar shown after `DELAY` seconds.

    Args:
        iterable: anything iterable.
        desc: what is being done, e.g. "Reading the World English Bible".
        total: number of items, if `len(iterable)` does not give it.
        unit: what one item is called.

    Returns:
        A `tqdm` iterator over the same items.
    """
    return tqdm(iterable, desc=desc, total=total, unit=unit, delay=DELAY)


@contextlib.contextmanager
def busy(desc):
    """Shows the elapsed time of a step that has no countable items.

    After `DELAY` seconds a line `desc: mm:ss` appears and counts up each
    second until the block ends.

    Args:
        desc: what is being done.

    Example:

    >>> with busy("Learning the vocabulary"):
    ...     vocabulary = learn()  # doctest: +SKIP
    """
    bar = tqdm(total=None, desc=desc, bar_format="{desc}: {elapsed}", delay=DELAY)
    start, done = time.monotonic(), threading.Event()

    def tick():
        while not done.wait(1.0):
            if time.monotonic() - start >= DELAY:
                bar.refresh()

    thread = threading.Thread(target=tick, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        bar.close()


class TqdmProgress(Progress):
    """`tf_moe.data.Progress` drawn as the bars above."""

    def iterate(self, iterable, desc, total=None, unit="it"):
        return progress(iterable, desc, total=total, unit=unit)

    def busy(self, desc):
        return busy(desc)


BARS = TqdmProgress()
