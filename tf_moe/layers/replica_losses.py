"""Per-replica `add_loss` storage for layers used under MirroredStrategy.

MirroredStrategy traces each replica's step in its own thread on the same
layer objects, and Keras keeps a layer's added losses in one plain list
(`Layer._losses`). Replica threads then clear and read each other's losses,
so a replica can see the auxiliary loss twice or not at all. Giving the list
one store per thread keeps each replica's losses its own.
"""

import threading

from tf_moe import _internals


class ThreadLocalLosses(list):
    """A list whose contents are private to the thread that uses it."""

    def __init__(self):
        super().__init__()
        self._local = threading.local()

    def _items(self):
        if not hasattr(self._local, "items"):
            self._local.items = []
        return self._local.items

    def append(self, item):
        self._items().append(item)

    def extend(self, items):
        self._items().extend(items)

    def clear(self):
        self._items().clear()

    def __getitem__(self, index):
        return self._items()[index]

    def __iter__(self):
        return iter(self._items())

    def __len__(self):
        return len(self._items())

    def __bool__(self):
        return bool(self._items())


def use_thread_local_losses(layer):
    """Makes `layer.add_loss` safe when replica threads share the layer."""
    _internals.replace_added_losses(layer, ThreadLocalLosses())
